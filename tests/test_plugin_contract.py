"""The plugin author's contract, checked: capabilities before the run, outputs in the round loop,
failing loggers, broken plugin packages, experiment trackers, names whole in an 80-column terminal."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedmmkt_cli.main import app
from typer.testing import CliRunner

from fedmmkt_core.errors import PluginOutputError, RecipeError
from fedmmkt_core.hookspecs import hookimpl
from fedmmkt_core.interfaces import Aggregator, Generator, Logger
from fedmmkt_core.outputs import check_metrics, check_soft_labels
from fedmmkt_core.plugins import PluginManager
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.server.runner import RunFailed, Runner

SMOKE = Path(__file__).resolve().parents[1] / "examples" / "smoke.yaml"
runner = CliRunner()

# FedMMKT in seconds: the example package's toy generator, numpy clients, no generator evaluation.
FAST_FEDMMKT = """\
fedmmkt: 1
seed: 0
data: {dataset: {name: digits}, partitioner: {name: iid}}
clients: [{name: softmax-regression, count: 2, params: {epochs: 1}}]
federation: {rounds: 2}
algorithm: {name: fedmmkt, params: {samples_per_class: 3, evaluate_generator: false}}
aggregator: {name: AGGREGATOR}
generator: {name: class-prototypes, params: {steps: 2}}
alignment_losses: [{name: weighted-denoising, params: {threshold: 0.0}}]
loggers: LOGGERS
"""


class BareGenerator(Generator):
    """generate / fine_tune only: neither generate_base nor denoise."""

    def build(self, task, seed, cache_dir, public=None, progress=None): ...
    def generate(self, prompts, seeds): ...
    def fine_tune(self, batch, losses, seed): ...
    def save_adapter(self, path): ...
    def load_adapter(self, path): ...


class RawLogits(Aggregator):
    """A plugin bug: returns the mean logits, not probabilities."""

    def aggregate(self, round_index, replies):
        return np.mean([r.logits for r in replies], axis=0)


class Exploding(Logger):
    calls = 0

    def log_round(self, round_index, metrics):
        Exploding.calls += 1
        raise ConnectionError("tracker unreachable")


class ContractPlugin:
    @hookimpl
    def register_generators(self, register):
        register("bare", BareGenerator)

    @hookimpl
    def register_aggregators(self, register):
        register("raw-logits", RawLogits)

    @hookimpl
    def register_loggers(self, register):
        register("exploding", Exploding)


def registry():
    return PluginManager().add_plugin(ContractPlugin(), package="contract-pkg")


def fast_recipe(aggregator="kd", loggers="[]", **kwargs):
    text = FAST_FEDMMKT.replace("AGGREGATOR", aggregator).replace("LOGGERS", loggers)
    return parse_recipe(text, registry=registry(), **kwargs)


# ------------------------------------------------------------------ Build 1: capabilities


def test_capabilities_are_what_a_generator_overrides():
    from fedmmkt_example_plugin.class_prototypes import ClassPrototypesGenerator
    from fedmmkt_plugins.generators.sd_lora import SDLoraGenerator

    assert SDLoraGenerator.capabilities() == {"generate_base", "denoise"}
    assert ClassPrototypesGenerator.capabilities() == {"denoise"}
    assert BareGenerator.capabilities() == frozenset()


def test_validate_refuses_base_fraction_without_generate_base():
    result = runner.invoke(
        app,
        [
            "validate",
            str(SMOKE),
            "--set",
            "generator={name: class-prototypes}",
            "--set",
            "algorithm.params.base_fraction=0.5",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "algorithm.params.base_fraction" in result.output
    assert "'generate_base'" in result.output and "'class-prototypes' (fedmmkt-example-plugin)" in result.output
    assert "Traceback" not in result.output
    ok = runner.invoke(app, ["validate", str(SMOKE), "--set", "generator={name: class-prototypes}"])
    assert ok.exit_code == 0, ok.output  # denoise is there: the built-in loss is fine


def test_validate_refuses_a_loss_that_needs_denoise():
    with pytest.raises(RecipeError) as info:
        parse_recipe(
            FAST_FEDMMKT.replace("class-prototypes, params: {steps: 2}", "bare")
            .replace("AGGREGATOR", "kd")
            .replace("LOGGERS", "[]"),
            registry=registry(),
        )
    (issue,) = info.value.issues
    assert issue.path == "alignment_losses.0"
    assert "'weighted-denoising'" in issue.message and "'denoise'" in issue.message and "'bare'" in issue.message
    # a loss of weight 0 is never called, and FedDF never fine-tunes: nothing to refuse
    parse_recipe(
        FAST_FEDMMKT.replace("class-prototypes, params: {steps: 2}", "bare")
        .replace("AGGREGATOR", "kd")
        .replace("LOGGERS", "[]")
        .replace("params: {threshold: 0.0}}", "weight: 0}"),
        registry=registry(),
    )


def test_set_errors_point_at_the_set_not_the_file():
    result = runner.invoke(app, ["validate", str(SMOKE), "--set", "generator={name: sd-lora, params: {bogus: 1}}"])
    assert result.exit_code == 2
    assert "generator.params.bogus" in result.output and "(from --set generator=" in result.output
    assert "smoke.yaml:" not in result.output


def test_generator_model_path_resolves_against_the_recipe_folder(tmp_path):
    (tmp_path / "models" / "sd").mkdir(parents=True)
    recipe = parse_recipe(
        FAST_FEDMMKT.replace("class-prototypes, params: {steps: 2}", "sd-lora, params: {model: models/sd}")
        .replace("AGGREGATOR", "kd")
        .replace("LOGGERS", "[]"),
        base_dir=tmp_path,
        registry=registry(),
    )
    assert recipe.generator.config.model == str((tmp_path / "models" / "sd").resolve())


# ------------------------------------------------------------------ Build 2: outputs


def test_soft_label_and_metric_checks():
    good = np.array([[0.25, 0.75], [1.0, 0.0]], np.float64)
    assert check_soft_labels(good, (2, 2), "aggregator 'x'").dtype == np.float32
    for bad, reason in (
        (good[:1], "shape"),
        (np.array([[-1.0, 2.0], [0.5, 0.5]]), "not logits"),
        (np.array([[0.5, 0.6], [0.5, 0.5]]), "sum to one"),
        (np.array([[np.nan, 1.0], [0.5, 0.5]]), "NaN"),
    ):
        with pytest.raises(PluginOutputError, match=reason) as info:
            check_soft_labels(bad, (2, 2), "aggregator 'x'")
        assert "aggregator 'x'" in str(info.value)
    assert check_metrics({"a": np.float32(0.5), "b": [np.int64(2)]}, "g") == {"a": 0.5, "b": [2]}
    with pytest.raises(PluginOutputError, match="generator 'g' metric 'loss' is nan"):
        check_metrics({"loss": float("nan")}, "generator 'g'")
    with pytest.raises(PluginOutputError, match="not a JSON value"):
        check_metrics({"x": object()}, "g")


def test_aggregator_returning_logits_stops_the_run_naming_it(tmp_path):
    with pytest.raises(RunFailed, match=r"round 1: aggregator 'raw-logits' returned .*not logits"):
        Runner(fast_recipe(aggregator="raw-logits"), tmp_path / "r").run()


def test_failing_logger_is_recorded_and_the_run_goes_on(tmp_path):
    Exploding.calls = 0
    events = []
    recipe = fast_recipe(loggers="[{name: exploding}, {name: csv}]")
    summary = Runner(recipe, tmp_path / "r", events=lambda e, **d: events.append((e, d))).run()
    assert summary["rounds_completed"] == 2 and Exploding.calls == 1  # switched off after its failure
    (failure,) = summary["logger_failures"]
    assert failure == {
        "logger": "loggers.0",
        "name": "exploding",
        "in": "log_round",
        "reason": "ConnectionError: tracker unreachable",
    }
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["logger_failures"] == [failure]
    assert len((tmp_path / "r" / "metrics.csv").read_text().splitlines()) == 3  # the other logger kept going
    assert "logger 'exploding' (loggers.0) failed in log_round" in (tmp_path / "r" / "log.txt").read_text()
    assert [d["logger"] for e, d in events if e == "logger_failure"] == ["exploding"]


# ------------------------------------------------------------------ Build 3: broken packages


def _broken_package(root: Path) -> dict[str, str]:
    dist = root / "broken_tracker-0.3.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-tracker\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[fedmmkt]\nbroken = broken_tracker_mod\n")
    (root / "broken_tracker_mod.py").write_text("import no_such_dependency_xyz\n")
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "80", "TERM": "dumb"}
    env.pop("FEDMMKT_DISABLE_PLUGIN_AUTOLOAD", None)
    return env


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "fedmmkt_cli.main", *args], capture_output=True, text=True, env=env)


def test_broken_package_warns_and_blocks_only_recipes_that_use_it(tmp_path):
    env = _broken_package(tmp_path / "site")
    listed = _cli(env, "plugins")
    assert listed.returncode == 0, listed.stderr
    assert "warning:" in listed.stderr and "'broken-tracker'" in listed.stderr
    assert "FEDMMKT_DISABLE_PLUGIN_AUTOLOAD=1" in listed.stderr and "no_such_dependency_xyz" in listed.stderr
    # Must show: every name whole in an 80-column terminal (the example package's too)
    lines = listed.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    names = PluginManager().registry
    for entry in names:
        assert any(f" {entry.name} " in line for line in lines), entry.name
    ok = _cli(env, "validate", str(SMOKE))
    assert ok.returncode == 0, ok.stderr
    recipe = tmp_path / "uses_it.yaml"
    recipe.write_text(SMOKE.read_text().replace("- name: console", "- name: broken-logger"))
    refused = _cli(env, "validate", str(recipe))
    assert refused.returncode == 2
    assert "unknown logger 'broken-logger'" in refused.stderr and "'broken-tracker' failed to load" in refused.stderr


# ------------------------------------------------------------------ Build 5: experiment trackers


ROWS = [
    {"round": 1, "client_accuracy_mean": 0.5, "alignment_rate": 0.25, "failures": [], "clients_sampled": [0, 1]},
    {"round": 2, "client_accuracy_mean": 0.75, "alignment_rate": 0.5, "failures": [], "clients_sampled": [0, 1]},
]


def _run_dir_with_grids(tmp_path: Path) -> Path:
    from fedmmkt_plugins.evaluation.sample_grid import save_sample_grid

    run_dir = tmp_path / "run"
    images = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 1), dtype=np.uint8)
    for r in (1, 2):
        save_sample_grid(run_dir / "samples" / f"round_{r:03d}.png", images, np.array([0, 0, 1, 1]), 2)
    return run_dir


def _lifecycle(logger, run_dir: Path, resolved: dict) -> None:
    logger.start(run_dir, resolved)
    for r, row in enumerate(ROWS):
        logger.log_round(r, row)
    logger.finish({"rounds_completed": 2, "client_accuracy_mean": 0.75})


def test_tensorboard_event_files_read_back(tmp_path):
    from fedmmkt_plugins.loggers.tensorboard import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    run_dir = _run_dir_with_grids(tmp_path)
    _lifecycle(TensorBoardLogger(), run_dir, {"name": "t"})
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={IMAGES: 0})
    events.Reload()
    accuracy = events.Scalars("client_accuracy_mean")
    assert [(e.step, e.value) for e in accuracy] == [(1, 0.5), (2, 0.75)]
    assert [e.step for e in events.Images("samples")] == [1, 2]
    assert events.Images("samples")[0].width > 8  # the grid, not one image


def test_mlflow_store_reads_back(tmp_path):
    from fedmmkt_plugins.loggers.mlflow import MLflowConfig, MLflowLogger
    from mlflow.tracking import MlflowClient

    run_dir = _run_dir_with_grids(tmp_path)
    config = MLflowConfig.model_validate({"tracking_uri": "sqlite:///store/mlflow.db"}, context={"base_dir": tmp_path})
    assert config.tracking_uri == f"sqlite:///{(tmp_path / 'store' / 'mlflow.db').resolve()}"
    (tmp_path / "store").mkdir()
    (run_dir / "summary.json").write_text("{}")
    _lifecycle(MLflowLogger(config), run_dir, {"name": "t", "federation": {"rounds": 2}, "clients": [{"name": "cnn"}]})
    client = MlflowClient(tracking_uri=config.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fedmmkt").experiment_id])
    assert run.info.run_name == "t" and run.info.status == "FINISHED"
    assert run.data.params == {"name": "t", "federation.rounds": "2", "clients.0.name": "cnn"}
    history = client.get_metric_history(run.info.run_id, "client_accuracy_mean")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.75)]
    assert run.data.metrics["summary.client_accuracy_mean"] == 0.75
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/round_001.png", "samples/round_002.png"]


def test_missing_tracker_package_is_a_validate_error_with_the_install_hint(monkeypatch):
    import fedmmkt_plugins.loggers.tensorboard as module

    monkeypatch.setattr(module, "missing", lambda *names: ["tensorboard"])
    text = SMOKE.read_text().replace("- name: console", "- name: tensorboard")
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, registry=registry())
    (issue,) = info.value.issues
    assert issue.path == "loggers.0.name" and "pip install 'fedmmkt[tensorboard]'" in issue.message
