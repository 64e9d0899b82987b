"""FedDF (Lin et al., NeurIPS 2020) on synthetic data: ensemble distillation, generator frozen.

FedDF distils the average of the clients' logits. With heterogeneous clients there is no server
model to average, so each client distils the ensemble on the frozen generator's samples.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from fedmmkt_plugins.aggregators.kd import softmax
from fedmmkt_plugins.algorithms.fedmmkt import FedMMKT, FedMMKTConfig
from pydantic import Field

from fedmmkt_core.wire import Message


class FedDFConfig(FedMMKTConfig):
    # distill_targets below is FedDF's rule; the field stays so a recipe asking for more is refused
    client_targets: Literal["ensemble"] = Field(
        "ensemble", description="FedDF distils the clients' ensemble only: no server knowledge in the targets"
    )


class FedDF(FedMMKT):
    """Frozen generator; soft labels = softmax of the clients' mean logits (the recipe's aggregator is unused)."""

    Config = FedDFConfig
    config: FedDFConfig
    update_generator = False

    def aggregate(self, round_index: int, replies: dict[int, Message]) -> np.ndarray:
        logits = np.mean([reply.arrays["logits"].astype(np.float64) for _, reply in sorted(replies.items())], axis=0)
        return softmax(logits, self.ensemble_temperature())

    def distill_targets(
        self, soft_labels: np.ndarray, class_ids: np.ndarray, replies: dict[int, Message]
    ) -> tuple[np.ndarray, None]:
        """The clients distil the ensemble itself: no prompt knowledge, so no ``prompt_trusted_rate``."""
        return soft_labels, None

    def ensemble_temperature(self) -> float:
        """The temperature of the ensemble's softmax (variants sharpen it)."""
        return self.config.kd_temperature
