"""Local-only baseline: every client trains on its own data, nothing is shared."""

from __future__ import annotations

from typing import Any

from fedmmkt_plugins.algorithms.fedmmkt import mean_train_loss

from fedmmkt_core.interfaces import Algorithm
from fedmmkt_core.server.context import ServerContext
from fedmmkt_core.wire import EVALUATE_AFTER_FIT, Message


class LocalOnly(Algorithm):
    """Each sampled client runs its local update; no knowledge crosses the wire."""

    def run_round(self, ctx: ServerContext, round_index: int) -> dict[str, Any]:
        messages = {
            k: Message("fit", {"seed": ctx.seed_for("fit", round_index, k), EVALUATE_AFTER_FIT: True})
            for k in ctx.sampled
        }
        replies = ctx.exchange("fit", messages, expect="fit_reply")
        return mean_train_loss(replies)
