"""Relabelled denoising: learn from misaligned pairs too, under the caption the clients recognise."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from fedmmkt_core.interfaces import AlignmentBatch, AlignmentLoss, ComponentConfig, Generator


class RelabelDenoisingConfig(ComponentConfig):
    confidence: float = Field(
        0.7, gt=0, le=1, description="relabel a pair when the clients give another class at least this much"
    )


class RelabelDenoisingLoss(AlignmentLoss):
    """An image generated for class c that the clients confidently see as class k != c is a good
    example of k: train the denoising loss on it with k's prompt (hindsight relabelling)."""

    Config = RelabelDenoisingConfig
    requires = frozenset({"denoise"})
    config: RelabelDenoisingConfig

    def _recognised(self, batch: AlignmentBatch) -> tuple[np.ndarray, np.ndarray]:
        seen = np.argmax(batch.soft_labels, axis=1)
        confident = batch.soft_labels[np.arange(len(seen)), seen] >= self.config.confidence
        return seen, confident & (seen != batch.class_ids)

    def active(self, batch: AlignmentBatch) -> np.ndarray:
        if not batch.class_prompts:
            return np.zeros(len(batch), dtype=bool)
        return self._recognised(batch)[1]

    def compute(self, generator: Generator, batch: AlignmentBatch, seed: int) -> Any:
        seen, relabel = self._recognised(batch)
        if not batch.class_prompts or not relabel.any():
            return None
        chosen = np.flatnonzero(relabel)
        relabelled = AlignmentBatch(
            images=batch.images[chosen],
            prompts=[batch.class_prompts[int(k)] for k in seen[chosen]],
            class_ids=seen[chosen],
            soft_labels=batch.soft_labels[chosen],
            class_prompts=batch.class_prompts,
        )
        return generator.denoise(relabelled, seed + 1).per_sample_loss.mean()
