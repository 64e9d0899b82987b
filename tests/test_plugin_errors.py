"""Errors a plugin author can act on: a plugin that raises during a run ends it with one line naming the
plugin, its package, the round, the phase and the exception (exit 1; the traceback in log.txt, on the
terminal only with --debug); a declared capability that is a stub is named; a misspelt hook blocks the
recipes that use its package."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fedmmkt_cli.main import app
from fedmmkt_example_plugin.class_prototypes import ClassPrototypesGenerator
from fedmmkt_example_plugin.softmax_regression import SoftmaxRegressionClient
from fedmmkt_plugins.aggregators.kd import KDAggregator
from fedmmkt_plugins.algorithms.local import LocalOnly
from fedmmkt_plugins.backends.inprocess import InProcessBackend
from fedmmkt_plugins.datasets.digits import DigitsDataset
from fedmmkt_plugins.losses.weighted_denoising import WeightedDenoisingLoss
from fedmmkt_plugins.partitioners.iid import IIDPartitioner
from typer.testing import CliRunner

import fedmmkt_core.plugins as plugins_module
from fedmmkt_core.errors import RecipeError
from fedmmkt_core.hookspecs import hookimpl
from fedmmkt_core.plugins import PluginManager
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.server.runner import PluginCrashed, Runner

cli = CliRunner()

RECIPE = """\
fedmmkt: 1
seed: 0
data: {dataset: {name: DATASET}, partitioner: {name: PARTITIONER}}
clients: [{name: CLIENT, count: 2, params: {epochs: 1}}]
federation: {rounds: 2}
algorithm: {name: fedmmkt, params: {samples_per_class: 3, evaluate_generator: false}}
aggregator: {name: AGGREGATOR}
generator: {name: GENERATOR, params: {steps: 2}}
alignment_losses: [{name: LOSS, params: {threshold: 0.0}}]
backend: {name: BACKEND}
loggers: []
"""
DEFAULTS = {
    "DATASET": "digits",
    "PARTITIONER": "iid",
    "CLIENT": "softmax-regression",
    "AGGREGATOR": "kd",
    "GENERATOR": "class-prototypes",
    "LOSS": "weighted-denoising",
    "BACKEND": "inprocess",
}


class BoomDataset(DigitsDataset):
    def load(self, seed):
        raise RuntimeError("dataset boom")


class BoomPartitioner(IIDPartitioner):
    def partition(self, labels, num_clients, rng):
        raise ValueError("partitioner boom")


class BoomClient(SoftmaxRegressionClient):
    def fit(self, train, distill, seed):
        raise RuntimeError("client boom")


class BoomAggregator(KDAggregator):
    def aggregate(self, round_index, replies):
        return _helper("aggregator boom")  # a helper function of the plugin's is still the plugin


class BoomGenerator(ClassPrototypesGenerator):
    def generate(self, prompts, seeds):
        raise RuntimeError("generator boom")


class BoomLoss(WeightedDenoisingLoss):
    def compute(self, generator, batch, seed):
        raise FloatingPointError("loss boom")


class BoomBackend(InProcessBackend):
    def exchange(self, messages, round_index, progress=None):
        raise ConnectionError("backend boom")


class BoomAlgorithm(LocalOnly):
    def run_round(self, ctx, round_index):
        raise KeyError("algorithm boom")


class StubBaseGenerator(ClassPrototypesGenerator):
    """Declares generate_base (overrides it) but its body only raises: validate refuses it."""

    def generate_base(self, prompts, seeds):
        """Not there yet."""
        raise NotImplementedError("no base model yet")


class LateStubGenerator(ClassPrototypesGenerator):
    """Declares generate_base, and finds out at run time that it cannot."""

    def generate_base(self, prompts, seeds):
        if len(prompts) >= 0:
            raise NotImplementedError("this base model is not loaded")
        return self.generate(prompts, seeds)


def _helper(message):
    raise RuntimeError(message)


class BoomPlugin:
    @hookimpl
    def register_datasets(self, register):
        register("boom", BoomDataset)

    @hookimpl
    def register_partitioners(self, register):
        register("boom", BoomPartitioner)

    @hookimpl
    def register_client_models(self, register):
        register("boom", BoomClient)

    @hookimpl
    def register_aggregators(self, register):
        register("boom", BoomAggregator)

    @hookimpl
    def register_generators(self, register):
        register("boom", BoomGenerator)
        register("stub-base", StubBaseGenerator)
        register("late-stub", LateStubGenerator)

    @hookimpl
    def register_alignment_losses(self, register):
        register("boom", BoomLoss)

    @hookimpl
    def register_backends(self, register):
        register("boom", BoomBackend)

    @hookimpl
    def register_algorithms(self, register):
        register("boom", BoomAlgorithm)


@pytest.fixture
def boom_registry(monkeypatch):
    """The process-wide registry with the boom plugins (what `fedmmkt run` looks names up in)."""
    manager = PluginManager()
    manager.add_plugin(BoomPlugin(), package="boom-pkg")
    monkeypatch.setattr(plugins_module, "_default", manager)
    return manager.registry


def recipe_text(**names: str) -> str:
    text = RECIPE
    for key, value in {**DEFAULTS, **{k.upper(): v for k, v in names.items()}}.items():
        text = text.replace(key, value)
    return text


def write_recipe(tmp_path: Path, **names: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(**names))
    return path


CASES = {
    "dataset": ({"dataset": "boom"}, "set-up, phase 'load data'", "RuntimeError: dataset boom"),
    "partitioner": ({"partitioner": "boom"}, "set-up, phase 'backend start'", "ValueError: partitioner boom"),
    "aggregator": ({"aggregator": "boom"}, "round 1, phase 'aggregate'", "RuntimeError: aggregator boom"),
    "generator": ({"generator": "boom"}, "round 1, phase 'synthesize'", "RuntimeError: generator boom"),
    "alignment loss": ({"loss": "boom"}, "round 1, phase 'generator_update'", "FloatingPointError: loss boom"),
    "backend": ({"backend": "boom"}, "round 1, phase '", "ConnectionError: backend boom"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_a_raising_plugin_is_one_line_naming_it(tmp_path, boom_registry, kind):
    names, where, raised = CASES[kind]
    out = tmp_path / "run"
    result = cli.invoke(app, ["run", str(write_recipe(tmp_path, **names)), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: run failed: " + where), line
    assert f"{kind} 'boom' (package 'boom-pkg') raised {raised}" in line
    log = (out / "log.txt").read_text()
    assert "Traceback" in log and raised in log
    assert not (out / "metrics.jsonl").exists()  # nothing that looks like a result


def test_an_algorithm_that_raises_is_named(tmp_path, boom_registry):
    recipe = parse_recipe(recipe_text() + "", registry=boom_registry, overrides=["algorithm={name: boom}"])
    with pytest.raises(PluginCrashed) as info:
        Runner(recipe, tmp_path / "run").run()
    message = str(info.value)
    assert message.startswith("round 1, phase 'run_round': algorithm 'boom' (package 'boom-pkg') raised KeyError")
    assert isinstance(info.value.__cause__, KeyError)  # chained: --debug shows the original traceback


def test_a_built_in_plugin_is_named_with_package_fedmmkt(tmp_path, boom_registry, monkeypatch):
    def broken(self, round_index, replies):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(KDAggregator, "aggregate", broken)
    with pytest.raises(PluginCrashed, match=r"round 1, phase 'aggregate': aggregator 'kd' \(package 'fedmmkt'\)"):
        Runner(parse_recipe(recipe_text(), registry=boom_registry), tmp_path / "run").run()


def test_a_crashing_client_model_stays_a_client_failure(tmp_path, boom_registry):
    """Client-side exceptions are recorded failures; with every client down the round fails in one line,
    and log.txt names the client model with the traceback."""
    out = tmp_path / "run"
    result = cli.invoke(app, ["run", str(write_recipe(tmp_path, client="boom")), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "phase 'fit'" in errors[0] and "RuntimeError: client boom" in errors[0], errors
    log = (out / "log.txt").read_text()
    assert "client model 'boom' (package 'boom-pkg') raised RuntimeError" in log and "Traceback" in log


def test_a_logger_that_raises_stays_non_fatal(tmp_path, boom_registry):
    from test_plugin_contract import ContractPlugin

    plugins_module._default.add_plugin(ContractPlugin(), package="contract-pkg")
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text().replace("loggers: []", "loggers: [{name: exploding}]"))
    result = cli.invoke(app, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "logger 'exploding' (loggers.0) failed in log_round" in " ".join(result.stderr.split())


# ------------------------------------------------------------------ declared capabilities


def test_a_stub_capability_is_refused_by_validate(tmp_path, boom_registry):
    path = write_recipe(tmp_path, generator="stub-base")
    result = cli.invoke(app, ["validate", str(path), "--set", "algorithm.params.base_fraction=0.5"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "algorithm.params.base_fraction" in text
    assert "generator 'stub-base' (boom-pkg) declares (it overrides generate_base) but does not implement" in text
    assert "Traceback" not in result.output
    assert cli.invoke(app, ["validate", str(path)]).exit_code == 0  # nothing needs generate_base


def test_a_capability_that_raises_at_run_time_is_named(tmp_path, boom_registry):
    recipe = parse_recipe(
        recipe_text(generator="late-stub"), registry=boom_registry, overrides=["algorithm.params.base_fraction=0.5"]
    )
    with pytest.raises(PluginCrashed) as info:
        Runner(recipe, tmp_path / "run").run()
    message = str(info.value)
    assert "generator 'late-stub' (package 'boom-pkg') declares capability 'generate_base'" in message
    assert "raised NotImplementedError: this base model is not loaded" in message


# ------------------------------------------------------------------ the terminal, --debug


MODULE = """\
from fedmmkt_core.hookspecs import hookimpl
from fedmmkt_plugins.aggregators.kd import KDAggregator


