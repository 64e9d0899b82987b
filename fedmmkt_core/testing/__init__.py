"""Conformance test suites for plugins. Subclass one per component and set its attributes::

    from fedmmkt_core.testing import ClientModelTests

    class TestMyModel(ClientModelTests):
        name = "my-model"            # registered name (checked through the plugin registry)
        params = {"width": 8}       # recipe params for a tiny, CPU-fast instance

pytest collects the inherited ``test_*`` methods. Everything runs on a CPU on real data (a slice of
scikit-learn's digits), so the suites fit in CI.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from ..data import DistillSet, ImageSet, TaskSpec
from ..errors import ClientFailure, UserError
from ..interfaces import (
    Aggregator,
    Algorithm,
    AlignmentBatch,
    AlignmentLoss,
    ClientModel,
    ClientReply,
    Component,
    Dataset,
    Generator,
    Logger,
    Partitioner,
)
from ..plugins import get_registry

__all__ = [
    "AggregatorTests",
    "AlgorithmTests",
    "AlignmentLossTests",
    "BackendTests",
    "ClientModelTests",
    "DatasetTests",
    "GeneratorTests",
    "LoggerTests",
    "PartitionerTests",
    "digits_sample",
]


def digits_sample(count: int = 300, seed: int = 0) -> tuple[ImageSet, TaskSpec]:
    """``count`` real digits images (uint8 8x8x1) and their task spec."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(digits.target))[:count]
    images = np.round(digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    names = tuple(str(i) for i in range(10))
    return ImageSet(images, digits.target[idx]), TaskSpec(class_names=names, image_size=8, channels=1)


class _ComponentTests:
    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}

    def make(self) -> Component:
        registration = get_registry().get(self.kind, self.name)
        cls = registration.cls
        return cls(cls.Config.model_validate(self.params))

    def test_registered_under_its_kind(self) -> None:
        registration = get_registry().get(self.kind, self.name)
        assert registration.kind == self.kind
        assert registration.package

    def test_config_rejects_unknown_keys(self) -> None:
        from pydantic import ValidationError

        cls = get_registry().get(self.kind, self.name).cls
        with pytest.raises(ValidationError) as info:
            cls.Config.model_validate({**self.params, "no_such_setting_xyz": 1})
        assert info.value.errors()[0]["type"] == "extra_forbidden"

    def test_config_round_trips_through_json(self) -> None:
        cls = get_registry().get(self.kind, self.name).cls
        config = cls.Config.model_validate(self.params)
        assert cls.Config.model_validate_json(config.model_dump_json()) == config


class ClientModelTests(_ComponentTests):
    """A client model builds, predicts, learns on real data, and restores its weights exactly."""

    kind = "client_model"
    train_rounds: ClassVar[int] = 3

    def built(self, seed: int = 0) -> tuple[ClientModel, ImageSet, TaskSpec]:
        data, task = digits_sample()
        model = self.make()
        assert isinstance(model, ClientModel)
        model.build(task, seed=seed)
        return model, data, task

    def test_predict_logits_shape_and_dtype(self) -> None:
        model, data, task = self.built()
        logits = model.predict_logits(data.images[:7])
        assert logits.shape == (7, task.num_classes)
        assert logits.dtype == np.float32
        assert np.isfinite(logits).all()

    def test_training_beats_chance_and_lowers_loss(self) -> None:
        model, data, task = self.built()
        train, held = data.subset(range(200)), data.subset(range(200, 300))
        losses = [model.fit(train, None, seed=r)["loss"] for r in range(self.train_rounds)]
        assert losses[-1] < losses[0]
        accuracy = (model.predict_logits(held.images).argmax(1) == held.labels).mean()
        assert accuracy > 2.0 / task.num_classes

    def test_fit_with_distillation(self) -> None:
        model, data, task = self.built()
        soft = np.full((20, task.num_classes), 1.0 / task.num_classes, dtype=np.float32)
        metrics = model.fit(data.subset(range(50)), DistillSet(data.images[50:70], soft, 1.0, 2.0), seed=0)
        assert np.isfinite(metrics["loss"])

    def test_weights_round_trip_restores_predictions(self) -> None:
        model, data, task = self.built(seed=1)
        model.fit(data.subset(range(100)), None, seed=0)
        other = self.make()
        assert isinstance(other, ClientModel)
        other.build(task, seed=2)
        other.set_weights(model.get_weights())
        np.testing.assert_allclose(other.predict_logits(data.images[:20]), model.predict_logits(data.images[:20]))

    def test_weights_are_numpy_and_mismatch_is_rejected(self) -> None:
        model, _, _ = self.built()
        weights = model.get_weights()
        assert weights and all(isinstance(v, np.ndarray) for v in weights.values())
        with pytest.raises(Exception):  # noqa: B017 - any clear error
            model.set_weights({**weights, "unexpected.tensor": np.zeros(3, dtype=np.float32)})

    def test_same_seed_same_training(self) -> None:
        results = []
        for _ in range(2):
            model, data, _ = self.built(seed=3)
            model.fit(data.subset(range(100)), None, seed=4)
            results.append(model.predict_logits(data.images[:10]))
        np.testing.assert_array_equal(results[0], results[1])


