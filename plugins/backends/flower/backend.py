"""The server side of the Flower backend: the registered :class:`FlowerBackend`.

Outside a ServerApp, :meth:`FlowerBackend.launch` submits the run to Flower (:mod:`.packaging`). Inside
one, :mod:`.server_app` builds the backend, binds it to the ServerApp's grid (:meth:`FlowerBackend.bind`)
and hands that very object to the :class:`~fedmmkt_core.server.runner.Runner`, whose ``launch`` call then
returns None and whose round loop exchanges messages through the grid.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from fedmmkt_plugins.backends.flower.codec import flower_nbytes, from_records, to_records
from fedmmkt_plugins.backends.flower.processes import require_flwr
from pydantic import Field

from fedmmkt_core.errors import ClientFailure, UserError
from fedmmkt_core.interfaces import Backend, ComponentConfig
from fedmmkt_core.paths import InputPath
from fedmmkt_core.rundir import atomic_write_bytes, atomic_write_json, atomic_write_text
from fedmmkt_core.wire import DEFAULT_MAX_BYTES, Message

if TYPE_CHECKING:
    from fedmmkt_core.server.context import ServerContext
    from fedmmkt_core.server.runner import Runner

log = logging.getLogger("fedmmkt")

WIRE_FILE = "flower_wire.jsonl"  # bytes per message as Flower serializes it vs the toolkit's count
NODES_FILE = "flower_nodes.json"  # client -> node, and the nodes refused (node_ids) with the reason
REPLIES_FOLDER = "flower_replies"  # record_replies: every reply as it arrived from its node
FLOWER_TYPES = {"fit": "train", "evaluate": "evaluate"}  # everything else travels as "query"


class FlowerConfig(ComponentConfig):
    mode: Literal["deployment", "simulation"] = Field(
        "deployment",
        description="deployment: a running SuperLink and SuperNodes; simulation: Flower's simulation engine "
        "on this machine, one virtual SuperNode per client (needs Ray: pip install 'fedmmkt[flower-simulation]')",
    )
    superlink: str = Field("127.0.0.1:8000", description="deployment: the SuperLink's address host:port")
    insecure: bool = Field(False, description="deployment: plain HTTP to the SuperLink (loopback tests only)")
    root_certificates: InputPath | None = Field(
        None, description="deployment: PEM CA bundle that signed the SuperLink's TLS certificate"
    )
    connection: str | None = Field(
        None,
        description="deployment: use this named SuperLink connection from your Flower config "
        "($FLWR_HOME/config.toml, e.g. one set up by `flwr login`) instead of superlink/insecure",
    )
    server_dir: str | None = Field(
        None,
        description="deployment: an absolute folder on the ServerApp's machine (the SuperLink's) where the run "
        "directory is written, as SERVER_DIR/RUN_KEY; for a `fedmmkt run` that shares no filesystem with the "
        "SuperLink: the run's files (metrics, summary, status, grids; not checkpoints) come back through "
        "Flower's log stream into --out, and --resume continues the server's copy. Default: the ServerApp "
        "writes --out itself (a shared filesystem)",
    )
    node_ids: dict[int, int] | None = Field(
        None,
        description="deployment: client id -> the node id Flower assigned to that client's SuperNode key "
        "(`flwr supernode register` prints it; `fedmmkt federation up --auth` writes node_ids.json). A node "
        "that answers for a client it is not bound to is refused and recorded in RUN_DIR/flower_nodes.json. "
        "Binding means something only on a SuperLink started with --enable-supernode-auth",
    )
    node_wait_seconds: float = Field(
        120.0, gt=0, description="how long the ServerApp waits for every client's SuperNode to register"
    )
    poll_seconds: float = Field(0.3, gt=0, description="how often the ServerApp polls the SuperLink for replies")
    max_message_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0, description="largest message accepted from a peer")
    record_replies: bool = Field(
        False,
        description="audit: write every node's reply as it arrived (the toolkit's wire encoding, "
        "Message.decode reads it) to RUN_DIR/flower_replies/round<R>-client<K>-<N>-<type>.msg, failed rounds "
        "included; failures and refusals get their reason in flower_wire.jsonl",
    )
    num_cpus_per_client: int = Field(
        1, ge=1, description="simulation: CPUs Ray reserves per client, so at most ray_num_cpus / this run at once"
    )
    ray_num_cpus: int | None = Field(
        None, ge=1, description="simulation: CPUs Ray may use in all (default: every core of the machine)"
    )
    ray_object_store_fraction: float = Field(
        0.05,
        gt=0,
        le=0.8,
        description="simulation: share of RAM for Ray's object store (Ray's default is 0.3; messages "
        "go through the SuperLink, not the object store)",
    )


class FlowerBackend(Backend):
    """Clients are Flower SuperNodes; the round loop runs in Flower's ServerApp."""

    Config = FlowerConfig
    config: FlowerConfig

    def __init__(self, config: ComponentConfig | None = None):
        super().__init__(config)
        self.grid: Any = None  # the ServerApp's grid, once bound

    def bind(self, grid: Any) -> FlowerBackend:
        """Attach the grid of the ServerApp this backend serves in; then the round loop runs here."""
        self.grid = grid
        return self

    # -------------------------------------------------------------------- launching
    def launch(self, runner: Runner) -> dict[str, Any] | None:
        if self.grid is not None:
            return None  # bound to a ServerApp's grid: run the round loop here
        require_flwr()
        from fedmmkt_plugins.backends.flower.packaging import launch_deployment, launch_simulation

        if self.config.mode == "simulation":
            return launch_simulation(self.config, runner)
        return launch_deployment(self.config, runner)

    # -------------------------------------------------------------------- in the ServerApp
    def start(self, ctx: ServerContext) -> None:
        if self.grid is None:
            raise UserError("the flower backend runs inside Flower's ServerApp: start it with `fedmmkt run`")
        self.ctx = ctx
        self.start_round = ctx.rounds_completed_at_start
        self.current_round = self.start_round
        self.node_of: dict[int, int] = {}
        self.refused: dict[int, str] = {}  # node id -> why it may not serve any client of this run
        bound = self.config.node_ids
        if bound is not None:
            unknown = sorted(set(bound) - {c.client_id for c in ctx.clients})
            if unknown:
                raise UserError(f"backend.params.node_ids: client ids {unknown} are not in the recipe")
            if len(set(bound.values())) != len(bound):
                raise UserError("backend.params.node_ids: two clients are bound to one node id")
        self.wire_rows: list[dict[str, Any]] = []
        self._drop_wire_rows_after(self.start_round)
        wanted = len(ctx.clients)
        deadline = time.monotonic() + self.config.node_wait_seconds
        while True:
            self._discover_nodes()
            if len(self.node_of) >= wanted or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        missing = [c.client_id for c in ctx.clients if c.client_id not in self.node_of]
        needed = ctx.recipe.federation.min_clients
        if wanted - len(missing) < needed:
            raise UserError(
                f"only {wanted - len(missing)} of {wanted} clients' SuperNodes registered within "
                f"{self.config.node_wait_seconds:g} s (missing partition-id {missing}); min_clients={needed}. "
                "Start one SuperNode per client with --node-config 'partition-id=K num-partitions=N'"
            )
        if missing:
            log.warning("no SuperNode for clients %s: they are recorded as failed each round", missing)
        log.info("Flower federation: client -> node %s", json.dumps(self.node_of, sort_keys=True))

    def _drop_wire_rows_after(self, completed: int) -> None:
        """On resume: forget rows of a round that was interrupted after ``commit_round``."""
        path = self.ctx.run_dir.root / WIRE_FILE
        if completed and path.exists():
            rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [line for line in rows if json.loads(line).get("round", 0) <= completed]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def _discover_nodes(self) -> None:
        """Ask every new SuperNode which client (partition-id) it holds."""
        alive = set(self.grid.get_node_ids())
        self.node_of = {cid: node for cid, node in self.node_of.items() if node in alive}
        new = sorted(alive - set(self.node_of.values()) - set(self.refused))
        bound = self.config.node_ids
        if bound is not None:
            for node in [n for n in new if n not in bound.values()]:
                self._refuse(node, "its node id is bound to no client of this run (backend.params.node_ids)")
            new = [n for n in new if n in bound.values()]
        if not new:
            return
        task = self.ctx.task  # a node with its own data folder checks its classes and geometry against it
        geometry = {"image_size": task.image_size, "channels": task.channels}
        config = {"task": {"class_names": list(task.class_names), **geometry}}
        hello = {-node: Message("hello", config) for node in new}  # keyed by -node id until we know the client
        replies = self._send({key: (msg, -key) for key, msg in hello.items()}, timeout=30.0, record=False)
        for key, reply in replies.items():
            if isinstance(reply, BaseException):
                log.warning("SuperNode %s did not answer who it is: %s", -key, reply)
                continue
            client_id = int(reply.config.get("client_id", -1))
            if not 0 <= client_id < len(self.ctx.clients):
                raise UserError(
                    f"SuperNode {-key} holds partition-id {client_id}, but the recipe has {len(self.ctx.clients)} "
                    "clients (ids 0..N-1)"
                )
            if bound is not None and bound.get(client_id) != -key:
                self._refuse(-key, f"it answers for client {client_id}, which is bound to node {bound.get(client_id)}")
                continue
            if client_id in self.node_of and self.node_of[client_id] != -key:
                raise UserError(f"two SuperNodes ({self.node_of[client_id]} and {-key}) hold partition-id {client_id}")
            self.node_of[client_id] = -key
        self._write_nodes()

    def _refuse(self, node: int, reason: str) -> None:
        log.warning("SuperNode %s refused: %s", node, reason)
        self.refused[node] = reason
        self._write_nodes()

    def _write_nodes(self) -> None:
        """RUN_DIR/flower_nodes.json: which node serves which client, and the nodes refused and why."""
        atomic_write_json(
            self.ctx.run_dir.root / NODES_FILE,
            {
                "client_to_node": {str(c): n for c, n in sorted(self.node_of.items())},
                "refused": {str(n): why for n, why in sorted(self.refused.items())},
            },
        )

    def exchange(
        self,
        messages: Mapping[int, Message],
        round_index: int,
        progress: Callable[[int], None] | None = None,
    ) -> dict[int, Message | BaseException]:
        self.current_round = round_index
        if any(cid not in self.node_of for cid in messages):
            self._discover_nodes()  # a node that restarted comes back with a new node id
        replies: dict[int, Message | BaseException] = {}
        routed: dict[int, tuple[Message, int]] = {}
        for client_id, message in messages.items():
            node = self.node_of.get(client_id)
            if node is None:
                replies[client_id] = ClientFailure(client_id, "its SuperNode is not connected to the SuperLink")
                if progress is not None:
                    progress(1)
            else:
                routed[client_id] = (message, node)
        replies.update(
            self._send(
                routed, timeout=self.ctx.recipe.federation.round_timeout, progress=progress, round_index=round_index
            )
        )
        return replies

    def _send(
        self,
        routed: Mapping[int, tuple[Message, int]],
        timeout: float | None,
        progress: Callable[[int], None] | None = None,
        round_index: int = -1,
        record: bool = True,
    ) -> dict[int, Message | BaseException]:
        """Push one Flower message per key, poll for the replies until all came or ``timeout`` passed.

        Every message carries the round it belongs to and the round the run started from: the
        ClientApp keeps its weights on its node's disk per round (see :mod:`.client_app`)."""
        from flwr.app import Message as FlowerMessage

        keys, outgoing = [], []
        for key, (message, node) in sorted(routed.items()):
            kind = FLOWER_TYPES.get(message.type, "query")
            content = to_records(message, self.current_round, self.start_round)
            outgoing.append(FlowerMessage(content, node, kind, group_id=str(round_index + 1)))
            keys.append(key)
        sizes = {key: flower_nbytes(msg) for key, msg in zip(keys, outgoing, strict=True)} if record else {}
        message_ids = list(self.grid.push_messages(outgoing))
        if len(message_ids) != len(keys):  # Flower returns [] when the SuperLink refuses the request (HTTP 413)
            message_ids = [""] * len(keys)
        pending = {mid: key for mid, key in zip(message_ids, keys, strict=True) if mid}
        replies: dict[int, Message | BaseException] = {
            key: ClientFailure(key, "the SuperLink refused the message (too large?)")
            for mid, key in zip(message_ids, keys, strict=True)
            if not mid
        }
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending and (deadline is None or time.monotonic() < deadline):
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    continue
                replies[key] = self._reply(key, reply)
                if record:
                    self._record(round_index, key, routed[key][0], sizes[key], replies[key], reply)
                if progress is not None:
                    progress(1)
            if pending:
                time.sleep(self.config.poll_seconds)
        for key in pending.values():
            replies[key] = ClientFailure(key, f"no reply within round_timeout={timeout:g} s")
            if progress is not None:
                progress(1)
        return replies

    def _reply(self, key: int, reply: Any) -> Message | BaseException:
        if reply.has_error():
            error = reply.error
            what = {5: "its SuperNode became unavailable", 8: "its ClientApp crashed"}.get(error.code, "Flower error")
            return ClientFailure(key, f"{what} (Flower error code {error.code}: {error.reason})")
        try:
            message = from_records(reply.content, self.config.max_message_bytes)
        except Exception as exc:
            return ClientFailure(key, f"{type(exc).__name__}: {exc}")
        if message.type == "error":
            return ClientFailure(key, str(message.config.get("reason", "unknown error")))
        return message

    def _record(self, round_index: int, client_id: int, sent: Message, sent_size: int, reply: Any, raw: Any) -> None:
        row = {
            "round": round_index + 1,
            "client": client_id,
            "type": sent.type,
            "down_toolkit_bytes": sent.nbytes,
            "down_flower_bytes": sent_size,
        }
        if isinstance(reply, Message):
            row.update(up_toolkit_bytes=reply.nbytes, up_flower_bytes=flower_nbytes(raw))
        elif isinstance(reply, ClientFailure):
            row["failure"] = reply.reason
        if self.config.record_replies and isinstance(reply, Message):
            folder = self.ctx.run_dir.root / REPLIES_FOLDER
            folder.mkdir(exist_ok=True)
            number = sum(1 for _ in folder.glob(f"round{round_index + 1}-client{client_id}-*"))
            name = f"round{round_index + 1}-client{client_id}-{number:03d}-{reply.type}.msg"
            atomic_write_bytes(folder / name, reply.encode())
        self.wire_rows.append(row)

    def commit_round(self, round_index: int) -> None:
        rows = [r for r in self.wire_rows if r["round"] == round_index + 1]
        self.wire_rows = [r for r in self.wire_rows if r["round"] != round_index + 1]
        with open(self.ctx.run_dir.root / WIRE_FILE, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")

    def release_nodes(self) -> None:
        """After a run that finished: every SuperNode deletes this run's client weights from its disk
        (a failed or interrupted run keeps them for ``--resume``). A node that does not answer keeps them."""
        if self.config.mode == "simulation":
            return  # the virtual nodes' state is in the run directory, kept as the in-process backend keeps it
        nodes = sorted(self.grid.get_node_ids())
        replies = self._send({-node: (Message("release", {}), node) for node in nodes}, timeout=30.0, record=False)
        for key, reply in replies.items():
            if isinstance(reply, BaseException):
                log.warning("SuperNode %s kept this run's client state: %s", -key, reply)

    def stop(self) -> None:
        self.node_of = {}
