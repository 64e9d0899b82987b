"""A toy class-conditional generator: each class's mean public image plus a trainable per-class offset.

Not a diffusion model, yet it keeps the whole generator contract (see ``Generator`` in
``fedmmkt_core.interfaces``): the algorithm asks for class c with ``task.prompt(c)``; ``fine_tune``
prepares every loss once, draws mini-batches from the union of their ``active`` samples and minimises
``Σ weight · compute``; ``denoise`` gives a cached :class:`DenoisingStep`, so every built-in
alignment loss works with it. It does not implement ``generate_base`` (adapter off), so
``fedmmkt validate`` refuses it with FedMMKT's ``base_fraction > 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from fedmmkt_core.data import ImageSet, TaskSpec
from fedmmkt_core.errors import DataError
from fedmmkt_core.interfaces import AlignmentBatch, AlignmentLoss, ComponentConfig, DenoisingStep, Generator
from fedmmkt_core.lazy import lazy_import
from fedmmkt_core.seeding import derive_seed

torch = lazy_import("torch", "Install it with: pip install torch")


class ClassPrototypesConfig(ComponentConfig):
    noise: float = Field(0.3, ge=0, description="std of the pixel noise around the class prototype ([-1, 1] scale)")
    steps: int = Field(20, ge=0, description="optimisation steps per fine-tuning call")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)


class ClassPrototypesGenerator(Generator):
    """Class mean of the public images + a trained per-class offset + seeded noise."""

    Config = ClassPrototypesConfig
    config: ClassPrototypesConfig

    def build(self, task: TaskSpec, seed: int, cache_dir: Path, public: ImageSet | None = None, progress=None) -> None:
        self.task = task
        shape = (task.num_classes, task.channels, task.image_size, task.image_size)
        base = np.zeros(shape, np.float32)
        if public is not None and len(public):
            pixels = public.images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
            for c in range(task.num_classes):
                if (public.labels == c).any():
                    base[c] = pixels[public.labels == c].mean(axis=0)
        self.base = torch.from_numpy(base)
        self.offset = torch.zeros(shape, requires_grad=True)  # the "adapter"
        self.class_of = {task.prompt(c): c for c in range(task.num_classes)}
        self._last_step: tuple[Any, int, DenoisingStep] | None = None

    def _classes(self, prompts: Sequence[str]) -> np.ndarray:
        unknown = [p for p in prompts if p not in self.class_of]
        if unknown:
            raise ValueError(f"prompt {unknown[0]!r} is not one of the task's prompts (task.prompt(c))")
        return np.array([self.class_of[p] for p in prompts], dtype=np.int64)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        task = self.task
        out = np.zeros((len(prompts), task.image_size, task.image_size, task.channels), np.uint8)
        prototypes = (self.base + self.offset).detach().numpy()
        for j, (c, seed) in enumerate(zip(self._classes(prompts), seeds, strict=True)):
            noise = np.random.default_rng(seed).normal(0.0, self.config.noise, prototypes[c].shape)
            image = np.clip(prototypes[c] + noise, -1, 1)
            out[j] = np.round((image.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)
        return out

    def denoise(self, batch: AlignmentBatch, seed: int) -> DenoisingStep:
        if self._last_step is not None and self._last_step[0] is batch and self._last_step[1] == seed:
            return self._last_step[2]  # several losses on one mini-batch share the step
        target = torch.from_numpy(batch.images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
        prediction = (self.base + self.offset)[torch.from_numpy(batch.class_ids.astype(np.int64))]
        per_sample = (prediction - target).pow(2).mean(dim=(1, 2, 3))
        step = DenoisingStep(per_sample, torch.ones(len(batch)), lambda: prediction.clamp(-1, 1))
        self._last_step = (batch, seed, step)
        return step

    def fine_tune(
        self, batch: AlignmentBatch, losses: Sequence[tuple[AlignmentLoss, float]], seed: int
    ) -> dict[str, float]:
        cfg = self.config
        losses = [(loss, weight) for loss, weight in losses if weight != 0]
        for loss, _ in losses:
            loss.prepare(batch, self.task, derive_seed(seed, "prepare", loss.registered_name or type(loss).__name__))
        masks = [np.asarray(loss.active(batch), bool) for loss, _ in losses]
        pool = np.flatnonzero(np.logical_or.reduce(masks)) if masks else np.array([], np.int64)
        if len(pool) == 0 or cfg.steps == 0:
            return {"generator_steps": 0.0}
        optimizer = torch.optim.Adam([self.offset], lr=cfg.lr)
        rng = np.random.default_rng(seed)
        totals: dict[str, float] = {}
        done = 0
        for step in range(cfg.steps):
            mini = batch.subset(np.sort(rng.choice(pool, size=min(cfg.batch_size, len(pool)), replace=False)))
            total = None
            for loss, weight in losses:
                value = loss.compute(self, mini, derive_seed(seed, "step", step))
                if value is None:
                    continue
                key = f"loss_{loss.registered_name or type(loss).__name__}"
                totals[key] = totals.get(key, 0.0) + float(value.detach())
                total = weight * value if total is None else total + weight * value
            if total is None:
                continue
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            done += 1
        self._last_step = None
        return {**{k: v / max(done, 1) for k, v in totals.items()}, "generator_steps": float(done)}

    def save_adapter(self, path: Path) -> None:
        from safetensors.numpy import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"offset": self.offset.detach().numpy().copy()}, str(path))

    def load_adapter(self, path: Path) -> None:
        from safetensors.numpy import load_file

        try:
            offset = load_file(str(path))["offset"]
        except Exception as exc:  # truncated, not safetensors, or no offset
            raise DataError(f"{path}: not an adapter written by class-prototypes ({exc})") from None
        if offset.shape != tuple(self.offset.shape):
            raise DataError(f"{path}: adapter of shape {offset.shape}, this generator's is {tuple(self.offset.shape)}")
        with torch.no_grad():
            self.offset.copy_(torch.from_numpy(offset))
        self._last_step = None
