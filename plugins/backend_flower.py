"""The Flower backend: the same recipe on a real Flower federation (deployment) or Flower's simulation engine.

The round loop runs inside Flower's ServerApp (:mod:`fedmmkt_plugins.flower_app`), which owns the
generator; every SuperNode runs one client (``partition-id`` in its node config) with the same
:class:`~fedmmkt_core.client.ClientRuntime` as the in-process backend, loading only its partition.

What travels is the toolkit's :class:`~fedmmkt_core.wire.Message` unchanged: its safetensors bytes as
one ``uint8`` Flower ``Array`` (stype ``fedmmkt.safetensors``) in an ``ArrayRecord``. One encoding
for every backend means one bounded decoder (:meth:`Message.decode`) validates every peer's bytes,
no pickle anywhere, and the toolkit's byte accounting is the payload Flower carries. Client weights
stay on the node, in the ClientApp's ``context.state``.

``fedmmkt run`` submits the run with ``flwr run`` (an app folder written to a temporary directory)
and waits for it; the ServerApp writes the run directory. :class:`LocalFederation` starts a
SuperLink and N SuperNodes on 127.0.0.1 (``fedmmkt federation up`` and the tests). In simulation
mode ``fedmmkt run`` starts a private ``--simulation`` SuperLink itself (one virtual SuperNode per
client, on Ray) and ends every process it started when the run is over.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from fedmmkt_core.errors import ClientFailure, MissingDependencyError, UserError
from fedmmkt_core.interfaces import Backend, ComponentConfig
from fedmmkt_core.paths import InputPath
from fedmmkt_core.wire import DEFAULT_MAX_BYTES, Message

if TYPE_CHECKING:
    from fedmmkt_core.context import ServerContext
    from fedmmkt_core.recipe import Recipe
    from fedmmkt_core.runner import Runner

log = logging.getLogger("fedmmkt")

INSTALL_HINT = "Install it with: pip install 'fedmmkt[flower]'"
RECORD = "fedmmkt"  # the ArrayRecord carrying the message
STYPE = "fedmmkt.safetensors"  # how the Array's bytes are serialized
STATUS_FILE = "flower_status.json"  # written by the ServerApp: finished / failed, and why
WIRE_FILE = "flower_wire.jsonl"  # bytes per message as Flower serializes it vs the toolkit's count
FLOWER_TYPES = {"fit": "train", "evaluate": "evaluate"}  # everything else travels as "query"


def require_flwr() -> None:
    """Raise a clear error with the install hint when flwr is missing."""
    try:
        import flwr  # noqa: F401
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("flwr", INSTALL_HINT) from exc


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
    node_wait_seconds: float = Field(
        120.0, gt=0, description="how long the ServerApp waits for every client's SuperNode to register"
    )
    poll_seconds: float = Field(0.3, gt=0, description="how often the ServerApp polls the SuperLink for replies")
    max_message_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0, description="largest message accepted from a peer")
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


# ---------------------------------------------------------------------------------------------- records
def to_records(message: Message) -> Any:
    """A toolkit message as Flower records: its safetensors bytes as one uint8 Array."""
    from flwr.app import Array, ArrayRecord, RecordDict

    blob = message.encode()
    array = Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)
    return RecordDict({RECORD: ArrayRecord(array_dict={"message": array})})


def from_records(content: Any, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Decode a toolkit message from Flower records (bounded, validated, no pickle)."""
    from fedmmkt_core.wire import MessageError

    record = content.array_records.get(RECORD) if content is not None else None
    array = record.get("message") if record is not None else None
    if array is None or array.stype != STYPE or array.dtype != "uint8":
        raise MessageError(f"Flower message carries no '{RECORD}' array of stype '{STYPE}'")
    if len(array.data) > max_bytes:
        raise MessageError(f"message of {len(array.data)} bytes exceeds the limit of {max_bytes}")
    return Message.decode(bytes(array.data), max_bytes=max_bytes)


