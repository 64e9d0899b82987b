"""The embedded backend: every client runs in this process, one at a time.

Messages still go through their wire encoding both ways, so the privacy contract and the byte
counts are exactly those of a distributed run. Client models are materialised when a message
arrives and their weights kept on disk, so memory does not grow with the number of clients
(``resident_clients`` keeps a bounded number in memory instead).
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import Field

from fedmmkt_core.client import ClientFactory, ClientRuntime, ClientStateStore
from fedmmkt_core.errors import ClientFailure
from fedmmkt_core.faults import ClientDropout, crash_point
from fedmmkt_core.interfaces import Backend, ComponentConfig
from fedmmkt_core.server.context import ServerContext
from fedmmkt_core.server.failures import find_culprit
from fedmmkt_core.wire import Message

log = logging.getLogger("fedmmkt")

# The machine's storage failing (disk full, quota, read-only, I/O): stops the run naming the path
MACHINE_STORAGE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


class InProcessConfig(ComponentConfig):
    resident_clients: int = Field(0, ge=0, description="clients kept built in memory between messages (0 = none)")


class _ClientSide:
    """The simulated clients' side of one run: their factory (which holds every client's share), their
    state on disk and the clients kept built. Lives in :data:`_CLIENT_SIDES`, never on the backend."""

    __slots__ = ("_store", "factory", "resident", "root", "stale_from")

    def __init__(self, factory: ClientFactory, root: Path, stale_from: int) -> None:
        self.factory = factory
        self.root = root
        self.stale_from = stale_from
        self._store: ClientStateStore | None = None
        self.resident: OrderedDict[int, ClientRuntime] = OrderedDict()

    @property
    def store(self) -> ClientStateStore:
        """The clients' state on disk, opened at the first exchange rather than at start (a resume refused
        before its first round leaves the run directory as it was); drops what an interrupted round left."""
        if self._store is None:
            self._store = ClientStateStore(self.root)
            self._store.discard_from(self.stale_from)
        return self._store


# The client side of every started in-process backend, by the backend's ticket. The server side (the
# ServerContext, and this backend, which the context routes messages through) holds only the ticket,
# an int: no attribute, container or closure reachable from the context leads to a client object or
# its data. Code that imports this module can still reach it, as any code in one process can reach
# anything; the separation against such code is a process boundary (the Flower backend).
_CLIENT_SIDES: dict[int, _ClientSide] = {}
_tickets = itertools.count(1)


class InProcessBackend(Backend):
    """Runs clients sequentially in this process; weights live in the run's checkpoint folder."""

    Config = InProcessConfig
    config: InProcessConfig

    def start(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.stop()  # a backend started again (a second run) lets go of its earlier clients first
        factory = ClientFactory(ctx.recipe)  # the simulated clients' side: never handed to the server
        _ = factory.task  # loads and partitions the clients' data now: a bad partition fails before round 1
        self._ticket = next(_tickets)
        _CLIENT_SIDES[self._ticket] = _ClientSide(factory, ctx.run_dir.client_state_dir, ctx.rounds_completed_at_start)

    def _side(self) -> _ClientSide:
        side = _CLIENT_SIDES.get(getattr(self, "_ticket", 0))
        if side is None:
            raise RuntimeError("the in-process backend is not started")
        return side

    def _runtime(self, side: _ClientSide, client_id: int, round_index: int) -> ClientRuntime:
        runtime = side.resident.pop(client_id, None)
        if runtime is None:
            runtime = side.factory.build(client_id, ledger=side.store.ledger(client_id))
            weights = side.store.load(client_id, up_to_round=round_index)
            if weights is not None:
                runtime.model.set_weights(weights)
        return runtime

    def exchange(
        self,
        messages: Mapping[int, Message],
        round_index: int,
        progress: Callable[[int], None] | None = None,
    ) -> dict[int, Message | BaseException]:
        side = self._side()
        replies: dict[int, Message | BaseException] = {}
        timeout = self.ctx.recipe.federation.round_timeout
        for client_id in sorted(messages):
            try:
                runtime = self._runtime(side, client_id, round_index)
                runtime.weights_changed = False
                request = Message.decode(messages[client_id].encode())
                reply = runtime.handle(request) if timeout is None else _within(timeout, runtime, request)
                replies[client_id] = Message.decode(reply.encode())
                if runtime.weights_changed:
                    side.store.save(client_id, round_index, runtime.model.get_weights())
                    crash_point("client_saved")
                if self.config.resident_clients:
                    side.resident[client_id] = runtime
                    while len(side.resident) > self.config.resident_clients:
                        side.resident.popitem(last=False)
            except ClientDropout:
                replies[client_id] = ClientFailure(client_id, "dropped out: no reply")
            except TimeoutError:
                replies[client_id] = ClientFailure(client_id, f"timed out: no reply within round_timeout={timeout}s")
            except OSError as exc:
                if exc.errno in MACHINE_STORAGE_ERRORS:
                    # In-process every client writes to this machine's disk: a full or read-only disk is the
                    # run's problem (stop, resume later), not client N's fault to be recorded and skipped.
                    raise
                replies[client_id] = ClientFailure(client_id, f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # the client's fault is reported, the round decides
                replies[client_id] = ClientFailure(client_id, f"{type(exc).__name__}: {exc}")
                culprit = find_culprit(exc, getattr(self.ctx.recipe, "_registry", None))
                where = culprit.label() if culprit is not None else "its code"
                log.info("client %d: %s raised %s", client_id, where, type(exc).__name__, exc_info=exc)
            if progress is not None:
                progress(1)
        return replies

    def commit_round(self, round_index: int) -> None:
        side = self._side()
        for info in self.ctx.clients:
            side.store.prune(info.client_id, keep_round=round_index - 1)

    def stop(self) -> None:
        side = _CLIENT_SIDES.pop(getattr(self, "_ticket", 0), None)
        if side is not None:
            side.resident.clear()


def _within(timeout: float, runtime: ClientRuntime, request: Message) -> Message:
    """Run one client's work with a deadline. Clients run one after another here, so each gets
    ``timeout`` seconds of its own, as if they ran in parallel on a real federation. A client past
    its deadline is abandoned: a thread cannot be killed, so it finishes in the background (a daemon,
    which never holds up the process's exit), but its reply and its weights are thrown away."""
    outcome: list[Message | BaseException] = []

    def work() -> None:
        try:
            outcome.append(runtime.handle(request))
        except BaseException as exc:  # handed to the caller's thread below
            outcome.append(exc)

    thread = threading.Thread(target=work, name=f"client-{runtime.client_id}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        runtime.abandoned.set()
        raise TimeoutError
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]
