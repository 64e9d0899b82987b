"""FedAvg baseline (McMahan et al. 2017). Clients upload their full weights: labelled as such."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmmkt_core.errors import RecipeIssue
from fedmmkt_core.interfaces import Algorithm
from fedmmkt_core.recipe import Recipe
from fedmmkt_core.server.context import ServerContext
from fedmmkt_core.wire import Message, MessageError, with_prefix


class FedAvg(Algorithm):
    """Sample-weighted average of client weights; needs one architecture for all clients.

    Unlike FedMMKT this sends every client's weights to the server: it is the baseline for
    communication cost and for privacy exposure, not part of FedMMKT's contract.
    """

    @classmethod
    def check_recipe(cls, recipe: Recipe, path: str) -> list[RecipeIssue]:
        first = recipe.clients[0]
        for i, group in enumerate(recipe.clients[1:], start=1):
            if group.name != first.name or group.params != first.params:
                return [
                    RecipeIssue(
                        path,
                        f"fedavg averages weights, so every client needs the same client model; clients.0 is "
                        f"'{first.name}' {first.params or ''} but clients.{i} is '{group.name}' {group.params or ''} "
                        f"(use feddf or fedmmkt for mixed architectures)",
                    )
                ]
        return []

    def setup(self, ctx: ServerContext) -> None:
        self.global_weights = ctx.build_client_model(0).get_weights()

    def run_round(self, ctx: ServerContext, round_index: int) -> dict[str, Any]:
        down = with_prefix(self.global_weights)
        messages = {
            k: Message("fit", {"seed": ctx.seed_for("fit", round_index, k), "return_weights": True}, down)
            for k in ctx.sampled
        }
        replies = ctx.exchange("fit", messages, expect="fit_reply", validate=self._check_weights)
        total = sum(int(r.config["num_samples"]) for r in replies.values())
        averaged = {}
        for name, current in self.global_weights.items():
            if current.dtype.kind != "f":  # counters such as BatchNorm's num_batches_tracked
                averaged[name] = replies[min(replies)].weights()[name]
                continue
            acc = np.zeros(current.shape, dtype=np.float64)
            for reply in replies.values():
                acc += reply.weights()[name].astype(np.float64) * (int(reply.config["num_samples"]) / total)
            averaged[name] = acc.astype(current.dtype)
        self.global_weights = averaged
        losses = [float(r.config["loss"]) for r in replies.values() if "loss" in r.config]
        return {"train_loss": float(np.mean(losses))} if losses else {}

    def _check_weights(self, client_id: int, reply: Message) -> None:
        weights = reply.weights()
        if set(weights) != set(self.global_weights):
            raise MessageError("uploaded weights do not match the global model's tensors")
        for name in weights:
            reply.array(
                f"weights/{name}", self.global_weights[name].dtype, self.global_weights[name].shape, finite=True
            )
        if int(reply.config.get("num_samples", 0)) <= 0:
            raise MessageError("num_samples must be positive")

    def evaluate(self, ctx: ServerContext, round_index: int) -> dict[str, Any]:
        return ctx.evaluate_clients(with_prefix(self.global_weights))

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, dict(self.global_weights)

    def load_state(self, values: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.global_weights = dict(arrays)