def flower_nbytes(message: Any) -> int:
    """Bytes of a Flower message as it is serialized for transport: every object (message, records,
    arrays, 5 MiB array chunks) deflated with its header. HTTP framing is not included."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def client_recipe_text(recipe: Recipe) -> str:
    """What a SuperNode needs to rebuild its client: seed, data, clients, federation (no server settings)."""
    from fedmmkt_core.recipe import dump_yaml

    resolved = recipe.resolved()
    keep = {k: resolved[k] for k in ("fedmmkt", "name", "seed", "data", "clients", "federation")}
    keep.update(algorithm={"name": "local", "params": {}}, loggers=[])
    return dump_yaml(keep)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _unb64(text: str) -> str:
    return base64.b64decode(text.encode("ascii")).decode("utf-8")


# ---------------------------------------------------------------------------------------------- server
class _Hosted:
    """The Flower grid of the ServerApp this process runs in (None outside one)."""

    grid: Any = None


class FlowerBackend(Backend):
    """Clients are Flower SuperNodes; the round loop runs in Flower's ServerApp."""

    Config = FlowerConfig
    config: FlowerConfig

    # -------------------------------------------------------------------- launching
    def launch(self, runner: Runner) -> dict[str, Any] | None:
        if _Hosted.grid is not None:
            return None  # already inside the ServerApp: run the round loop here
        require_flwr()
        if runner.resume:
            raise UserError("--resume is not supported by the flower backend (client weights live on the SuperNodes)")
        if self.config.mode == "simulation":
            return _launch_simulation(self.config, runner)
        return _launch_deployment(self.config, runner)

    # -------------------------------------------------------------------- in the ServerApp
    def start(self, ctx: ServerContext) -> None:
        if _Hosted.grid is None:
            raise UserError("the flower backend runs inside Flower's ServerApp: start it with `fedmmkt run`")
        self.ctx = ctx
        self.grid = _Hosted.grid
        self.node_of: dict[int, int] = {}
        self.wire_rows: list[dict[str, Any]] = []
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

    def _discover_nodes(self) -> None:
        """Ask every new SuperNode which client (partition-id) it holds."""
        alive = set(self.grid.get_node_ids())
        self.node_of = {cid: node for cid, node in self.node_of.items() if node in alive}
        new = sorted(alive - set(self.node_of.values()))
        if not new:
            return
        hello = {-node: Message("hello", {}) for node in new}  # keyed by -node id until we know the client
        replies = self._send({key: (msg, -key) for key, msg in hello.items()}, timeout=30.0, record=False)
        for key, reply in replies.items():
            if isinstance(reply, BaseException):
                continue
            client_id = int(reply.config.get("client_id", -1))
            if not 0 <= client_id < len(self.ctx.clients):
                raise UserError(
                    f"SuperNode {-key} holds partition-id {client_id}, but the recipe has {len(self.ctx.clients)} "
                    "clients (ids 0..N-1)"
                )
            if client_id in self.node_of and self.node_of[client_id] != -key:
                raise UserError(f"two SuperNodes ({self.node_of[client_id]} and {-key}) hold partition-id {client_id}")
            self.node_of[client_id] = -key

    def exchange(
        self,
        messages: Mapping[int, Message],
        round_index: int,
        progress: Callable[[int], None] | None = None,
    ) -> dict[int, Message | BaseException]:
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
        """Push one Flower message per key, poll for the replies until all came or ``timeout`` passed."""
        from flwr.app import Message as FlowerMessage

        keys, outgoing = [], []
        for key, (message, node) in sorted(routed.items()):
            kind = FLOWER_TYPES.get(message.type, "query")
            outgoing.append(FlowerMessage(to_records(message), node, kind, group_id=str(round_index + 1)))
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
        self.wire_rows.append(row)

    def commit_round(self, round_index: int) -> None:
        rows = [r for r in self.wire_rows if r["round"] == round_index + 1]
        self.wire_rows = [r for r in self.wire_rows if r["round"] != round_index + 1]
        with open(self.ctx.run_dir.root / WIRE_FILE, "a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")

    def stop(self) -> None:
        self.node_of = {}


