"""KD aggregator: the federation's soft labels as a weighted (or robust) average of client predictions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field

from fedmmkt_core.errors import ClientFailure
from fedmmkt_core.interfaces import Aggregator, ClientReply, ComponentConfig


class KDConfig(ComponentConfig):
    temperature: float = Field(1.0, gt=0, description="softmax temperature T applied to client logits")
    weighting: Literal["uniform", "samples", "confidence", "entropy", "class_aware"] = Field(
        "uniform",
        description=(
            "client weights: equal; by training-sample count; per sample by the client's max probability; "
            "per sample by 1 - normalised entropy; per class by the client's count of that class "
            "(a client without a class does not vote on it)"
        ),
    )
    robust: Literal["none", "median", "trimmed_mean", "screen"] = Field(
        "none",
        description="median / trimmed_mean: coordinate-wise over clients instead of the weighted mean (with "
        "class_aware weighting only the clients holding a class vote on it, one voice each); screen: drop the "
        "clients whose top-1 labels disagree with that median consensus, then the weighted mean of the rest "
        "with every claimed class count capped at 3x the median claim",
    )
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="share cut from each end for trimmed_mean")
    screen_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="screen drops a client agreeing with the consensus on fewer samples than this share "
        "of the clients' median agreement",
    )


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class KDAggregator(Aggregator):
    """q_j = sum_k w_kj softmax(z_kj / T) / sum_k w_kj, with uniform, sample-count, confidence,
    entropy or class-aware weights; or a coordinate-wise median / trimmed mean for robustness."""

    Config = KDConfig
    config: KDConfig

    def aggregate(self, round_index: int, replies: Sequence[ClientReply]) -> np.ndarray:
        self.check_replies(replies)
        probs = np.stack([softmax(r.logits, self.config.temperature) for r in replies])  # [K, N, C]
        cfg = self.config
        self.excluded = []
        self.weighting = self._effective_weighting(replies)
        class_aware = self.weighting == "class_aware" and cfg.robust != "none"
        voters = self._class_holders(replies, probs.shape[-1]) if class_aware else None
        if cfg.robust in ("median", "trimmed_mean"):
            q = _robust_mean(probs, voters, cfg.robust, cfg.trim_fraction)
        else:
            keep = np.ones(len(replies), dtype=bool)
            if cfg.robust == "screen":
                keep = self._screen(probs, voters)
                self.excluded = [r.client_id for r, kept in zip(replies, keep, strict=True) if not kept]
            kept_replies = [r for r, kept in zip(replies, keep, strict=True) if kept]
            weights = self._weights(kept_replies, probs[keep], cap_counts=cfg.robust == "screen")
            q = (weights * probs[keep]).sum(axis=0) / np.maximum(weights.sum(axis=0), 1e-12)
        q = np.maximum(q, 0.0)
        return (q / q.sum(axis=-1, keepdims=True)).astype(np.float32)

    def _effective_weighting(self, replies: Sequence[ClientReply]) -> str:
        """The configured weighting, or uniform when a client withheld what it needs (every client under the
        recipe's DP; a site that runs under its own DP in a recipe without it)."""
        kind = self.config.weighting
        if kind == "class_aware" and any(r.class_counts is None for r in replies):
            return "uniform"
        if kind == "samples" and any(r.num_samples <= 0 for r in replies):
            return "uniform"
        return kind

    def _class_holders(self, replies: Sequence[ClientReply], num_classes: int) -> np.ndarray:
        """[K, C] True where client k holds class c (everyone, for a class nobody holds).

        A client's claimed counts decide only whether it votes on a class, never how loudly, so
        inflated counts buy a robust aggregate nothing."""
        holders = np.stack([_counts(r, num_classes) for r in replies]) > 0
        holders[:, ~holders.any(axis=0)] = True
        return holders

    def _screen(self, probs: np.ndarray, voters: np.ndarray | None) -> np.ndarray:
        """[K] True for the clients to keep: a client's agreement is the share of samples whose
        consensus class it holds on which its top-1 label is the consensus's."""
        consensus = _robust_mean(probs, voters, "median", 0.0).argmax(axis=-1)  # [N]
        top = probs.argmax(axis=-1)  # [K, N]
        agree = top == consensus[None, :]
        if voters is not None:
            counted = voters[:, consensus]  # [K, N]: the client holds the consensus class
            agreement = (agree & counted).sum(axis=1) / np.maximum(counted.sum(axis=1), 1)
        else:
            agreement = agree.mean(axis=1)
        return agreement >= self.config.screen_fraction * float(np.median(agreement))

    def _weights(self, replies: Sequence[ClientReply], probs: np.ndarray, cap_counts: bool = False) -> np.ndarray:
        """Weights broadcastable to ``probs`` [K, N, C]."""
        num_clients, _, num_classes = probs.shape
        kind = getattr(self, "weighting", self.config.weighting)
        if kind == "uniform":
            return np.ones((num_clients, 1, 1))
        if kind == "samples":
            samples = np.array([max(r.num_samples, 0) for r in replies], dtype=np.float64)
            if cap_counts:
                samples = np.minimum(samples, 3.0 * np.median(samples))
            return samples[:, None, None]
        if kind == "confidence":
            return probs.max(axis=-1, keepdims=True)
        if kind == "entropy":
            entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=-1, keepdims=True)
            return 1.0 - entropy / np.log(num_classes) + 1e-6
        counts = np.stack([_counts(r, num_classes) for r in replies]).astype(np.float64)  # [K, C]
        if cap_counts:  # a claim far above the others' for the same class buys no extra say
            cap = [3.0 * float(np.median(column[column > 0])) if (column > 0).any() else 0.0 for column in counts.T]
            counts = np.minimum(counts, np.array(cap)[None, :])
        no_holder = counts.sum(axis=0) == 0
        counts[:, no_holder] = 1.0  # nobody holds the class: everyone votes equally on it
        return counts[:, None, :]


def _counts(reply: ClientReply, num_classes: int) -> np.ndarray:
    if reply.class_counts is None or reply.class_counts.shape != (num_classes,):
        raise ClientFailure(reply.client_id, f"class_aware weighting needs class_counts of shape ({num_classes},)")
    return np.maximum(reply.class_counts, 0)


def _robust_mean(probs: np.ndarray, voters: np.ndarray | None, kind: str, fraction: float) -> np.ndarray:
    """Coordinate-wise median or trimmed mean over clients of ``probs`` [K, N, C]; with ``voters``
    [K, C], column c only over the clients that vote on class c."""
    if voters is None:
        voters = np.ones((probs.shape[0], probs.shape[-1]), dtype=bool)
    q = np.empty(probs.shape[1:], dtype=np.float64)
    for c in range(probs.shape[-1]):
        column = np.sort(probs[voters[:, c], :, c], axis=0)  # [voters, N]
        if kind == "median":
            q[:, c] = np.median(column, axis=0)
        else:
            cut = int(np.floor(fraction * column.shape[0]))
            q[:, c] = column[cut : column.shape[0] - cut].mean(axis=0)
    return q
