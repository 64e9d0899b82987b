"""Differentiable alignment: a server student distilled from the clients' soft labels scores x̂₀."""

from __future__ import annotations

from typing import Any

import numpy as np
from fedmmkt_plugins.clients.cnn import CNNClient, CNNConfig
from fedmmkt_plugins.clients.torch_classifier import torch
from pydantic import Field

from fedmmkt_core.data import DistillSet, ImageSet, TaskSpec
from fedmmkt_core.interfaces import AlignmentBatch, AlignmentLoss, ComponentConfig, Generator


class EnsembleCEConfig(ComponentConfig):
    student_epochs: int = Field(15, ge=1, description="epochs distilling the student from the soft labels")
    student_lr: float = Field(3e-3, gt=0)
    temperature: float = Field(1.0, gt=0, description="KD temperature when distilling the student")
    decode_resolution: int | None = Field(
        None,
        ge=8,
        description="decode x̂₀ at this many pixels (its latents resized first) before the student sees it at "
        "the task's size: a 512-px model decodes at full size for a 32-px task otherwise; null = full resolution",
    )


class EnsembleCELoss(AlignmentLoss):
    """Cross-entropy of a frozen student (distilled from the aggregated soft labels) on the generator's
    decoded x̂₀ prediction, against the prompt's class; weighted by ᾱ_t, since x̂₀ is only an image
    at low noise. The gradient flows through the frozen VAE decoder into the LoRA weights."""

    Config = EnsembleCEConfig
    requires = frozenset({"denoise"})
    config: EnsembleCEConfig

    def prepare(self, batch: AlignmentBatch, task: TaskSpec, seed: int) -> None:
        cfg = self.config
        self.student = CNNClient(CNNConfig(epochs=cfg.student_epochs, lr=cfg.student_lr, batch_size=64))
        self.student.build(task, seed)
        hard = ImageSet(batch.images, np.argmax(batch.soft_labels, axis=1))
        soft = DistillSet(batch.images, batch.soft_labels.astype(np.float32), 1.0, cfg.temperature)
        self.student.fit(hard, soft, seed)
        self.student.net.eval()
        self.student.net.requires_grad_(False)

    def compute(self, generator: Generator, batch: AlignmentBatch, seed: int) -> Any:
        step = generator.denoise(batch, seed)
        images = step.images_at(self.config.decode_resolution)
        logits = self.student.net(images.to(next(self.student.net.parameters()).device))
        targets = torch.as_tensor(batch.class_ids, device=logits.device)
        per_sample = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        weight = step.signal_weight.to(per_sample.device)
        return (weight * per_sample).sum() / weight.sum().clamp_min(1e-8)
