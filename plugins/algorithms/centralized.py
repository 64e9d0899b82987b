"""Upper bounds, not a federated algorithm: what pooling every client's data would buy.

* Clients: each architecture of the recipe (one model per client group) trained on the pooled
  training data of all clients, with the same local epochs per round as a federated client; every
  client of a group reports its group's accuracy, so the table's fields line up with the others'.
* Generator: its LoRA fine-tuned on the pooled real client images with their classes' prompts,
  every pair counted as aligned, with the same steps per round as FedMMKT (the CAS ceiling).

Pooling breaks the privacy contract by construction, so this algorithm reads the clients' data
itself (``fedmmkt_core.loading.load_data``), like FedAvg's weight exchange it is labelled as such and
never a default. It exchanges no messages: bytes up and down are zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fedmmkt_plugins.algorithms.fedmmkt import FedMMKT

from fedmmkt_core.interfaces import AlignmentBatch, ClientModel
from fedmmkt_core.loading import evaluation_split, load_data
from fedmmkt_core.server.context import ServerContext


class Centralized(FedMMKT):
    """Ceilings: every architecture on the pooled client data; the generator's LoRA on the pooled real images."""

    needs_generator = True
    uploads_soft_labels = False

    def setup(self, ctx: ServerContext) -> None:
        super().setup(ctx)
        splits, _ = load_data(ctx.recipe)  # pooled on purpose: this is the non-federated upper bound
        self.pooled = splits.train
        self.evaluation = evaluation_split(ctx.recipe, splits)
        self.group_of = [index for index, group in enumerate(ctx.recipe.clients) for _ in range(group.count)]
        self.models: dict[int, ClientModel] = {}
        for client_id, group in enumerate(self.group_of):
            if group not in self.models:  # the first client of a group gives the architecture and init
                self.models[group] = ctx.build_client_model(client_id)
        self.accuracy: dict[int, float] = {}

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        values, arrays = super().state()
        models: dict[int, ClientModel] = getattr(self, "models", {})
        for group, model in models.items():
            arrays.update({f"group{group}/{k}": v for k, v in model.get_weights().items()})
        if not models:  # loaded but not set up (no models built yet): hand back what was loaded
            arrays.update(getattr(self, "_loaded_groups", {}))
        return values, arrays

    def load_state(self, values: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        groups = {k: v for k, v in arrays.items() if k.startswith("group")}
        super().load_state(values, {k: v for k, v in arrays.items() if k not in groups})
        self._loaded_groups = groups
        for group, model in getattr(self, "models", {}).items():
            prefix = f"group{group}/"
            model.set_weights({k[len(prefix) :]: v for k, v in groups.items() if k.startswith(prefix)})

    def run_round(self, ctx: ServerContext, round_index: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.config.evaluate_generator and self.initial is None:
            self.initial = self.measure_generator(ctx, 0)
            self.latest = self.initial
        with ctx.phase("fit", total=len(self.models)) as advance:
            losses = []
            for group, model in self.models.items():
                fitted = model.fit(self.pooled, None, seed=ctx.seed_for("fit", round_index, group))
                losses.append(float(fitted["loss"]))
                logits = model.predict_logits(self.evaluation.images)
                self.accuracy[group] = float((np.argmax(logits, axis=1) == self.evaluation.labels).mean())
                advance(1)
        metrics["train_loss"] = float(np.mean(losses))
        if ctx.generator is not None:
            labels = self.pooled.labels
            one_hot = np.eye(ctx.task.num_classes, dtype=np.float32)[labels]
            batch = AlignmentBatch(
                self.pooled.images, [self.class_prompts[c] for c in labels], labels, one_hot, self.class_prompts
            )
            with ctx.phase("generator_update"):
                metrics.update(
                    ctx.generator.fine_tune(batch, ctx.alignment_losses, ctx.seed_for("fine_tune", round_index))
                )
        return metrics

    def evaluate(self, ctx: ServerContext, round_index: int) -> dict[str, Any]:
        values = [self.accuracy[group] for group in self.group_of]
        metrics: dict[str, Any] = {
            "client_accuracy_mean": float(np.mean(values)),
            "client_accuracy_min": float(np.min(values)),
            "client_accuracy": {str(k): v for k, v in enumerate(values)},
        }
        metrics.update(self.generator_report(ctx, round_index))
        return metrics
