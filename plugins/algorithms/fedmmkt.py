"""FedMMKT: the server's text-to-image model and the clients' task models teach each other.

One round: synthesize a class-balanced set S_r with the generator; every sampled client trains on its
private data plus KD on last round's set with last round's soft labels, then returns logits on S_r
(``distill_on: this-round``: labels S_r first, then distils on it); the KD aggregator turns them into soft
labels q_r; the alignment a_j = q_r[j, c_j] tells which images really show their prompt; the generator's
LoRA is fine-tuned with the recipe's alignment losses. Only synthetic images, soft labels and logits cross the wire.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from fedmmkt_plugins.aggregators.kd import KDAggregator
from fedmmkt_plugins.algorithms.batches import concatenate, counted_aligned
from fedmmkt_plugins.algorithms.fedmmkt_config import FedMMKTConfig
from fedmmkt_plugins.algorithms.feedback import check_feedback, feedback_request, fine_tune_images, privacy_issues
from fedmmkt_plugins.algorithms.hardness import disagreement, entropy
from fedmmkt_plugins.algorithms.replies import MAX_ABS_LOGIT, MAX_SITE_NOISE_FACTOR, check_logits

from fedmmkt_core.cache import cache_dir
from fedmmkt_core.errors import RecipeIssue
from fedmmkt_core.interfaces import Algorithm, AlignmentBatch, ClientReply
from fedmmkt_core.outputs import check_metrics, check_soft_labels
from fedmmkt_core.paths import check_allocation
from fedmmkt_core.recipe import Recipe
from fedmmkt_core.seeding import derive_seed
from fedmmkt_core.server.context import ServerContext
from fedmmkt_core.wire import EVALUATE_AFTER_FIT, Message

__all__ = ["MAX_ABS_LOGIT", "MAX_SITE_NOISE_FACTOR", "FedMMKT"]  # the bounds, re-exported where they were defined


class FedMMKT(Algorithm):
    """Co-enhancement of a server generator and heterogeneous client models.

    Extension points: a variant subclasses ``FedMMKT`` and overrides one documented hook; the round
    (:meth:`run_round`) calls them in this order, each with no other side effect on the round:

    * :meth:`base_mask`: who draws each transfer image (the frozen base or the adapted generator);
    * :meth:`aggregate`: the federation's soft labels from the clients' logits;
    * :meth:`distill_targets`: what the clients distil next round (the client-target rule);
    * :meth:`select_transfer`: which of the round's images they distil on (hard samples);
    * :meth:`judge_sources`: the transfer policy's feedback (the clients' verdict on each source);
    * :meth:`generator_training_batch`: what the generator's LoRA is fine-tuned on.

    Two class flags switch whole steps: ``update_generator = False`` never fine-tunes the generator
    (``fedmmkt-frozen-generator``, ``feddf``); ``client_feedback = False`` fine-tunes it on the step-matched
    control batch without the clients' verdict (``fedmmkt-no-feedback``). A variant with its own config
    subclasses :class:`FedMMKTConfig` and sets ``Config``. :meth:`measure_generator` and
    :meth:`generator_report` serve a variant that replaces :meth:`run_round` (``centralized``).
    """

    Config = FedMMKTConfig
    config: FedMMKTConfig
    needs_generator = True
    uploads_soft_labels = True
    update_generator: ClassVar[bool] = True
    client_feedback: ClassVar[bool] = True
    previous: tuple[np.ndarray, np.ndarray] | None = None
    replay: AlignmentBatch | None = None
    initial: dict[str, float] | None = None
    latest: dict[str, float] | None = None
    adapter_share: np.ndarray | None = None  # judged policy: next round's share of adapter images per class

    def generator_requirements(self) -> dict[str, str]:
        if self.config.transfer_policy == "judged":
            return {"generate_base": "params.transfer_policy"}
        return {"generate_base": "params.base_fraction"} if self.config.base_fraction > 0 else {}

    @classmethod
    def check_recipe(cls, recipe: Recipe, path: str) -> list[RecipeIssue]:
        issues = []
        name = recipe.algorithm.name
        if cls.update_generator and not recipe.alignment_losses:
            issues.append(
                RecipeIssue(
                    "alignment_losses",
                    f"algorithm '{name}' fine-tunes the generator and needs at least one alignment loss "
                    "(e.g. - name: weighted-denoising)",
                )
            )
        cfg: FedMMKTConfig = recipe.algorithm.config  # type: ignore[assignment]  # validated before cross-checks
        no_base = cfg.transfer_policy == "fixed" and cfg.base_fraction == 0
        if cls.update_generator and cfg.fine_tune_on == "base" and no_base:
            issues.append(
                RecipeIssue(
                    "algorithm.params.fine_tune_on",
                    "fine_tune_on: base fine-tunes the adapter on the frozen base's transfer images, and "
                    "base_fraction: 0 draws none; set base_fraction above 0 or fine_tune_on: all",
                )
            )
        issues += privacy_issues(cfg, recipe)
        return issues

    @property
    def asks_inversion(self) -> bool:
        """Whether the clients return inversion deltas: only when the clients' feedback trains the generator."""
        return self.update_generator and self.client_feedback and self.config.inversion_steps > 0

    @property
    def asks_class_means(self) -> bool:
        """Whether the clients return their class means: only when the clients' feedback trains the generator."""
        return self.update_generator and self.client_feedback and self.config.class_mean_shift > 0

    # ------------------------------------------------------------------ set-up and state
    def setup(self, ctx: ServerContext) -> None:
        task = ctx.task
        self.class_prompts = [task.prompt(c) for c in range(task.num_classes)]
        self.privacy = ctx.recipe.privacy
        self.aggregator = ctx.aggregator if ctx.aggregator is not None else KDAggregator()
        self.previous = None
        self.replay = None
        self.initial = None
        self.latest = None
        self.adapter_share = None
        self.oracle = None
        if self.config.evaluate_generator:
            from fedmmkt_plugins.evaluation.oracle import EvaluationOracle, oracle_half

            # Choices are made on the validation split with the selection oracle; the test split's figures
            # come from the report oracle, trained on the other half of the oracle data.
            self.oracle_purpose = "selection" if ctx.recipe.data.evaluate_on == "validation" else "report"
            self.oracle = EvaluationOracle(
                oracle_half(ctx.data.oracle, self.oracle_purpose) if ctx.data.oracle is not None else None,
                task,
                cache_dir(),
                seed=ctx.seed_for("oracle", self.oracle_purpose),
            )
            self.reference_features = self.oracle.features(ctx.data.evaluation.images)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        values: dict[str, Any] = {"initial": self.initial, "latest": self.latest}
        arrays = {}
        if self.previous is not None:
            arrays = {"previous_images": self.previous[0], "previous_soft_labels": self.previous[1]}
        if self.adapter_share is not None:
            arrays["adapter_share"] = self.adapter_share
        if self.replay is not None:
            values.update({"replay_prompts": self.replay.prompts, "class_prompts": self.replay.class_prompts})
            arrays.update(
                {
                    "replay_images": self.replay.images,
                    "replay_class_ids": self.replay.class_ids,
                    "replay_soft_labels": self.replay.soft_labels,
                }
            )
        return values, arrays

    def load_state(self, values: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.initial = values.get("initial")
        self.latest = values.get("latest")
        self.adapter_share = arrays.get("adapter_share")
        if "previous_images" in arrays:
            self.previous = (arrays["previous_images"], arrays["previous_soft_labels"])
        if "replay_images" in arrays:
            self.replay = AlignmentBatch(
                arrays["replay_images"],
                list(values["replay_prompts"]),
                arrays["replay_class_ids"],
                arrays["replay_soft_labels"],
                list(values["class_prompts"]),
            )

    # ------------------------------------------------------------------ one round
    def run_round(self, ctx: ServerContext, round_index: int) -> dict[str, Any]:
        cfg = self.config
        generator = ctx.generator
        assert generator is not None
        if self.config.evaluate_generator and self.initial is None:
            self.initial = self.measure_generator(ctx, 0)
            self.latest = self.initial
        num_classes = ctx.task.num_classes
        per_class = self.candidates_per_class()
        class_ids = np.repeat(np.arange(num_classes), per_class)
        prompts = [self.class_prompts[c] for c in class_ids]
        with ctx.phase("synthesize"):
            seeds = [ctx.seed_for("synthesize", round_index, j) for j in range(len(prompts))]
            from_base = self.base_mask(class_ids)
            shape = (len(prompts), ctx.task.image_size, ctx.task.image_size, ctx.task.channels)
            what = f"{len(prompts)} synthetic images ({per_class} per class) of {shape[1]}x{shape[2]}"
            check_allocation(int(np.prod(shape)), what)  # samples_per_class x image_size: refused, not MemoryError
            images = np.zeros(shape, np.uint8)
            for mask, draw in ((from_base, generator.generate_base), (~from_base, generator.generate)):
                chosen = np.flatnonzero(mask)
                if len(chosen):
                    images[chosen] = draw([prompts[j] for j in chosen], [seeds[j] for j in chosen])
        # this-round: the clients label the round's set before they train, and distil on it in the same round
        labelled_first = cfg.distill_on == "this-round" and self.previous is not None

        def check(client_id: int, reply: Message) -> None:
            self._check_logits(reply, len(images))
            check_feedback(reply, images.shape, num_classes, cfg)

        if labelled_first:
            messages = {k: self._predict_message(ctx, round_index, k, images, class_ids) for k in ctx.sampled}
            replies = ctx.exchange("predict", messages, expect="predict_reply", validate=check)
        else:
            messages = {k: self._fit_message(ctx, round_index, k, images, class_ids) for k in ctx.sampled}
            replies = fitted = ctx.exchange("fit", messages, expect="fit_reply", validate=check)
        with ctx.phase("aggregate"):
            soft_labels = check_soft_labels(
                self.aggregate(round_index, replies), (len(images), num_classes), self._aggregator_name(ctx)
            )
            targets, trusted = self.distill_targets(soft_labels, class_ids, replies)
            transfer = self.select_transfer(soft_labels, class_ids, replies)
        self.previous = (images[transfer], targets[transfer])  # what the clients distil on next (this-round: now)
        if labelled_first:
            messages = {k: self._fit_message(ctx, round_index, k, None) for k in ctx.sampled}
            fitted = ctx.exchange("fit", messages, expect="fit_reply")
        # data feedback: the adapter is fine-tuned on the images as the clients would change them
        adapter_images, feedback_metrics = fine_tune_images(
            images, class_ids, replies, self.asks_inversion, cfg.class_mean_shift if self.asks_class_means else 0.0
        )
        batch = AlignmentBatch(adapter_images, prompts, class_ids, soft_labels, self.class_prompts)
        metrics: dict[str, Any] = {
            **feedback_metrics,
            **mean_train_loss(fitted),
            "synthetic_images": len(images),
            "alignment_rate": float(np.mean(batch.alignment >= cfg.alignment_threshold)),
            "alignment_mean": float(np.mean(batch.alignment)),
        }
        if trusted is not None:
            metrics["prompt_trusted_rate"] = float(np.mean(trusted))
        if len(transfer) < len(images):
            metrics["transfer_images"] = len(transfer)
            metrics["transfer_entropy"] = float(np.mean(entropy(soft_labels[transfer])))
            metrics["transfer_adapter_images"] = float(np.sum(~from_base[transfer]))
        metrics.update(self.judge_sources(batch.alignment, class_ids, from_base))
        excluded = getattr(self.aggregator, "excluded", None)  # clients a robust aggregator left out
        if excluded:
            metrics["kd_excluded"] = list(excluded)
        scored = batch if cfg.fine_tune_on == "all" else batch.subset(np.flatnonzero(from_base))
        seen = scored if self.replay is None else concatenate(self.replay, scored)
        if self.update_generator:
            pool = seen
            if round_index < cfg.feedback_warmup_rounds:  # pairs counted aligned; the replay keeps their verdict
                fresh = counted_aligned(scored)
                pool = fresh if self.replay is None else concatenate(self.replay, fresh)
            training = self.generator_training_batch(ctx, pool, round_index)
            with ctx.phase("generator_update"):
                update = generator.fine_tune(training, ctx.alignment_losses, ctx.seed_for("fine_tune", round_index))
                metrics.update(check_metrics(update, f"generator '{ctx.recipe.generator.name}'"))  # type: ignore[union-attr]
        if cfg.replay_buffer > 0:
            self.replay = seen.subset(np.arange(max(0, len(seen) - cfg.replay_buffer), len(seen)))
        return metrics

    def candidates_per_class(self) -> int:
        """Images drawn per class each round: ``samples_per_class`` times ``transfer_candidates``."""
        return self.config.samples_per_class * self.config.transfer_candidates

    def select_transfer(
        self, soft_labels: np.ndarray, class_ids: np.ndarray, replies: dict[int, Message]
    ) -> np.ndarray:
        """Hook: which of the round's images the clients distil on next round, as sorted indices.

        ``soft_labels [N, C]`` are :meth:`aggregate`'s, ``class_ids [N]`` the prompts' classes, ``replies``
        the clients' validated replies (``logits [N, C]``; ``predict_reply`` under ``distill_on: this-round``).
        Here: all of them when ``transfer_candidates`` is 1; otherwise, per class, the ``samples_per_class`` images that
        ``transfer_selection`` ranks hardest (ties to the earlier image), so the set stays class-balanced;
        ``agreed-disagreement`` ranks the images whose federation top class is the prompt's before the rest."""
        cfg = self.config
        if cfg.transfer_candidates == 1:
            return np.arange(len(class_ids))
        if cfg.transfer_selection == "entropy":
            hardness = entropy(soft_labels)
        else:
            logits = [reply.arrays["logits"] for _, reply in sorted(replies.items())]
            hardness = disagreement(logits, cfg.kd_temperature)
        agreed = np.zeros(len(class_ids), bool)
        if cfg.transfer_selection == "agreed-disagreement":
            agreed = np.argmax(soft_labels, axis=1) == class_ids
        keep = []
        for c in np.unique(class_ids):
            members = np.flatnonzero(class_ids == c)
            order = np.lexsort((-hardness[members], ~agreed[members]))  # agreed first, then the hardest; stable
            keep.append(members[order[: cfg.samples_per_class]])
        return np.sort(np.concatenate(keep))

    def base_mask(self, class_ids: np.ndarray) -> np.ndarray:
        """Hook: who draws each transfer image. ``class_ids [N]`` is this round's prompt classes, in class
        blocks of :meth:`candidates_per_class`; return a boolean mask ``[N]``, True where the frozen base
        (``Generator.generate_base``, adapter off) draws the image, False where the adapted generator does.

        Here: ``transfer_policy`` fixed, the first ``round(base_fraction · n)`` of each class's ``n`` images
        (:meth:`candidates_per_class`); judged, ``1 - adapter_share[c]`` of class c (set by
        :meth:`judge_sources`). A variant that
        returns True anywhere needs ``generate_base`` and must say so in ``generator_requirements``."""
        cfg = self.config
        per_class = self.candidates_per_class()
        position_in_class = np.arange(len(class_ids)) % per_class
        if cfg.transfer_policy == "fixed" or self.adapter_share is None:
            return position_in_class < round(cfg.base_fraction * per_class)
        base_count = per_class - np.round(self.adapter_share * per_class).astype(int)
        return position_in_class < base_count[class_ids]

    def judge_sources(self, alignment: np.ndarray, class_ids: np.ndarray, from_base: np.ndarray) -> dict[str, float]:
        """Hook: the transfer policy's feedback, called once per round after :meth:`aggregate`.

        ``alignment [N]`` is a_j = q[j, c_j] (how strongly the clients agree image j shows its class),
        ``from_base [N]`` the round's :meth:`base_mask`. Returns metrics for the round; here it reports
        the mean alignment of each source's images and, under ``transfer_policy: judged``, sets
        ``adapter_share`` (next round's share of adapter images per class, saved with the state) that
        :meth:`base_mask` reads. A variant with its own policy overrides both."""
        cfg = self.config
        metrics: dict[str, float] = {"adapter_images": float(np.sum(~from_base))}
        if from_base.any():
            metrics["alignment_base"] = float(np.mean(alignment[from_base]))
        if (~from_base).any():
            metrics["alignment_adapter"] = float(np.mean(alignment[~from_base]))
        if cfg.transfer_policy != "judged":
            return metrics
        num_classes = len(self.class_prompts)
        share = (
            np.full(num_classes, 1.0 - cfg.base_fraction) if self.adapter_share is None else self.adapter_share.copy()
        )
        for c in range(num_classes):
            adapter, base = (class_ids == c) & ~from_base, (class_ids == c) & from_base
            if adapter.any() and base.any():  # a class judged on one source only keeps its share
                margin = float(np.mean(alignment[adapter]) - np.mean(alignment[base]))
                share[c] = 1.0 / (1.0 + np.exp(-margin / cfg.judge_temperature))
        self.adapter_share = np.clip(share, cfg.probe_fraction, 1.0 - cfg.probe_fraction)
        metrics["adapter_share_next"] = float(np.mean(self.adapter_share))
        return metrics

    def distill_targets(
        self, soft_labels: np.ndarray, class_ids: np.ndarray, replies: dict[int, Message]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Hook: the client-target rule, what the clients distil on this round's synthetic set next round.

        ``soft_labels [N, C]`` are :meth:`aggregate`'s (already checked: finite rows summing to one),
        ``class_ids [N]`` the class each image was generated for, ``replies`` the clients' validated
        ``fit_reply`` messages (``class_counts`` among their arrays, except under DP). Return
        ``(targets, trusted)``: ``targets float32 [N, C]`` probability rows, sent to the clients as
        ``distill_soft_labels``; ``trusted``, a boolean mask ``[N]`` of the images whose target took in the
        prompt (reported as ``prompt_trusted_rate``), or ``None`` for a rule that never does (no metric).

        Here, by ``client_targets``: ``ensemble`` the soft labels themselves; ``prompt`` and ``agreed`` mix
        in onehot(c_j) with weight ``prompt_weight``, ``agreed`` only where the ensemble's top class is
        the prompt's (two independent sources agree) or where no reporting client holds the prompt's
        class (the ensemble cannot know it; only without DP, when clients report class counts).
        """
        cfg = self.config
        num_classes = soft_labels.shape[1]
        if cfg.client_targets == "ensemble":
            return soft_labels, None
        if cfg.prompt_weight == 0:
            return soft_labels, np.zeros(len(class_ids), bool)
        if cfg.client_targets == "prompt":
            trusted = np.ones(len(class_ids), bool)
        else:
            trusted = np.argmax(soft_labels, axis=1) == class_ids
            counts = [r.arrays["class_counts"] for r in replies.values() if "class_counts" in r.arrays]
            if counts:
                held = np.sum(counts, axis=0) > 0
                trusted |= ~held[class_ids]
        one_hot = np.eye(num_classes, dtype=np.float32)[class_ids]
        beta = cfg.prompt_weight * trusted[:, None].astype(np.float32)
        return ((1 - beta) * soft_labels + beta * one_hot).astype(np.float32), trusted

    def generator_training_batch(self, ctx: ServerContext, seen: AlignmentBatch, round_index: int) -> AlignmentBatch:
        """Hook: what the generator's LoRA is fine-tuned on this round (only when ``update_generator``).

        ``seen`` holds this round's synthetic pairs after the replay buffer's earlier ones, each with the
        federation's soft labels (``AlignmentBatch.alignment`` is a_j). The returned batch goes to
        ``Generator.fine_tune`` with the recipe's alignment losses. Here: ``seen`` itself, or, with
        ``client_feedback = False``, the step-matched control (as many pairs, uniformly drawn, all counted
        aligned). ``fedmmkt-ceiling-generator`` returns the pooled real images instead."""
        return seen if self.client_feedback else self._control_batch(ctx, seen, round_index)

    def _control_batch(self, ctx: ServerContext, seen: AlignmentBatch, round_index: int) -> AlignmentBatch:
        """The no-feedback control's fine-tuning set: as many pairs as FedMMKT's losses would train on
        this round (so the same number of steps on the same number of pairs), drawn uniformly at
        random, every one counted as aligned. Only that count comes from the clients."""
        active = np.zeros(len(seen), bool)
        seed = ctx.seed_for("fine_tune", round_index)
        for loss, weight in ctx.alignment_losses:
            if weight != 0:
                loss.prepare(seen, ctx.task, derive_seed(seed, "prepare", type(loss).__name__))
                active |= np.asarray(loss.active(seen), bool)
        rng = np.random.default_rng(ctx.seed_for("control", round_index))
        chosen = np.sort(rng.choice(len(seen), size=int(active.sum()), replace=False))
        return counted_aligned(seen.subset(chosen))

    def _feedback_request(self, class_ids: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
        return feedback_request(self.config, self.asks_inversion, self.asks_class_means, class_ids)

    def _predict_message(
        self, ctx: ServerContext, round_index: int, client_id: int, images: np.ndarray, class_ids: np.ndarray
    ) -> Message:
        config, arrays = self._feedback_request(class_ids)
        config.update(seed=ctx.seed_for("predict", round_index, client_id), logits_dtype=self.config.logits_dtype)
        return Message("predict", config, {"images": images, **arrays})

    def _fit_message(
        self,
        ctx: ServerContext,
        round_index: int,
        client_id: int,
        images: np.ndarray | None,
        class_ids: np.ndarray | None = None,
    ) -> Message:
        """The round's fit: local training, KD on ``self.previous``; logits on ``images`` (each generated for
        ``class_ids``) unless None, and inversion deltas when :attr:`asks_inversion`."""
        cfg = self.config
        config = {
            "seed": ctx.seed_for("fit", round_index, client_id),
            "kd_weight": cfg.kd_weight,
            "temperature": cfg.kd_temperature,
            "logits_dtype": cfg.logits_dtype,
            EVALUATE_AFTER_FIT: True,  # the round's evaluation rides on this exchange (see evaluate)
        }
        arrays = {} if images is None else {"predict_images": images}
        if images is not None and class_ids is not None:
            request, request_arrays = self._feedback_request(class_ids)
            config.update(request)
            arrays.update(request_arrays)
        if self.previous is not None:
            arrays["distill_images"], arrays["distill_soft_labels"] = self.previous
        return Message("fit", config, arrays)

    def _check_logits(self, reply: Message, count: int) -> None:
        check_logits(reply, (count, len(self.class_prompts)), self.config.logits_dtype, self.privacy)

    def _aggregator_name(self, ctx: ServerContext) -> str:
        name = ctx.recipe.aggregator.name if ctx.recipe.aggregator is not None else "kd"
        return f"aggregator '{name}'"

    def aggregate(self, round_index: int, replies: dict[int, Message]) -> np.ndarray:
        """Hook: the federation's soft labels ``float [N, C]`` on the synthetic set from the clients'
        validated replies (``logits`` ``[N, C]``, ``num_samples`` and ``class_counts`` unless withheld under
        DP). Here: the recipe's aggregator (default ``kd``) on :class:`ClientReply` objects; ``feddf``
        averages the logits instead. The round checks the result (finite rows summing to one) and stops
        the run naming the aggregator otherwise."""
        client_replies = [
            ClientReply(
                client_id=k,
                logits=reply.arrays["logits"].astype(np.float32),
                num_samples=int(reply.config.get("num_samples", 0)),  # 0 and None: withheld under DP
                class_counts=reply.arrays.get("class_counts"),
            )
            for k, reply in sorted(replies.items())
        ]
        return self.aggregator.aggregate(round_index, client_replies)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, ctx: ServerContext, round_index: int) -> dict[str, Any]:
        metrics = ctx.evaluate_clients()
        metrics.update(self.generator_report(ctx, round_index))
        return metrics

    def generator_report(self, ctx: ServerContext, round_index: int) -> dict[str, float]:
        """The round's generator metrics (``generator_cas``, ``generator_fid`` and their ``_initial``
        values), re-measured when the generator is updated; ``{}`` without ``evaluate_generator``."""
        if self.oracle is None or self.initial is None:
            return {}
        if self.update_generator:
            self.latest = self.measure_generator(ctx, round_index + 1)
        assert self.latest is not None
        return {
            "generator_cas": self.latest["cas"],
            "generator_fid": self.latest["fid"],
            "generator_cas_initial": self.initial["cas"],
            "generator_fid_initial": self.initial["fid"],
        }

    def measure_generator(self, ctx: ServerContext, rounds_done: int) -> dict[str, float]:
        """``{"cas", "fid"}`` of the generator on a fixed evaluation set (same prompts and seeds every
        round), and its sample grid ``samples/round_<rounds_done>.png``. Needs ``evaluate_generator``."""
        from fedmmkt_plugins.evaluation.oracle import frechet_distance
        from fedmmkt_plugins.evaluation.sample_grid import save_sample_grid

        cfg = self.config
        assert self.oracle is not None and ctx.generator is not None
        class_ids = np.repeat(np.arange(ctx.task.num_classes), cfg.eval_samples_per_class)
        with ctx.phase("evaluate_generator"):
            seeds = [ctx.seed_for("evaluate_generator", self.oracle_purpose, j) for j in range(len(class_ids))]
            images = ctx.generator.generate([self.class_prompts[c] for c in class_ids], seeds)
            cas = self.oracle.cas(images, class_ids)
            fid = frechet_distance(self.oracle.features(images), self.reference_features)
        save_sample_grid(
            ctx.run_dir.root / "samples" / f"round_{rounds_done:03d}.png", images, class_ids, cfg.grid_columns
        )
        return {"cas": cas, "fid": fid}


def mean_train_loss(replies: dict[int, Message]) -> dict[str, float]:
    """``train_loss``: the clients' mean reported loss (absent when every client withheld it, as under DP)."""
    losses = [float(r.config["loss"]) for r in replies.values() if "loss" in r.config]
    return {"train_loss": float(np.mean(losses))} if losses else {}