class Boom(KDAggregator):
    def aggregate(self, round_index, replies):
        raise RuntimeError("aggregator boom")


@hookimpl
def register_aggregators(register):
    register("boom", Boom)
"""


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "boom_aggregator_mod.py").write_text(MODULE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FEDMMKT_PLUGINS": "boom_aggregator_mod", "COLUMNS": "300"}
    command = [sys.executable, "-m", "fedmmkt_cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)


def test_the_terminal_gets_one_line_and_debug_the_traceback(tmp_path):
    path = write_recipe(tmp_path, aggregator="boom")
    quiet = _cli(tmp_path, "run", str(path), "--out", str(tmp_path / "a"))
    assert quiet.returncode == 1, quiet.stderr
    lines = quiet.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in quiet.stderr, quiet.stderr
    assert "round 1, phase 'aggregate': aggregator 'boom' (package 'boom_aggregator_mod')" in lines[0]
    assert "Traceback" in (tmp_path / "a" / "log.txt").read_text()
    loud = _cli(tmp_path, "--debug", "run", str(path), "--out", str(tmp_path / "b"))
    assert loud.returncode == 1
    assert "Traceback" in loud.stderr and 'raise RuntimeError("aggregator boom")' in loud.stderr


# ------------------------------------------------------------------ misspelt hooks


TYPO_MODULE = """\
from fedmmkt_core.hookspecs import hookimpl
from fedmmkt_plugins.aggregators.kd import KDAggregator
from fedmmkt_plugins.algorithms.local import LocalOnly


