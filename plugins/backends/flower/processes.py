"""Starting and ending Flower's processes: executables, environment, ports, and finding every process
a run started (by a token in its environment, or by parentage) so none is left behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedmmkt_core.errors import MissingDependencyError, UserError

INSTALL_HINT = "Install it with: pip install 'fedmmkt[flower]'"
SIM_TOKEN = "FEDMMKT_SIMULATION_TOKEN"  # set in the environment of every process a simulation starts


def require_flwr() -> None:
    """Raise a clear error with the install hint when flwr is missing."""
    try:
        import flwr  # noqa: F401
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("flwr", INSTALL_HINT) from exc


def flwr_exe(name: str = "flwr") -> str:
    """Path of a Flower executable, this interpreter's first."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise MissingDependencyError("flwr", INSTALL_HINT)
    return found


def child_env(flwr_home: Path | None) -> dict[str, str]:
    """The environment of a Flower process: this interpreter first on PATH, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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


def wait_listening(
    proc: subprocess.Popen, name: str, host: str, port: int, wait_seconds: float, log_path: Path
) -> None:
    """Wait until ``host:port`` accepts connections; a UserError with the log's tail if ``proc`` exits."""
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log_path.read_text(errors="replace")[-2000:]
            raise UserError(f"{name} exited with code {proc.returncode}:\n{text}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise UserError(f"{name} did not listen on {host}:{port} within {wait_seconds:g} s")


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (the state first, then the parent's pid),
    or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> list[int]:
    """PIDs of every process ``pid`` started, directly or not (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = proc_stat(int(entry.name))
            if fields is None:
                continue
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


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


def stop_all(superlink: subprocess.Popen, token: str, grace: float = 10.0) -> None:
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


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Meanwhile, SIGTERM raises KeyboardInterrupt as Ctrl-C does (in the main thread; elsewhere no
    handler can be set), so `kill PID` ends the children and removes the temporary folders too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
