"""Suites that run a whole tiny recipe: algorithms and backends."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from ..errors import RecipeError
from ..interfaces import Algorithm
from ..plugins import get_registry
from .base import _ComponentTests

TINY_RECIPE = """\
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
"""The recipe the run suites start from: 3 small CNN clients on digits, 2 rounds, ``local``, no generator."""

TINY_GENERATOR_RECIPE: dict[str, Any] = {
    "data.dataset.params": {"public_fraction": 0.2, "public_style": "inverted"},
    "generator": {
        "name": "sd-lora",
        "params": {
            "pretrain": {"vae_steps": 20, "steps": 30},
            "fine_tune_steps": 3,
            "batch_size": 16,
            "num_inference_steps": 4,
        },
    },
    "alignment_losses": [{"name": "weighted-denoising", "params": {"threshold": 0.3}}],
}
"""What :class:`AlgorithmTests` adds to :data:`TINY_RECIPE` for an algorithm with ``needs_generator``
(when its ``recipe`` is left unset): the built-in tiny Stable-Diffusion-shaped generator, pre-trained on
a public split, and one alignment loss."""

_TINY_RECIPE = TINY_RECIPE  # the earlier private name


def run_tiny_recipe(out_dir, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Run :data:`TINY_RECIPE` (3 clients, 2 rounds, digits) with ``overrides`` (key path -> value, as
    ``--set`` takes them, e.g. ``{"federation.rounds": 3}``); return its ``metrics.jsonl`` rows.

    An override that makes the recipe invalid raises :class:`~fedmmkt_core.errors.RecipeError` listing
    the offending key paths (the tiny recipe's own line numbers are left out: they mean nothing to the
    caller)."""
    import json

    import yaml

    from fedmmkt_core.server.runner import Runner

    from ..recipe import parse_recipe

    settings = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    try:
        recipe = parse_recipe(TINY_RECIPE, overrides=settings)
    except RecipeError as exc:
        issues = [replace(issue, line=None) for issue in exc.issues]
        raise RecipeError(issues, "(the suite's TINY_RECIPE with the overrides given)") from None
    Runner(recipe, out_dir).run()
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert yaml.safe_load((out_dir / "recipe.resolved.yaml").read_text())["fedmmkt"] == 1
    return rows


def _without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in rows]


class AlgorithmTests(_ComponentTests):
    """An algorithm runs rounds on real data, reports accuracy, repeats itself for a seed, and its
    resume state survives a safetensors/JSON round trip.

    Attributes: ``name`` and ``params`` (the algorithm's recipe params), and ``recipe``: what the
    algorithm needs beyond :data:`TINY_RECIPE` (3 CNN clients on digits, 2 rounds, no generator), as
    ``{key path: value}`` overrides like ``--set`` takes, e.g. ``{"federation.sample_fraction": 0.5}``
    or ``{"generator": {"name": ..., "params": ...}, "alignment_losses": [...]}``. Left unset (``None``),
    it is ``{}``, or :data:`TINY_GENERATOR_RECIPE` for an algorithm whose class sets ``needs_generator``.
    A recipe the overrides make invalid fails the tests with an error naming ``recipe`` and the key paths.
    """

    kind = "algorithm"
    recipe: ClassVar[dict[str, Any] | None] = None

    def _overrides(self) -> dict[str, Any]:
        recipe = self.recipe
        where = f"{type(self).__name__}.recipe"
        if recipe is None:
            cls = get_registry().get(self.kind, self.name).cls
            recipe = TINY_GENERATOR_RECIPE if getattr(cls, "needs_generator", False) else {}
        elif not isinstance(recipe, dict) or not all(isinstance(key, str) for key in recipe):
            raise TypeError(
                f"{where} must be a dict of recipe key paths to values (e.g. {{'federation.rounds': 3}}), "
                f"got {recipe!r}"
            )
        if "algorithm" in recipe:
            raise TypeError(f"{where} must not set 'algorithm': the suite sets it from name and params")
        return {"algorithm": {"name": self.name, "params": self.params}, **recipe}

    def _run(self, out_dir) -> list[dict[str, Any]]:
        try:
            return run_tiny_recipe(out_dir, self._overrides())
        except RecipeError as exc:
            state = "unset: " if self.recipe is None else ""
            where = f"(TINY_RECIPE with {type(self).__name__}.recipe, {state}see AlgorithmTests' docstring)"
            raise RecipeError(exc.issues, where) from None

    def test_runs_and_reports_accuracy(self, tmp_path) -> None:
        rows = self._run(tmp_path / "a")
        assert [row["round"] for row in rows] == [1, 2]
        for row in rows:
            assert 0.0 <= row["client_accuracy_min"] <= row["client_accuracy_mean"] <= 1.0
            assert row["failures"] == []
        assert rows[-1]["client_accuracy_mean"] > 0.2  # chance is 0.1

    def test_same_seed_same_metrics(self, tmp_path) -> None:
        first = self._run(tmp_path / "a")
        second = self._run(tmp_path / "b")
        assert _without_timing(first) == _without_timing(second)

    def test_state_round_trips(self, tmp_path) -> None:
        import json

        from ..rundir import load_safetensors, save_safetensors

        self._run(tmp_path / "a")
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
