"""Suites for image generation: generators and the alignment losses that fine-tune them."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from ..data import TaskSpec
from ..errors import UserError
from ..interfaces import AlignmentBatch, AlignmentLoss, Generator
from ..plugins import get_registry
from .base import _ComponentTests
from .samples import tiny_generator_task


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