def serve(grid: Any, context: Any) -> None:
    """The ServerApp's main: run the recipe's round loop with this grid; write the status file."""
    from fedmmkt_core.recipe import parse_recipe
    from fedmmkt_core.runner import RunFailed, Runner

    config = context.run_config
    out = Path(str(config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s fedmmkt: %(message)s"))
    log.addHandler(handler)
    _Hosted.grid = grid
    status: dict[str, Any] = {"status": "failed", "error": "unknown", "message": "the ServerApp stopped early"}
    try:
        recipe = parse_recipe(_unb64(str(config["recipe"])), base_dir=str(config.get("base-dir", ".")))
        Runner(recipe, out).run()
        status = {"status": "finished"}
    except (RunFailed, UserError) as exc:
        status = {"status": "failed", "error": type(exc).__name__, "message": str(exc)}
        raise
    except Exception as exc:
        status = {"status": "failed", "error": type(exc).__name__, "message": f"{type(exc).__name__}: {exc}"}
        raise
    finally:
        _Hosted.grid = None
        log.removeHandler(handler)
        (out / STATUS_FILE).write_text(json.dumps(status), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- client
def handle_client(message: Any, context: Any) -> Any:
    """The ClientApp's handler: decode, run this node's ClientRuntime, encode the reply."""
    from flwr.app import Message as FlowerMessage

    try:
        reply = _client_reply(message, context)
    except Exception as exc:  # reported to the server as this client's failure, with the reason
        reply = Message("error", {"reason": f"{type(exc).__name__}: {exc}"})
    return FlowerMessage(to_records(reply), reply_to=message)


WEIGHTS_STATE = "fedmmkt.weights"


def _client_reply(message: Any, context: Any) -> Message:
    from safetensors.numpy import load, save

    from fedmmkt_core.client import ClientFactory
    from fedmmkt_core.recipe import parse_recipe

    limit = int(context.run_config.get("max-message-bytes", DEFAULT_MAX_BYTES))
    request = from_records(message.content, limit)
    recipe = parse_recipe(_unb64(str(context.run_config["client-recipe"])))
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise UserError(
            "this SuperNode has no partition-id: start it with --node-config 'partition-id=K num-partitions=N'"
        )
    client_id = int(node_config["partition-id"])
    declared = int(node_config.get("num-partitions", recipe.num_clients))
    if declared != recipe.num_clients:
        raise UserError(f"SuperNode has num-partitions={declared}, the recipe has {recipe.num_clients} clients")
    if request.type == "hello":
        return Message("hello_reply", {"client_id": client_id})
    secret = node_config.get("client-secret")  # the node's own DP randomness (see ClientRuntime.noise_rng)
    runtime = ClientFactory(recipe, secret=str(secret) if secret is not None else None).build(client_id)
    stored = context.state.array_records.get(WEIGHTS_STATE)
    if stored is not None:
        runtime.model.set_weights(load(bytes(stored["weights"].data)))
    reply = runtime.handle(request)
    if runtime.weights_changed:
        from flwr.app import Array, ArrayRecord

        blob = save(runtime.model.get_weights())
        array = Array(dtype="uint8", shape=(len(blob),), stype="safetensors", data=blob)
        context.state[WEIGHTS_STATE] = ArrayRecord(array_dict={"weights": array})
    return reply


# ---------------------------------------------------------------------------------------------- launching
def _app_pyproject(run_config: dict[str, Any]) -> str:
    import json as _json

    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedmmkt-run"',
        'version = "1.0.0"',
        'description = "A fedmmkt recipe as a Flower App (written by fedmmkt run)"',
        'license = "Apache-2.0"',
        "dependencies = []  # runs in the installed environment (fedmmkt[flower])",
        "",
        "[tool.flwr.app]",
        'publisher = "fedmmkt"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedmmkt_plugins.flower_app:server_app"',
        'clientapp = "fedmmkt_plugins.flower_app:client_app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {_json.dumps(value)}" for key, value in run_config.items()]
    return "\n".join(lines) + "\n"


def _flwr_exe(name: str = "flwr") -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise MissingDependencyError("flwr", INSTALL_HINT)
    return found


def _child_env(flwr_home: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise a UserError when nothing listens at ``host:port``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"SuperLink address must be host:port, got '{address}'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(f"cannot reach SuperLink at {address}: {exc}") from None


def _run_config(config: FlowerConfig, runner: Runner) -> dict[str, Any]:
    """The run config the ServerApp and ClientApps read (both modes); refuses a directory holding a run."""
    from fedmmkt_core.recipe import dump_yaml

    recipe = runner.recipe
    out = runner.run_dir.root.resolve()
    if runner.run_dir.metrics_path.exists():
        raise UserError(f"{out} already holds a run; pass --out for a new directory")
    (out / STATUS_FILE).unlink(missing_ok=True)
    return {
        "recipe": _b64(dump_yaml(recipe.resolved())),
        "client-recipe": _b64(client_recipe_text(recipe)),
        "base-dir": str(recipe.base_dir.resolve()),
        "out-dir": str(out),
        "max-message-bytes": config.max_message_bytes,
    }


def _write_app(tmp: Path, run_config: dict[str, Any]) -> Path:
    app_dir = tmp / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(_app_pyproject(run_config), encoding="utf-8")
    return app_dir


def _write_flwr_home(flwr_home: Path, connection: str, conn: list[str]) -> None:
    flwr_home.mkdir()
    text = f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n' + "\n".join(conn) + "\n"
    (flwr_home / "config.toml").write_text(text, encoding="utf-8")


def _launch_deployment(config: FlowerConfig, runner: Runner) -> dict[str, Any]:
    run_config = _run_config(config, runner)
    with tempfile.TemporaryDirectory(prefix="fedmmkt-flwr-") as tmp:
        app_dir = _write_app(Path(tmp), run_config)
        if config.connection is not None:
            flwr_home, connection = None, config.connection
        else:
            check_reachable(config.superlink)
            flwr_home, connection = Path(tmp) / "flwr-home", "fedmmkt"
            conn = [f'address = "{config.superlink}"', f"insecure = {'true' if config.insecure else 'false'}"]
            if config.root_certificates is not None:
                conn.append(f"root-certificates = {json.dumps(str(config.root_certificates))}")
            _write_flwr_home(flwr_home, connection, conn)
        env = _child_env(flwr_home)
        command = [_flwr_exe(), "run", str(app_dir), connection, "--stream"]
        run_id, tail = _stream(command, env)
    where = config.connection or config.superlink
    return _result(runner, run_id, tail, f"flwr run could not start the run on {where}", "see `flwr log RUN_ID`")


def _result(runner: Runner, run_id: int | None, tail: list[str], not_started: str, hint: str) -> dict[str, Any]:
    """Read the ServerApp's status file: the run's summary, or the failure as UserError / RunFailed."""
    from fedmmkt_core.runner import RunFailed

    status_path = runner.run_dir.root.resolve() / STATUS_FILE
    if not status_path.exists():
        detail = "\n".join(tail[-15:])
        if run_id is None:
            raise UserError(f"{not_started}:\n{detail}")
        hint = hint.replace("RUN_ID", str(run_id))
        raise RunFailed(f"Flower run {run_id} ended without a result ({hint}):\n{detail}")
    status = json.loads(status_path.read_text(encoding="utf-8"))
    if status["status"] != "finished":
        if status.get("error") in ("UserError", "RecipeError", "MissingDependencyError", "DataError", "PluginError"):
            raise UserError(status["message"])
        raise RunFailed(status["message"])
    return json.loads(runner.run_dir.summary_path.read_text(encoding="utf-8"))


def _stream(command: list[str], env: dict[str, str]) -> tuple[int | None, list[str]]:
    """Run ``flwr run --stream``, echo its output, return the run id and the last lines."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    run_id: int | None = None
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            tail = (tail + [line.rstrip()])[-40:]
            match = re.search(r"Successfully started run (\d+)", line)
            if match:
                run_id = int(match.group(1))
        proc.wait()
    except KeyboardInterrupt:
        if run_id is not None:
            subprocess.run([command[0], "stop", str(run_id), command[3]], env=env, timeout=30, check=False)
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return run_id, tail


SIM_TOKEN = "FEDMMKT_SIMULATION_TOKEN"  # set in the environment of every process a simulation starts


def _launch_simulation(config: FlowerConfig, runner: Runner) -> dict[str, Any]:
    """Run the recipe on Flower's simulation engine: a private SuperLink started with ``--simulation``
    on a free loopback port, ``flwr run`` with one virtual SuperNode per client, every process
    (SuperLink, flwr-simulation, Ray) ended when the run is over, whatever happened."""
    import importlib.util
    import uuid

    if importlib.util.find_spec("ray") is None:
        raise MissingDependencyError(
            "ray", "Flower's simulation engine needs Ray: pip install 'fedmmkt[flower-simulation]'"
        )
    run_config = _run_config(config, runner)
    federation_config = {
        "num-supernodes": runner.recipe.num_clients,
        "client-resources-num-cpus": config.num_cpus_per_client,
        "client-resources-num-gpus": 0.0,
        "backend": "ray",
    }
    if config.ray_num_cpus is not None:
        federation_config["init-args-num-cpus"] = config.ray_num_cpus
    token = os.environ.get(SIM_TOKEN) or uuid.uuid4().hex  # a test may set it to find the processes
    with tempfile.TemporaryDirectory(prefix="fedmmkt-flwr-sim-") as tmp:
        app_dir = _write_app(Path(tmp), run_config)
        flwr_home, connection, port = Path(tmp) / "flwr-home", "fedmmkt-simulation", free_port()
        _write_flwr_home(flwr_home, connection, [f'address = "127.0.0.1:{port}"', "insecure = true"])
        env = _child_env(flwr_home)
        env[SIM_TOKEN] = token
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.setdefault("RAY_TMPDIR", tmp)  # Ray's session files go with the temporary directory
        env.setdefault("RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION", str(config.ray_object_store_fraction))
        log_path = Path(tmp) / "superlink.log"
        superlink_command = [
            _flwr_exe("flower-superlink"),
            "--insecure",
            "--simulation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ]
        with open(log_path, "ab") as log_file:
            superlink = subprocess.Popen(
                superlink_command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            _wait_listening(superlink, "127.0.0.1", port, 60.0, log_path)
            federation = " ".join(f"{key}={json.dumps(value)}" for key, value in federation_config.items())
            command = [_flwr_exe(), "run", str(app_dir), connection, "--stream", "--federation-config", federation]
            run_id, tail = _stream(command, env)
        finally:
            _stop_all(superlink, token)
        if run_id is None or not (runner.run_dir.root / STATUS_FILE).exists():
            tail = tail + log_path.read_text(errors="replace").splitlines()[-15:]
    return _result(runner, run_id, tail, "Flower's simulation engine could not start the run", "see the log above")


def _wait_listening(proc: subprocess.Popen, host: str, port: int, wait_seconds: float, log_path: Path) -> None:
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log_path.read_text(errors="replace")[-2000:]
            raise UserError(f"flower-superlink exited with code {proc.returncode}:\n{text}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise UserError(f"flower-superlink did not listen on {host}:{port} within {wait_seconds:g} s")


def processes_with_token(token: str) -> list[int]:
    """PIDs of this user's processes whose environment carries ``FEDMMKT_SIMULATION_TOKEN=token``:
    everything a simulation started, even processes that left its session or were re-parented."""
    marker = f"{SIM_TOKEN}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _stop_all(superlink: subprocess.Popen, token: str, grace: float = 10.0) -> None:
    """End the SuperLink's group, then SIGTERM / SIGKILL whatever else carries the token."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(superlink.pid, sig)
        except ProcessLookupError:
            pass
        for pid in processes_with_token(token):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (superlink.poll() is None or processes_with_token(token)):
            time.sleep(0.1)
        if superlink.poll() is not None and not processes_with_token(token):
            break
    superlink.wait()


# ---------------------------------------------------------------------------------------------- local federation
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, node k holding partition-id k.

    Every process starts in its own session (process group) and :meth:`stop` ends each group by id,
    so the ``flower-superexec`` / app processes they spawn go too. Logs go to ``workdir/*.log``.
    """

    def __init__(self, num_nodes: int, workdir: Path, port: int | None = None, host: str = "127.0.0.1"):
        self.num_nodes = num_nodes
        self.workdir = Path(workdir)
        self.host = host
        self.port = port or free_port(host)
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        home = self.workdir / f"flwr-home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        log_file = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            proc = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=_child_env(home), start_new_session=True
            )
        finally:
            log_file.close()
        self.processes[name] = proc
        return proc

    def start(self, wait_seconds: float = 60.0) -> LocalFederation:
        require_flwr()
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            superlink = self._spawn(
                "superlink",
                [
                    _flwr_exe("flower-superlink"),
                    "--insecure",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--disable-runtime-dependency-installation",
                ],
            )
            self._wait_listening(superlink, "superlink", self.port, wait_seconds)
            for k in range(self.num_nodes):
                self.start_node(k)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, k: int) -> subprocess.Popen:
        node_port = free_port(self.host)
        return self._spawn(
            f"supernode-{k}",
            [
                _flwr_exe("flower-supernode"),
                "--insecure",
                "--superlink",
                self.address,
                "--host",
                self.host,
                "--port",
                str(node_port),
                "--node-config",
                f"partition-id={k} num-partitions={self.num_nodes}",
            ],
        )

    def _wait_listening(self, proc: subprocess.Popen, name: str, port: int, wait_seconds: float) -> None:
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                text = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise UserError(f"{name} exited with code {proc.returncode}:\n{text}")
            try:
                with socket.create_connection((self.host, port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.2)
        raise UserError(f"{name} did not listen on {self.host}:{port} within {wait_seconds:g} s")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one process's whole group (e.g. ``kill('supernode-2')``)."""
        proc = self.processes[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def descendants(self, name: str) -> list[int]:
        """PIDs of every process ``name`` started, directly or not (its app processes, SuperExec...)."""
        parents: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
                except OSError:
                    continue
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
        found, todo = [], [self.processes[name].pid]
        while todo:
            children = parents.get(todo.pop(), [])
            found += children
            todo += children
        return found

    def stop(self) -> None:
        """End every process this federation started: each process group, and descendants that left it
        (the SuperLink's SuperExec starts its own session). SIGTERM first, then SIGKILL."""
        strays: set[int] = set()
        for name, proc in self.processes.items():
            if proc.poll() is None:
                strays.update(self.descendants(name))
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.processes.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # also any app process left in the group
            except ProcessLookupError:
                pass
            proc.wait()
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
