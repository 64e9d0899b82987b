"""Suites that run a whole tiny recipe: algorithms and backends."""

from __future__ import annotations

from typing import Any, ClassVar

from ..interfaces import Algorithm
from .base import _ComponentTests

_TINY_RECIPE = """\
fedmmkt: 1
name: conformance
seed: 3
data:
  dataset: {name: digits}
  partitioner: {name: dirichlet, params: {alpha: 1.0}}
clients:
  - {name: cnn, count: 3, params: {channels: [8, 16], hidden: 32, lr: 0.003}}
federation: {rounds: 2}
algorithm: {name: local}
loggers: []
"""


def run_tiny_recipe(out_dir, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Run a 3-client, 2-round digits recipe with ``overrides`` (key path -> value); return its rows."""
    import json

    import yaml

    from fedmmkt_core.server.runner import Runner

    from ..recipe import parse_recipe

    settings = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    recipe = parse_recipe(_TINY_RECIPE, overrides=settings)
    Runner(recipe, out_dir).run()
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert yaml.safe_load((out_dir / "recipe.resolved.yaml").read_text())["fedmmkt"] == 1
    return rows


def _without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in rows]


class AlgorithmTests(_ComponentTests):
    """An algorithm runs rounds on real data, reports accuracy, repeats itself for a seed, and its
    resume state survives a safetensors/JSON round trip. Set ``recipe`` for extra keys it needs."""

    kind = "algorithm"
    recipe: ClassVar[dict[str, Any]] = {}

    def _overrides(self) -> dict[str, Any]:
        return {"algorithm": {"name": self.name, "params": self.params}, **self.recipe}

    def test_runs_and_reports_accuracy(self, tmp_path) -> None:
        rows = run_tiny_recipe(tmp_path / "a", self._overrides())
        assert [row["round"] for row in rows] == [1, 2]
        for row in rows:
            assert 0.0 <= row["client_accuracy_min"] <= row["client_accuracy_mean"] <= 1.0
            assert row["failures"] == []
        assert rows[-1]["client_accuracy_mean"] > 0.2  # chance is 0.1

    def test_same_seed_same_metrics(self, tmp_path) -> None:
        first = run_tiny_recipe(tmp_path / "a", self._overrides())
        second = run_tiny_recipe(tmp_path / "b", self._overrides())
        assert _without_timing(first) == _without_timing(second)

    def test_state_round_trips(self, tmp_path) -> None:
        import json

        from ..rundir import load_safetensors, save_safetensors

        run_tiny_recipe(tmp_path / "a", self._overrides())
        state = json.loads((tmp_path / "a" / "checkpoints" / "state.json").read_text())
        assert state["rounds_completed"] == 2
        arrays = load_safetensors(tmp_path / "a" / "checkpoints" / state["algorithm_arrays"])
        algorithm = self.make()
        assert isinstance(algorithm, Algorithm)
        algorithm.load_state(state["algorithm"], arrays)
        values, again = algorithm.state()
        json.dumps(values)
        save_safetensors(tmp_path / "again.safetensors", again)
        assert set(again) == set(arrays)


class BackendTests(_ComponentTests):
    """A backend delivers the same messages to the same client code as the in-process backend, so
    the same recipe gives the same metrics (set ``tolerance`` where it cannot be bit-identical)."""

    kind = "backend"
    tolerance: ClassVar[float] = 0.0

    def test_matches_the_in_process_backend(self, tmp_path) -> None:
        reference = run_tiny_recipe(tmp_path / "ref", {})
        rows = run_tiny_recipe(tmp_path / "b", {"backend": {"name": self.name, "params": self.params}})
        for ours, theirs in zip(rows, reference, strict=True):
            assert ours["bytes_up_total"] == theirs["bytes_up_total"]
            assert ours["bytes_down_total"] == theirs["bytes_down_total"]
            assert abs(ours["client_accuracy_mean"] - theirs["client_accuracy_mean"]) <= self.tolerance
