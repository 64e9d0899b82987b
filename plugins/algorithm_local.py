"""Local-only baseline: every client trains on its own data, nothing is shared."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmmkt_core.context import RunContext
from fedmmkt_core.interfaces import Algorithm
from fedmmkt_core.wire import Message


class LocalOnly(Algorithm):
    """Each sampled client runs its local update; no knowledge crosses the wire."""

    def run_round(self, ctx: RunContext, round_index: int) -> dict[str, Any]:
        messages = {k: Message("fit", {"seed": ctx.seed_for("fit", round_index, k)}) for k in ctx.sampled}
        replies = ctx.exchange("fit", messages, expect="fit_reply")
        return {"train_loss": float(np.mean([float(r.config["loss"]) for r in replies.values()]))}