class AggregatorTests(_ComponentTests):
    """An aggregator returns row-stochastic soft labels and refuses malformed replies."""

    kind = "aggregator"

    def replies(self, seed: int = 0, clients: int = 4, samples: int = 6, classes: int = 3) -> list[ClientReply]:
        rng = np.random.default_rng(seed)
        return [
            ClientReply(k, rng.normal(size=(samples, classes)).astype(np.float32), 10 * (k + 1), np.full(classes, 5))
            for k in range(clients)
        ]

    def test_output_is_row_stochastic(self) -> None:
        aggregator = self.make()
        assert isinstance(aggregator, Aggregator)
        q = aggregator.aggregate(0, self.replies())
        assert q.shape == (6, 3)
        assert (q >= 0).all()
        np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)

    def test_identical_clients_agree_with_each_one(self) -> None:
        aggregator = self.make()
        one = self.replies(clients=1)[0]
        copies = [ClientReply(k, one.logits.copy(), 10, np.full(3, 5)) for k in range(3)]
        q = aggregator.aggregate(0, copies)
        assert (q.argmax(axis=1) == one.logits.argmax(axis=1)).all()

    def test_deterministic(self) -> None:
        aggregator = self.make()
        np.testing.assert_array_equal(aggregator.aggregate(1, self.replies()), aggregator.aggregate(1, self.replies()))

    def test_rejects_non_finite_or_misshaped_logits(self) -> None:
        aggregator = self.make()
        bad = self.replies()
        bad[1].logits[0, 0] = np.nan
        with pytest.raises((ClientFailure, ValueError)):
            aggregator.aggregate(0, bad)
        odd = self.replies()
        odd[2] = ClientReply(2, np.zeros((5, 3), dtype=np.float32), 10)
        with pytest.raises((ClientFailure, ValueError)):
            aggregator.aggregate(0, odd)


class PartitionerTests(_ComponentTests):
    """A partitioner gives every client samples, no sample twice, and repeats itself for a seed."""

    kind = "partitioner"

    def test_disjoint_and_non_empty(self) -> None:
        partitioner = self.make()
        assert isinstance(partitioner, Partitioner)
        labels = digits_sample(400)[0].labels
        parts = partitioner.checked_partition(labels, 5, np.random.default_rng(0))
        assert len(parts) == 5
        joined = np.concatenate(parts)
        assert len(np.unique(joined)) == len(joined)
        assert all(len(p) > 0 for p in parts)

    def test_same_seed_same_partition(self) -> None:
        partitioner = self.make()
        assert isinstance(partitioner, Partitioner)
        labels = digits_sample(400)[0].labels
        first = partitioner.checked_partition(labels, 4, np.random.default_rng(7))
        second = partitioner.checked_partition(labels, 4, np.random.default_rng(7))
        assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))

    def test_more_clients_than_samples_is_a_clear_error(self) -> None:
        from ..errors import DataError

        partitioner = self.make()
        assert isinstance(partitioner, Partitioner)
        with pytest.raises(DataError):
            partitioner.checked_partition(np.arange(3) % 2, 10, np.random.default_rng(0))


class DatasetTests(_ComponentTests):
    """A dataset yields uint8 images, disjoint splits and the same splits for the same seed."""

    kind = "dataset"

    def test_splits_are_well_formed_and_deterministic(self) -> None:
        dataset = self.make()
        assert isinstance(dataset, Dataset)
        first, second = dataset.load(seed=0), dataset.load(seed=0)
        task = first.task
        for split in (first.train, first.test):
            assert split.images.dtype == np.uint8
            assert split.images.shape[1:] == (task.image_size, task.image_size, task.channels)
            assert split.labels.min() >= 0 and split.labels.max() < task.num_classes
        np.testing.assert_array_equal(first.train.labels, second.train.labels)
        np.testing.assert_array_equal(first.test.images, second.test.images)


