"""Alignment-weighted denoising: reinforce the synthetic pairs the clients agree with, drop the rest."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from fedmmkt_core.interfaces import AlignmentBatch, AlignmentLoss, ComponentConfig, Generator
from fedmmkt_core.lazy import lazy_import

torch = lazy_import("torch", 'Install it with: pip install "fedmmkt[torch]"')


class WeightedDenoisingConfig(ComponentConfig):
    threshold: float = Field(
        0.5, ge=0, le=1, description="pairs whose alignment a_j = q[j, c_j] is below this are dropped"
    )
    agreement: Literal["threshold", "top_class"] = Field(
        "threshold",
        description="threshold: keep pairs with a_j >= threshold; top_class: also require the prompt's class to "
        "be the clients' most likely class (with threshold 0, simply: the clients' top class is the prompt's)",
    )
    weighting: Literal["hard", "soft", "uncertain"] = Field(
        "hard",
        description="hard: every kept pair counts once; soft: kept pairs count by their alignment a_j; "
        "uncertain: by 1 - a_j, so the adapter learns most from the pairs the clients recognise least surely "
        "(hard positives, which teach the clients more than the ones they already agree on)",
    )


class WeightedDenoisingLoss(AlignmentLoss):
    """Diffusion loss on synthetic pairs, weighted by how strongly the clients recognise the prompt."""

    Config = WeightedDenoisingConfig
    requires = frozenset({"denoise"})
    config: WeightedDenoisingConfig

    def weights(self, batch: AlignmentBatch) -> np.ndarray:
        alignment = batch.alignment.astype(np.float64)
        kept = alignment >= self.config.threshold
        if self.config.agreement == "top_class":
            kept &= np.argmax(batch.soft_labels, axis=1) == batch.class_ids
        by_weighting = {"hard": np.ones_like(alignment), "soft": alignment, "uncertain": 1.0 - alignment}
        return np.where(kept, by_weighting[self.config.weighting], 0.0)

    def active(self, batch: AlignmentBatch) -> np.ndarray:
        return self.weights(batch) > 0

    def compute(self, generator: Generator, batch: AlignmentBatch, seed: int) -> Any:
        weights = self.weights(batch)
        if weights.sum() <= 0:
            return None
        step = generator.denoise(batch, seed)
        w = torch.as_tensor(weights, dtype=step.per_sample_loss.dtype, device=step.per_sample_loss.device)
        return (w * step.per_sample_loss).sum() / w.sum()
