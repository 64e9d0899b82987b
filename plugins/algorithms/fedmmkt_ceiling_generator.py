"""Diagnostic: what a perfect generator could give the clients (the upper bound of the loop).

The clients run exactly FedMMKT's client side (same transfer-set size, same aggregator, same targets),
but every transfer image comes from the *ceiling generator*: the LoRA fine-tuned each round on the pooled
real client images with their classes' prompts (as ``centralized`` fine-tunes it), never on the clients'
feedback. FedMMKT's clients against the frozen-generator ablation's measure what the loop adds; this
algorithm's clients against the same ablation's tell how much it could add at best.

Pooling breaks the privacy contract by construction: this algorithm reads the clients' data itself
(``fedmmkt_core.loading.load_data``). It is a diagnostic for benchmarks, never a default.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from fedmmkt_plugins.algorithms.fedmmkt import FedMMKT
from fedmmkt_plugins.algorithms.fedmmkt_config import FedMMKTConfig
from pydantic import Field

from fedmmkt_core.interfaces import AlignmentBatch
from fedmmkt_core.loading import load_data
from fedmmkt_core.server.context import ServerContext


class CeilingGeneratorConfig(FedMMKTConfig):
    ceiling_images: Literal["all", "adapter-share"] = Field(
        "all",
        description="all: every transfer image is the ceiling generator's (the upper bound of the loop at the same "
        "transfer-set size); adapter-share: only the adapter's share of them (base_fraction, or transfer_policy "
        "judged, as in FedMMKT), the rest the frozen base's: what a perfect adapter gives under the recipe's mix",
    )


class FedMMKTCeilingGenerator(FedMMKT):
    """FedMMKT's clients distilling on images of a generator fine-tuned on the pooled real client images."""

    Config = CeilingGeneratorConfig
    config: CeilingGeneratorConfig

    def setup(self, ctx: ServerContext) -> None:
        super().setup(ctx)
        splits, _ = load_data(ctx.recipe)  # pooled on purpose: this is the diagnostic upper bound
        labels = splits.train.labels
        self.pooled = AlignmentBatch(
            splits.train.images,
            [self.class_prompts[c] for c in labels],
            labels,
            np.eye(ctx.task.num_classes, dtype=np.float32)[labels],
            self.class_prompts,
        )

    @property
    def asks_inversion(self) -> bool:
        return False  # the adapter trains on the pooled real images, never on the clients' moved ones

    def generator_requirements(self) -> dict[str, str]:
        if self.config.ceiling_images == "adapter-share":
            return super().generator_requirements()
        return {}  # every transfer image is the adapted generator's

    def base_mask(self, class_ids: np.ndarray) -> np.ndarray:
        if self.config.ceiling_images == "adapter-share":
            return super().base_mask(class_ids)
        return np.zeros(len(class_ids), bool)

    def generator_training_batch(self, ctx: ServerContext, seen: AlignmentBatch, round_index: int) -> AlignmentBatch:
        return self.pooled