class LoggerTests(_ComponentTests):
    """A logger accepts a run's lifecycle without error."""

    kind = "logger"

    def test_lifecycle(self, tmp_path) -> None:
        logger = self.make()
        assert isinstance(logger, Logger)
        logger.start(tmp_path, {"federation": {"rounds": 2}})
        for r in range(2):
            logger.log_round(
                r,
                {
                    "round": r + 1,
                    "client_accuracy_mean": 0.5,
                    "client_accuracy_min": 0.4,
                    "bytes_up_per_client": 10.0,
                    "bytes_down_per_client": 20.0,
                    "failures": [],
                    "seconds_round": 0.1,
                },
            )
        logger.finish({"rounds_completed": 2, "wall_seconds": 0.2})


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

    from ..recipe import parse_recipe
    from ..runner import Runner

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


def tiny_generator_task(count: int = 200, seed: int = 0) -> tuple[ImageSet, TaskSpec]:
    """A public split for generator tests: real digits with captions from a template."""
    import dataclasses

    data, task = digits_sample(count, seed)
    task = dataclasses.replace(task, caption_template="a photo of the digit {name}")
    captions = [task.prompt(int(y)) for y in data.labels]
    return ImageSet(data.images, data.labels, captions), task


class GeneratorTests(_ComponentTests):
    """A generator builds offline, generates reproducible uint8 images at the task's size, trains its
    adapter with an alignment loss, and restores it from its own file to give identical images.

    ``loss`` names the registered alignment loss used for fine-tuning (with its params)."""

    kind = "generator"
    loss: ClassVar[tuple[str, dict[str, Any]]] = ("weighted-denoising", {"threshold": 0.0})

    def built(self, tmp_path) -> tuple[Generator, TaskSpec]:
        import os
        from pathlib import Path

        public, task = tiny_generator_task()
        generator = self.make()
        assert isinstance(generator, Generator)
        cache = Path(os.environ.get("FEDMMKT_CACHE", tmp_path / "cache"))
        generator.build(task, seed=0, cache_dir=cache, public=public)
        return generator, task

    def _batch(self, generator: Generator, task: TaskSpec) -> AlignmentBatch:
        class_ids = np.repeat(np.arange(task.num_classes), 4)
        prompts = [task.prompt(int(c)) for c in class_ids]
        images = generator.generate(prompts, list(range(len(prompts))))
        soft = np.eye(task.num_classes, dtype=np.float32)[class_ids]
        return AlignmentBatch(images, prompts, class_ids, soft, [task.prompt(c) for c in range(task.num_classes)])

    def _loss(self) -> AlignmentLoss:
        name, params = self.loss
        cls = get_registry().get("alignment_loss", name).cls
        loss = cls(cls.Config.model_validate(params))
        assert isinstance(loss, AlignmentLoss)
        loss.registered_name = name
        return loss

    def test_declared_capabilities_work(self, tmp_path) -> None:
        """What :meth:`Generator.capabilities` declares (and ``fedmmkt validate`` trusts) really works."""
        generator, task = self.built(tmp_path)
        capabilities = type(generator).capabilities()
        assert capabilities <= set(Generator.OPTIONAL)
        prompts = [task.prompt(c) for c in (0, 1)]
        if "generate_base" in capabilities:
            images = generator.generate_base(prompts, [1, 2])
            assert images.dtype == np.uint8
            assert images.shape == (2, task.image_size, task.image_size, task.channels)
            np.testing.assert_array_equal(images, generator.generate_base(prompts, [1, 2]))
        if "denoise" in capabilities:
            batch = self._batch(generator, task).subset(np.arange(4))
            step = generator.denoise(batch, seed=5)
            assert tuple(step.per_sample_loss.shape) == (4,) and tuple(step.signal_weight.shape) == (4,)
            assert generator.denoise(batch, seed=5) is step, "the step must be cached for the losses to share"
            predicted = step.predicted_images
            assert tuple(predicted.shape) == (4, task.channels, task.image_size, task.image_size)

    def test_generates_reproducible_images_at_the_task_size(self, tmp_path) -> None:
        generator, task = self.built(tmp_path)
        prompts = [task.prompt(c) for c in (0, 1, 2, 3)]
        images = generator.generate(prompts, [10, 11, 12, 13])
        assert images.dtype == np.uint8
        assert images.shape == (4, task.image_size, task.image_size, task.channels)
        again = generator.generate(prompts[1:3], [11, 12])
        np.testing.assert_array_equal(again, images[1:3])
        other = generator.generate(prompts[1:3], [111, 112])
        assert not np.array_equal(other, images[1:3])
        assert generator.generate([], []).shape[0] == 0

    def test_adapter_trains_and_round_trips_exactly(self, tmp_path) -> None:
        generator, task = self.built(tmp_path)
        batch = self._batch(generator, task)
        probe_prompts, probe_seeds = batch.prompts[:8], list(range(100, 108))
        before = generator.generate(probe_prompts, probe_seeds)
        metrics = generator.fine_tune(batch, [(self._loss(), 1.0)], seed=0)
        assert all(np.isfinite(v) for v in metrics.values())
        assert f"loss_{self.loss[0]}" in metrics, "report each loss as loss_<registered name>"
        after = generator.generate(probe_prompts, probe_seeds)
        assert not np.array_equal(before, after), "fine-tuning did not change the adapter"
        path = tmp_path / "adapter.safetensors"
        generator.save_adapter(path)
        fresh, _ = self.built(tmp_path)
        np.testing.assert_array_equal(fresh.generate(probe_prompts, probe_seeds), before)
        fresh.load_adapter(path)
        np.testing.assert_array_equal(fresh.generate(probe_prompts, probe_seeds), after)

    def test_corrupt_adapter_file_is_a_clear_error(self, tmp_path) -> None:
        generator, _ = self.built(tmp_path)
        path = tmp_path / "adapter.safetensors"
        generator.save_adapter(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(UserError, match="adapter.safetensors"):
            generator.load_adapter(path)


class AlignmentLossTests(_ComponentTests):
    """An alignment loss gives a finite scalar with gradient (or ``None`` when nothing concerns it),
    marks the samples it uses, and moves a real generator's adapter. ``generator`` is the registered
    generator (name, params) to test against; ``soft_labels`` picks the verdict its batch carries:
    "agree" (clients confirm every prompt) or "disagree" (they see the next class)."""

    kind = "alignment_loss"
    generator: ClassVar[tuple[str, dict[str, Any]]] = (
        "sd-lora",
        {"pretrain": {"vae_steps": 20, "steps": 30}, "fine_tune_steps": 2, "batch_size": 16},
    )
    soft_labels: ClassVar[str] = "agree"

    def _setup(self, tmp_path) -> tuple[Generator, AlignmentBatch, AlignmentLoss]:
        import os
        from pathlib import Path

        public, task = tiny_generator_task()
        name, params = self.generator
        cls = get_registry().get("generator", name).cls
        generator = cls(cls.Config.model_validate(params))
        generator.build(task, 0, Path(os.environ.get("FEDMMKT_CACHE", tmp_path / "cache")), public=public)
        class_ids = np.repeat(np.arange(task.num_classes), 3)
        prompts = [task.prompt(int(c)) for c in class_ids]
        images = generator.generate(prompts, list(range(len(prompts))))
        seen = class_ids if self.soft_labels == "agree" else (class_ids + 1) % task.num_classes
        soft = np.full((len(seen), task.num_classes), 0.02, dtype=np.float32)
        soft[np.arange(len(seen)), seen] = 1.0 - 0.02 * (task.num_classes - 1)
        batch = AlignmentBatch(images, prompts, class_ids, soft, [task.prompt(c) for c in range(task.num_classes)])
        loss = self.make()
        assert isinstance(loss, AlignmentLoss)
        loss.prepare(batch, task, seed=0)
        return generator, batch, loss

    def test_scalar_with_gradient_and_deterministic(self, tmp_path) -> None:
        generator, batch, loss = self._setup(tmp_path)
        mask = np.asarray(loss.active(batch))
        assert mask.dtype == bool and mask.shape == (len(batch),)
        assert mask.any(), "the test batch should concern this loss"
        mini = batch.subset(np.flatnonzero(mask)[:8])
        value = loss.compute(generator, mini, seed=3)
        assert value is not None and value.ndim == 0 and value.requires_grad
        assert np.isfinite(float(value.detach()))
        again = loss.compute(generator, batch.subset(np.flatnonzero(mask)[:8]), seed=3)
        assert float(again.detach()) == pytest.approx(float(value.detach()), rel=1e-5)

    def test_moves_the_generator(self, tmp_path) -> None:
        generator, batch, loss = self._setup(tmp_path)
        prompts, seeds = batch.prompts[:6], list(range(50, 56))
        before = generator.generate(prompts, seeds)
        metrics = generator.fine_tune(batch, [(loss, 1.0)], seed=0)
        assert metrics.get("generator_steps", 1) > 0
        assert not np.array_equal(before, generator.generate(prompts, seeds))