class TypoAggregator(KDAggregator):
    pass


class TypoAlgorithm(LocalOnly):
    pass


@hookimpl
def register_aggregators(register):
    register("typo-kd", TypoAggregator)


@hookimpl
def register_algoritms(register):
    register("typo-local", TypoAlgorithm)
"""


def _typo_package(root: Path, module: str = "typo_plugin_mod") -> None:
    dist = root / f"{module.replace('_', '-')}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[fedmmkt]\ntypo = {module}\n")
    (root / f"{module}.py").write_text(TYPO_MODULE)


def test_a_misspelt_hook_blocks_only_the_recipes_that_use_its_package(tmp_path, monkeypatch):
    _typo_package(tmp_path / "site", "typo_inproc_mod")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("FEDMMKT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    with pytest.warns(UserWarning, match=r"register_algoritms.*did you mean 'register_algorithms'"):
        registry = PluginManager().registry
    assert registry.get("aggregator", "typo-kd").package == "typo-inproc-mod"  # listed with its package
    parse_recipe(recipe_text(), registry=registry)  # a recipe that does not use it
    for override, key in (("aggregator={name: typo-kd}", "aggregator.name"), ("algorithm={name: typo-local}", None)):
        with pytest.raises(RecipeError) as info:
            parse_recipe(recipe_text(), registry=registry, overrides=[override])
        message = " ".join(str(info.value).split())
        assert "hook 'register_algoritms', which does not exist — did you mean 'register_algorithms'?" in message
        assert "'typo-inproc-mod'" in message
        if key:
            assert key in message


def test_a_misspelt_hook_on_the_command_line(tmp_path):
    _typo_package(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "COLUMNS": "300", "TERM": "dumb"}
    env.pop("FEDMMKT_DISABLE_PLUGIN_AUTOLOAD", None)
    ok_path, bad_path = tmp_path / "ok.yaml", tmp_path / "bad.yaml"
    ok_path.write_text(recipe_text())
    bad_path.write_text(recipe_text(aggregator="typo-kd"))
    run = [sys.executable, "-m", "fedmmkt_cli.main", "validate"]
    ok = subprocess.run([*run, str(ok_path)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "warning:" in ok.stderr and "register_algoritms" in ok.stderr
    bad = subprocess.run([*run, str(bad_path)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2, bad.stderr
    text = " ".join(bad.stderr.split())
    assert "aggregator.name: aggregator 'typo-kd' is registered by package 'typo-plugin-mod'" in text
    assert "did you mean 'register_algorithms'?" in text and "Traceback" not in bad.stderr
    listed = subprocess.run([*run[:-1], "plugins"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0 and "typo-kd" in listed.stdout and "blocked: typo-plugin-mod" in listed.stdout
