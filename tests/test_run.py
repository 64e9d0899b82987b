"""End-to-end runs on real data (digits): run directory, learning, determinism, resume, failures."""

import json
from pathlib import Path

import pytest
import yaml
from fedmmkt_cli.main import app
from fedmmkt_example_plugin.softmax_regression import SoftmaxRegressionClient
from typer.testing import CliRunner

from fedmmkt_core.hookspecs import hookimpl
from fedmmkt_core.plugins import PluginManager
from fedmmkt_core.recipe import load_recipe, parse_recipe
from fedmmkt_core.server.runner import RunFailed, Runner

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMOKE = EXAMPLES / "smoke.yaml"
runner = CliRunner()


def without_timing(rows):
    return [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in rows]


def read_rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_recipe_runs_and_clients_learn(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(SMOKE), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("recipe.resolved.yaml", "metrics.jsonl", "summary.json", "log.txt"):
        assert (out / name).is_file(), name
    rows = read_rows(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == len(rows) == 3
    assert rows[-1]["client_accuracy_mean"] > rows[0]["client_accuracy_mean"] + 0.05
    assert summary["client_accuracy_mean"] > 0.4  # chance is 0.1
    for key in ("generator_cas_initial", "generator_cas", "alignment_rate"):  # shares of images
        assert 0 <= summary[key] <= 1, key
    assert 0 < summary["generator_fid"] < float("inf")
    assert (out / "samples" / "round_003.png").is_file()
    assert (out / "checkpoints" / "generator.r3.safetensors").is_file()
    assert summary["bytes_up_per_client_round"] > 0 and summary["wall_seconds"] > 0
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["clients"][0]["params"]["batch_size"] == 32  # defaults filled in
    assert "round 3" in (out / "log.txt").read_text()


def test_same_seed_same_metrics(tmp_path):
    recipe = load_recipe(SMOKE, ["federation.rounds=2"])
    Runner(recipe, tmp_path / "a").run()
    Runner(load_recipe(SMOKE, ["federation.rounds=2"]), tmp_path / "b").run()
    assert without_timing(read_rows(tmp_path / "a")) == without_timing(read_rows(tmp_path / "b"))


def test_the_evaluation_rides_on_the_fit_exchange_and_measures_what_an_evaluate_exchange_would(tmp_path, monkeypatch):
    """FedMMKT's fit message asks each sampled client to evaluate the model it has just trained, so a round
    needs one exchange: only the client left out of the round's sample gets an ``evaluate`` message. Every
    metric (accuracies, bytes) equals that of clients that ignore the request and are all asked apart."""
    overrides = ["federation.rounds=2", "federation.sample_fraction=0.75", "generator.params.fine_tune_steps=5"]

    def run(name):
        evaluated = []

        def events(kind, **data):
            if kind == "phase_start" and data["name"] == "evaluate":
                evaluated.append(data["total"])

        Runner(load_recipe(SMOKE, overrides), tmp_path / name, events=events).run()
        return without_timing(read_rows(tmp_path / name)), evaluated

    folded, folded_evaluations = run("folded")
    monkeypatch.setattr("fedmmkt_core.client.runtime.EVALUATE_AFTER_FIT", "a key no message carries")
    apart, apart_evaluations = run("apart")
    assert folded_evaluations == [1, 1]  # per round: the one client not sampled
    assert apart_evaluations == [4, 4]
    assert folded == apart
    assert all(len(row["client_accuracy"]) == 4 and len(row["clients_sampled"]) == 3 for row in folded)


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    overrides = ["federation.rounds=4", "algorithm={name: local}", "data.partitioner.params.alpha=0.3"]
    Runner(load_recipe(SMOKE, overrides), tmp_path / "full").run()

    def stop_in_round_3(event, **data):
        if event == "phase_end" and data["name"] == "fit" and stop_in_round_3.round == 3:
            raise KeyboardInterrupt
        if event == "round_start":
            stop_in_round_3.round = data["round"]

    stop_in_round_3.round = 0
    with pytest.raises(KeyboardInterrupt):
        Runner(load_recipe(SMOKE, overrides), tmp_path / "cut", events=stop_in_round_3).run()
    assert len(read_rows(tmp_path / "cut")) == 2
    result = runner.invoke(
        app,
        ["run", str(SMOKE), *sum((["--set", o] for o in overrides), []), "--resume", str(tmp_path / "cut")],
    )
    assert result.exit_code == 0, result.output
    assert without_timing(read_rows(tmp_path / "cut")) == without_timing(read_rows(tmp_path / "full"))


def test_resume_refuses_a_different_recipe(tmp_path):
    Runner(load_recipe(SMOKE, ["federation.rounds=1"]), tmp_path / "r").run()
    result = runner.invoke(app, ["run", str(SMOKE), "--resume", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "recipe differs" in result.output


def test_existing_run_directory_is_not_overwritten(tmp_path):
    Runner(load_recipe(SMOKE, ["federation.rounds=1"]), tmp_path / "r").run()
    result = runner.invoke(app, ["run", str(SMOKE), "--set", "federation.rounds=1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "already holds a run" in result.output


class CrashingClient(SoftmaxRegressionClient):
    def fit(self, train, distill, seed):
        raise RuntimeError("disk full on the client")


class CrashPlugin:
    @hookimpl
    def register_client_models(self, register):
        register("crashing", CrashingClient)


FLAKY = """\
fedmmkt: 1
seed: 1
data: {dataset: {name: digits}, partitioner: {name: iid}}
clients:
  - {name: softmax-regression, count: 2}
  - {name: crashing}
federation: {rounds: 2, min_clients: MIN}
algorithm: {name: local}
loggers: []
"""


def flaky_recipe(min_clients: int):
    registry = PluginManager().add_plugin(CrashPlugin(), package="test-crash")
    return parse_recipe(FLAKY.replace("MIN", str(min_clients)), registry=registry)


def test_crashed_client_is_reported_and_round_goes_on(tmp_path):
    summary = Runner(flaky_recipe(2), tmp_path / "r").run()
    rows = read_rows(tmp_path / "r")
    assert summary["rounds_completed"] == 2
    assert rows[0]["failures"] == [{"client": 2, "phase": "fit", "reason": "RuntimeError: disk full on the client"}]


def test_too_few_clients_fails_the_run_clearly(tmp_path):
    with pytest.raises(RunFailed, match="only 2 of 3 clients .* min_clients=3 .*disk full"):
        Runner(flaky_recipe(3), tmp_path / "r").run()


def test_external_plugin_runs_in_a_recipe(tmp_path):
    overrides = [
        "clients.0.name=softmax-regression",
        "clients.0.params={epochs: 3}",
        "algorithm={name: local}",
        "federation.rounds=2",
    ]
    result = runner.invoke(
        app, ["run", str(SMOKE), *sum((["--set", o] for o in overrides), []), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path)
    assert rows[-1]["client_accuracy_mean"] > 0.3
