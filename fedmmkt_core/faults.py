"""Fault injection: make the clients of one recipe group misbehave, to test what a run does about it.

A group's ``fault`` (see :class:`FaultSpec`) is applied on the client side by
:class:`~fedmmkt_core.client.ClientRuntime`, so it works the same on every backend. Faults fire on
``fit`` and ``predict`` messages (the ones whose replies the server aggregates), decided per message
from the message's seed, so a run with faults is as reproducible as one without.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .seeding import derive_seed

FaultType = Literal["raise", "slow", "dropout", "nan", "inf", "wrong_shape", "huge", "flip", "poison"]

FAULT_DESCRIPTIONS: dict[str, str] = {
    "raise": "the client raises an exception while training",
    "slow": "the client takes `seconds` longer than usual (a straggler)",
    "dropout": "the client vanishes: no reply at all",
    "nan": "uploaded logits are NaN",
    "inf": "uploaded logits are +inf",
    "wrong_shape": "uploaded logits miss their last class column",
    "huge": "uploaded logits are multiplied by `scale`",
    "flip": "uploaded logits confidently name the wrong class (the honest top class + 1)",
    "poison": "flip, and the client claims `scale` times its class counts to dominate weighted averages",
}


CRASH_ENV = "FEDMMKT_CRASH_AT"
_crash_counts: dict[str, int] = {}


def crash_point(tag: str) -> None:
    """Testing hook: ``FEDMMKT_CRASH_AT=TAG#N`` makes this process SIGKILL itself the N-th time it
    reaches ``crash_point(TAG)`` (tags: ``round_start``, ``client_saved``, ``metrics_written``,
    ``write:FILE_NAME`` between writing a file's temporary copy and renaming it into place)."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted or wanted.rpartition("#")[0] != tag:
        return
    _crash_counts[tag] = _crash_counts.get(tag, 0) + 1
    if str(_crash_counts[tag]) == wanted.rpartition("#")[2]:
        os.kill(os.getpid(), signal.SIGKILL)


class ClientDropout(Exception):
    """Raised on the client side to simulate a client that disappears without replying."""


class FaultSpec(BaseModel):
    """How the clients of one group misbehave (testing and robustness studies only)."""

    model_config = ConfigDict(extra="forbid")

    type: FaultType = Field(description="; ".join(f"{k}: {v}" for k, v in FAULT_DESCRIPTIONS.items()))
    probability: float = Field(1.0, ge=0, le=1, description="chance that a fit/predict message triggers the fault")
    seconds: float = Field(30.0, ge=0, description="extra time a `slow` client takes")
    scale: float = Field(1e4, gt=0, description="factor for `huge` logits and `poison` class counts")

    def fires(self, seed: int, client_id: int) -> bool:
        """Whether the fault hits the message with this seed (deterministic)."""
        if self.probability >= 1.0:
            return True
        rng = np.random.default_rng(derive_seed(seed, "fault", client_id))
        return bool(rng.random() < self.probability)

    def before_work(self, abandoned: threading.Event | None = None) -> None:
        """Faults that strike before the client computes anything. A ``slow`` client stops
        waiting as soon as ``abandoned`` is set (the server gave up on it)."""
        if self.type == "raise":
            raise RuntimeError("injected fault: the client raised during training")
        if self.type == "dropout":
            raise ClientDropout("injected fault: the client dropped out")
        if self.type == "slow" and (abandoned or threading.Event()).wait(self.seconds):
            raise ClientDropout("injected fault: the slow client was abandoned")

    def tamper(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Corrupt the uploaded ``logits`` (and ``class_counts``) the way this fault says."""
        if "logits" not in arrays:
            return arrays
        logits = np.asarray(arrays["logits"])
        dtype = logits.dtype
        tampered = dict(arrays)
        if self.type == "nan":
            tampered["logits"] = np.full_like(logits, np.nan)
        elif self.type == "inf":
            tampered["logits"] = np.full_like(logits, np.inf)
        elif self.type == "wrong_shape":
            tampered["logits"] = logits[:, :-1]
        elif self.type == "huge":
            tampered["logits"] = (logits.astype(np.float32) * self.scale).astype(dtype)
        elif self.type in ("flip", "poison"):
            wrong = (np.argmax(logits, axis=1) + 1) % logits.shape[1]
            flipped = np.zeros(logits.shape, dtype=np.float32)
            flipped[np.arange(len(logits)), wrong] = 20.0
            tampered["logits"] = flipped.astype(dtype)
            if self.type == "poison" and "class_counts" in arrays:
                counts = np.asarray(arrays["class_counts"])
                tampered["class_counts"] = (np.maximum(counts, 1) * self.scale).astype(counts.dtype)
        return tampered
