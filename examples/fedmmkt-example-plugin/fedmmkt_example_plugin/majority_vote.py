"""Hard-label majority vote: each client votes for its arg-max class; soft labels are vote shares."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field

from fedmmkt_core.interfaces import Aggregator, ClientReply, ComponentConfig


class MajorityVoteConfig(ComponentConfig):
    smoothing: float = Field(0.0, ge=0, description="added to every class's vote count before normalising")


class MajorityVoteAggregator(Aggregator):
    """q[j, c] = (votes for c on sample j + smoothing) / (clients + C * smoothing)."""

    Config = MajorityVoteConfig
    config: MajorityVoteConfig

    def aggregate(self, round_index: int, replies: Sequence[ClientReply]) -> np.ndarray:
        shape = self.check_replies(replies)  # misshaped or non-finite logits: ClientFailure naming the client
        votes = np.zeros(shape, dtype=np.float64)
        rows = np.arange(shape[0])
        for reply in replies:
            votes[rows, reply.logits.argmax(axis=1)] += 1.0
        votes += self.config.smoothing
        return (votes / votes.sum(axis=1, keepdims=True)).astype(np.float32)
