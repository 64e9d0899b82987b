"""What an algorithm sees during a run: the server side of the trust boundary.

:class:`ServerContext` holds the task, the evaluation/oracle/public data (:class:`ServerData`), the
components, message exchange, phases and seeds. It never holds a client's training data or the
partition: clients are built on their own side by :class:`fedmmkt_core.client.ClientFactory`, and an
algorithm reaches them only through :meth:`ServerContext.exchange`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmmkt_core.data import ServerData, TaskSpec
from fedmmkt_core.errors import ClientFailure
from fedmmkt_core.models import build_client_model
from fedmmkt_core.seeding import derive_seed
from fedmmkt_core.wire import Message, MessageError, check_reply_fields, traffic_nbytes

if TYPE_CHECKING:
    from fedmmkt_core.interfaces import Aggregator, AlignmentLoss, Backend, ClientModel, Generator
    from fedmmkt_core.recipe import Recipe
    from fedmmkt_core.rundir import RunDirectory

log = logging.getLogger("fedmmkt")

EventSink = Callable[..., None]


class RoundFailed(Exception):
    """Too few clients answered for the round to go on (see ``federation.min_clients``)."""


@dataclass
class ClientInfo:
    """What the server knows about client ``client_id`` (never its data)."""

    client_id: int
    group_index: int


@dataclass
class RoundStats:
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    # client id -> accuracy its fit reply carried (the fit message asked to EVALUATE_AFTER_FIT)
    accuracy_after_fit: dict[int, float] = field(default_factory=dict)


class ServerContext:
    """The server side of one run. Algorithms use :meth:`exchange` to talk to clients."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: RunDirectory,
        data: ServerData,
        events: EventSink | None = None,
    ):
        self.recipe = recipe
        self.run_dir = run_dir
        self.data = data
        self.task: TaskSpec = data.task
        self.clients: list[ClientInfo] = []
        for group_index, group in enumerate(recipe.clients):
            for _ in range(group.count):
                self.clients.append(ClientInfo(len(self.clients), group_index))
        self.events: EventSink = events or (lambda *args, **kwargs: None)
        self.aggregator: Aggregator | None = None
        self.generator: Generator | None = None
        self.alignment_losses: list[tuple[AlignmentLoss, float]] = []
        self._backend: Backend | None = None
        self.round_index = 0
        self.rounds_completed_at_start = 0
        self.sampled: list[int] = []
        self.stats = RoundStats()
        # Under DP: the largest ε each client reported in a reply (computed by the client from its own
        # ledger, see fedmmkt_core.privacy); what the run reports as privacy_epsilon.
        self.reported_epsilon: dict[int, float] = {}

    # ------------------------------------------------------------------ seeds
    def seed_for(self, *keys: str | int) -> int:
        """A seed for one purpose, e.g. ``ctx.seed_for("fit", round, client)``."""
        return derive_seed(self.recipe.seed, *keys)

    # ------------------------------------------------------------------ clients
    def attach_backend(self, backend: Backend) -> None:
        """Route :meth:`exchange` through ``backend`` (the runner does this once, before ``start``).

        The context offers no attribute that hands the backend out: server code reaches clients only
        by messages (:meth:`exchange`, :meth:`evaluate_clients`). A backend keeps its clients where
        nothing reachable from the context leads (see ``docs/design.md``, "The trust boundary")."""
        self._backend = backend

    def commit_round(self, round_index: int) -> None:
        """Tell the backend the round finished (the runner calls this; client state to resume from)."""
        if self._backend is not None:
            self._backend.commit_round(round_index)

    def build_client_model(self, client_id: int) -> ClientModel:
        """An untrained model of client ``client_id``'s architecture and initial weights (no data)."""
        return build_client_model(self.recipe, self.task, client_id)

    def sample_clients(self, round_index: int) -> list[int]:
        fed = self.recipe.federation
        total = len(self.clients)
        count = min(total, max(fed.min_clients, int(round(fed.sample_fraction * total))))
        if count == total:
            return list(range(total))
        rng = np.random.default_rng(self.seed_for("sample", round_index))
        return sorted(int(k) for k in rng.choice(total, size=count, replace=False))

    # ------------------------------------------------------------------ rounds
    def begin_round(self, round_index: int) -> None:
        self.round_index = round_index
        self.stats = RoundStats()
        self.sampled = self.sample_clients(round_index)

    @contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Time a phase and report progress: ``with ctx.phase("fit", total=n) as advance: advance(1)``."""
        self.events("phase_start", name=name, total=total)
        start = time.perf_counter()
        try:
            yield lambda n=1: self.events("phase_advance", name=name, advance=n)
        finally:
            seconds = time.perf_counter() - start
            self.stats.phase_seconds[name] = self.stats.phase_seconds.get(name, 0.0) + seconds
            self.events("phase_end", name=name, seconds=seconds)

    def exchange(
        self,
        phase: str,
        messages: Mapping[int, Message],
        expect: str | None = None,
        validate: Callable[[int, Message], None] | None = None,
        count_bytes: bool = True,
        required: int | None = None,
    ) -> dict[int, Message]:
        """Send ``messages`` (client id -> message) through the backend and return the good replies.

        A client that raised, replied with the wrong type (``expect``) or failed ``validate`` is
        recorded in the round's failures and left out. Fewer than ``required`` good replies
        (default: ``federation.min_clients``) raises :class:`RoundFailed`. A good fit reply's
        ``accuracy`` (asked for by :data:`~fedmmkt_core.wire.EVALUATE_AFTER_FIT`) is kept for
        :meth:`evaluate_clients`; that evaluation is not counted as traffic.
        """
        if self._backend is None:
            raise RuntimeError("no backend started")
        with self.phase(phase, total=len(messages)) as advance:
            replies = self._backend.exchange(messages, self.round_index, progress=advance)
        good: dict[int, Message] = {}
        for client_id, message in messages.items():
            if count_bytes:
                self.stats.bytes_down[client_id] = self.stats.bytes_down.get(client_id, 0) + traffic_nbytes(message)
            reply = replies.get(client_id, ClientFailure(client_id, "no reply"))
            try:
                if isinstance(reply, BaseException):
                    raise reply
                if count_bytes:
                    self.stats.bytes_up[client_id] = self.stats.bytes_up.get(client_id, 0) + traffic_nbytes(reply)
                self._note_epsilon(client_id, reply)
                if expect is not None and reply.type != expect:
                    raise MessageError(f"expected a '{expect}' reply, got '{reply.type}'")
                check_reply_fields(reply)
                if validate is not None:
                    validate(client_id, reply)
            except Exception as exc:  # every client fault is recorded, never fatal by itself
                reason = exc.reason if isinstance(exc, ClientFailure) else f"{type(exc).__name__}: {exc}"
                self.stats.failures.append({"client": client_id, "phase": phase, "reason": reason})
                self.events("failure", client=client_id, phase=phase, reason=reason)
                log.warning("round %d, %s: client %d failed: %s", self.round_index + 1, phase, client_id, reason)
                continue
            good[client_id] = reply
            if reply.type == "fit_reply" and "accuracy" in reply.config:
                self.stats.accuracy_after_fit[client_id] = float(reply.config["accuracy"])
        needed = min(self.recipe.federation.min_clients if required is None else required, len(messages))
        if len(good) < needed:
            reasons = "; ".join(
                f"client {f['client']}: {f['reason']}" for f in self.stats.failures if f["phase"] == phase
            )
            raise RoundFailed(
                f"round {self.round_index + 1}, phase '{phase}': only {len(good)} of {len(messages)} clients "
                f"replied successfully, fewer than min_clients={needed} ({reasons})"
            )
        return good

    def _note_epsilon(self, client_id: int, reply: Message) -> None:
        """Keep the ε a client reported (also from a reply that fails the algorithm's checks: its
        upload was made and counted on its side)."""
        value = reply.config.get("privacy_epsilon")
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < float("inf"):
            self.reported_epsilon[client_id] = max(self.reported_epsilon.get(client_id, 0.0), float(value))

    def evaluate_clients(self, arrays: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Every client's accuracy on the held-out test split (evaluation traffic is not counted).

        ``client_accuracy`` holds every client that answered; ``client_accuracy_mean`` / ``_min`` leave
        out the clients that failed earlier in this round (their reply was rejected: NaN, wrong shape,
        raised, timed out...), whose accuracies are also in ``client_accuracy_failed`` (present only when
        one failed). When every evaluated client failed this round, mean and min are left out.

        Without ``arrays``, a client whose fit reply this round carried its accuracy (the algorithm's fit
        message set :data:`~fedmmkt_core.wire.EVALUATE_AFTER_FIT`) is not asked again: only the others
        (not sampled, failed, or not asked) get an ``evaluate`` message, and none is sent when every
        client answered in its fit reply. With ``arrays`` (e.g. FedAvg's global weights) every client is."""
        failed = {int(f["client"]) for f in self.stats.failures}  # this round's, before the evaluation
        known = {} if arrays else {k: v for k, v in self.stats.accuracy_after_fit.items() if k not in failed}
        accuracy = dict(known)
        asked = [info.client_id for info in self.clients if info.client_id not in known]
        if asked:
            messages = {k: Message("evaluate", {}, dict(arrays or {})) for k in asked}
            replies = self.exchange(
                "evaluate", messages, expect="evaluate_reply", count_bytes=False, required=0 if known else 1
            )
            accuracy.update({k: float(reply.config["accuracy"]) for k, reply in replies.items()})
        return accuracy_metrics(dict(sorted(accuracy.items())), failed)


def accuracy_metrics(accuracy: Mapping[int, float], failed: set[int]) -> dict[str, Any]:
    """The round's accuracy metrics: mean and min over the clients not in ``failed``; see
    :meth:`ServerContext.evaluate_clients`."""
    honest = [v for k, v in accuracy.items() if k not in failed]
    metrics: dict[str, Any] = {}
    if honest:
        metrics["client_accuracy_mean"] = float(np.mean(honest))
        metrics["client_accuracy_min"] = float(np.min(honest))
    metrics["client_accuracy"] = {str(k): v for k, v in accuracy.items()}
    if failed & accuracy.keys():
        metrics["client_accuracy_failed"] = {str(k): v for k, v in accuracy.items() if k in failed}
    return metrics


RunContext = ServerContext  # the name algorithms were written against
