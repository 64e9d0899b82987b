"""A warm client process per SuperNode, so a Flower round costs about what it costs in-process.

Flower starts a new ClientApp process for every message: Python, torch and transformers imported again,
the node's data loaded again, for each ``fit`` and ``evaluate``. With a state folder (``state-dir`` or
``data-root``) and ``warm=true``, the ClientApp instead hands the decoded message to this node's worker, a long-lived
process listening on a Unix socket (mode 0600, see :func:`socket_path`), and returns its reply.
The worker runs exactly the in-process handler (:func:`.client_app.client_reply`, weights read from and
written to the node's disk per round as before); it keeps only what is read-only across messages (the
imports, each recipe's :class:`~fedmmkt_core.client.ClientFactory` with its loaded data).

The first ClientApp that finds no worker starts one (in its own process group, so Flower ending that
ClientApp does not end the worker). The worker exits when the SuperNode that started it is gone, or after
``IDLE_SECONDS`` without a message, or when it runs other code than the ClientApp asking (the toolkit or
a plugin was upgraded or edited since it started, see :func:`code_fingerprint`): it then answers
``worker_stale`` and the ClientApp starts a fresh worker for the same message. Frames are
length-prefixed: a JSON header, then the toolkit's wire encoding of the message, bounded by the run's
``max-message-bytes`` (nothing is unpickled). A node opts in with ``--node-config 'warm=true'``
(``fedmmkt federation up`` does).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fedmmkt_plugins.backends.flower.processes import alive, proc_stat

from fedmmkt_core.errors import UserError
from fedmmkt_core.wire import Message

IDLE_SECONDS = 900.0
HEADER_LIMIT = 1 << 20
STALE = "worker_stale"
CODE_PACKAGES = ("fedmmkt_core", "fedmmkt_plugins", "fedmmkt_cli")
_LENGTH = struct.Struct(">Q")


def send_frame(conn: socket.socket, data: bytes) -> None:
    conn.sendall(_LENGTH.pack(len(data)) + data)


def recv_frame(conn: socket.socket, limit: int) -> bytes:
    head = _recv_exact(conn, _LENGTH.size)
    (size,) = _LENGTH.unpack(head)
    if size > limit:
        raise UserError(f"a frame of {size} bytes exceeds the limit of {limit}")
    return _recv_exact(conn, size)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        chunk = conn.recv(min(size - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-frame")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def code_fingerprint() -> str:
    """What code a worker runs: a hash of the toolkit's source files (path, size, modification time) and
    of the distributions that register ``fedmmkt`` plugins (name, version). It changes when the toolkit is
    upgraded or edited, or a plugin package is installed, removed or upgraded; a few milliseconds."""
    import hashlib
    import importlib.metadata
    import importlib.util

    digest = hashlib.sha256()
    for name in CODE_PACKAGES:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            for path in sorted(Path(location).rglob("*.py")):
                info = path.stat()
                digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    for entry in sorted(importlib.metadata.entry_points(group="fedmmkt"), key=lambda e: (e.name, e.value)):
        where = f"{entry.dist.name}\0{entry.dist.version}" if entry.dist else ""
        digest.update(f"{entry.name}={entry.value}\0{where}\n".encode())
    return digest.hexdigest()[:24]


# ----------------------------------------------------------------------------- the ClientApp's side
def worker_reply(
    root: Path,
    request: Message,
    round_index: int,
    start_round: int,
    context: Any,
    limit: int,
    entry: list[str],
    watch_pid: int | None = None,
) -> Message:
    """Send ``request`` to this node's worker and return its reply. If none runs, start one with the
    command ``entry + [STATE_ROOT, PID]`` (the handler's module runs :func:`main`), to live as long as
    process PID, by default this ClientApp's SuperNode."""
    root.mkdir(parents=True, exist_ok=True)
    path = socket_path(root)
    header = {
        "node_config": {str(k): v for k, v in dict(context.node_config).items()},
        "run_config": {str(k): v for k, v in dict(context.run_config).items()},
        "run_id": int(context.run_id),
        "round_index": round_index,
        "start_round": start_round,
        "limit": limit,
        "code": code_fingerprint(),
    }
    for _ in range(2):  # a stale worker (older code) steps down once, and a fresh one answers
        conn = _connect(path) or _start_worker(root, path, entry, watch_pid or _supernode_pid())
        with conn:
            send_frame(conn, json.dumps(header).encode("utf-8"))
            send_frame(conn, request.encode())
            reply = Message.decode(recv_frame(conn, limit + HEADER_LIMIT), limit + HEADER_LIMIT)
        if reply.type != STALE:
            return reply
        _wait_until_gone(path)
    raise UserError(
        f"the node's client worker at {path} runs other code than this ClientApp even after a restart "
        f"({reply.config.get('reason')}); restart the SuperNode"
    )


def _wait_until_gone(path: Path, seconds: float = 30.0) -> None:
    """Wait for a worker that stepped down to stop listening."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn = _connect(path)
        if conn is None:
            return
        conn.close()
        time.sleep(0.05)
    raise UserError(f"the node's stale client worker at {path} did not stop within {seconds:g} s")


def socket_path(root: Path) -> Path:
    """Where the worker of the node whose state folder is ``root`` listens. A Unix socket path may not
    exceed 107 bytes, so it is ``<tmp>/fedmmkt-<uid>/<hash of root>.sock`` in a folder only this user may
    enter (refused if another user owns it or it is open to others)."""
    import hashlib
    import stat
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"fedmmkt-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UserError(f"{folder} must be a folder of this user's alone (mode 0700) for the node's client worker")
    digest = hashlib.sha256(str(Path(root).resolve()).encode("utf-8")).hexdigest()[:24]
    return folder / f"{digest}.sock"


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        return conn
    except OSError:
        conn.close()
        return None


def _supernode_pid() -> int:
    """The SuperNode this ClientApp runs under (its nearest ancestor named flower-supernode), else the
    parent process."""
    pid = os.getppid()
    for _ in range(8):
        try:
            if b"flower-supernode" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            break
        fields = proc_stat(pid)
        if fields is None or int(fields[1]) <= 1:
            break
        pid = int(fields[1])
    return os.getppid()


def _start_worker(
    root: Path, path: Path, entry: list[str], watch_pid: int, wait_seconds: float = 120.0
) -> socket.socket:
    """Start the node's worker unless another ClientApp is starting it; wait for its socket."""
    with open(root / "worker.start.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # one starter at a time; the others then find its socket
        conn = _connect(path)
        if conn is not None:
            return conn
        path.unlink(missing_ok=True)
        log = open(root / "worker.log", "ab")  # noqa: SIM115 - the worker's
        try:
            proc = subprocess.Popen(
                [*entry, str(root), str(watch_pid)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            conn = _connect(path)
            if conn is not None:
                return conn
            if proc.poll() is not None:
                tail = (root / "worker.log").read_text(errors="replace")[-1500:]
                raise UserError(f"the node's client worker exited with code {proc.returncode}:\n{tail}")
            time.sleep(0.05)
        raise UserError(f"the node's client worker did not listen on {path} within {wait_seconds:g} s")


# ----------------------------------------------------------------------------- the worker's side
class Worker:
    """Serves one node's ClientApps: one message at a time, factories cached per recipe and node.

    ``reply(request, round_index, start_round, context, factory)`` is the ClientApp's handler and
    ``build_factory(recipe, context)`` builds a node's client factory (both from :mod:`.client_app`)."""

    def __init__(
        self,
        state_root: Path,
        watch_pid: int | None,
        reply: Callable[..., Message],
        build_factory: Callable[[Any, Any], Any],
        idle_seconds: float = IDLE_SECONDS,
        fingerprint: str | None = None,
    ):
        self.state_root = Path(state_root)
        self.fingerprint = code_fingerprint() if fingerprint is None else fingerprint
        self.stale = False
        self.path = socket_path(self.state_root)
        self.watch_pid = watch_pid
        self.reply = reply
        self.build_factory = build_factory
        self.idle_seconds = idle_seconds
        self.factories: dict[str, Any] = {}

    def alive(self) -> bool:
        return self.watch_pid is None or alive(self.watch_pid)

    def serve(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)  # the socket is the node owner's alone
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        listener.listen(8)
        listener.settimeout(1.0)
        (self.state_root / "worker.pid").write_text(str(os.getpid()), encoding="utf-8")
        last = time.monotonic()
        try:
            while not self.stale and self.alive() and time.monotonic() - last < self.idle_seconds:
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(None)
                    self.handle(conn)
                last = time.monotonic()
        finally:
            self.path.unlink(missing_ok=True)  # before closing: a successor may bind the path once it fails
            listener.close()

    def handle(self, conn: socket.socket) -> None:
        try:
            header = json.loads(recv_frame(conn, HEADER_LIMIT))
            limit = int(header["limit"])
            request = Message.decode(recv_frame(conn, limit + HEADER_LIMIT), limit + HEADER_LIMIT)
        except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
            print(f"refused a malformed request: {type(exc).__name__}: {exc}", flush=True)
            return
        if header.get("code") != self.fingerprint:  # the toolkit changed on disk since this worker started
            self.stale = True
            reason = f"worker code {self.fingerprint}, ClientApp code {header.get('code')}"
            print(f"stepping down: {reason}", flush=True)
            try:
                send_frame(conn, Message(STALE, {"reason": reason}).encode())
            except OSError:
                pass
            return
        context = SimpleNamespace(
            node_config=header["node_config"], run_config=header["run_config"], run_id=header["run_id"], state=None
        )
        try:
            reply = self.reply(request, int(header["round_index"]), int(header["start_round"]), context, self.factory)
        except Exception as exc:  # the server records it as this client's failure
            reply = Message("error", {"reason": f"{type(exc).__name__}: {exc}"})
        try:
            send_frame(conn, reply.encode())
        except OSError as exc:  # the ClientApp is gone (Flower stopped it): the weights are on disk anyway
            print(f"could not send the reply: {exc}", flush=True)

    def factory(self, recipe: Any, context: Any) -> Any:
        key = json.dumps(
            [context.run_config.get("client-recipe"), context.run_config.get("client-privacy"), context.node_config],
            sort_keys=True,
        )
        if key not in self.factories:
            self.factories = {key: self.build_factory(recipe, context)}  # one recipe at a time: data stays bounded
        return self.factories[key]


def main(argv: list[str], reply: Callable[..., Message], build_factory: Callable[[Any, Any], Any]) -> None:
    """The worker process: ``argv`` is ``[STATE_ROOT, PID]``."""
    Worker(Path(argv[0]), int(argv[1]), reply, build_factory).serve()
