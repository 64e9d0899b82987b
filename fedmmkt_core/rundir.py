"""The run directory: resolved recipe, per-round metrics, summary, log, checkpoints.

Every file is written to a temporary name and renamed into place, so a crash never leaves a torn
file behind: a reader sees the old content or the new, never half. A run holds the directory's lock
(:class:`RunLock`) while it writes; ``run.json`` records the resolved recipe's sha256 and
``checkpoints/state.json`` the sha256 of every checkpoint file, checked before a resume changes
anything.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .faults import crash_point

RUN_FILE = "run.json"  # the resolved recipe's sha256, written when the run directory is created
LOCK_FILE = "run.lock"  # who holds the run directory's lock (pid, host, start time)
_CLIENT_FILE = re.compile(r"client_(\d+)\.r(\d+)\.safetensors")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        crash_point(f"write:{path.name}")  # tests: SIGKILL while a file is being written
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_file(path: Path, what: str) -> Any:
    """Parse a JSON file the run wrote; a missing, non-UTF-8 or malformed file is a UserError."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{what} {path} is damaged: {type(exc).__name__}: {exc}") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays to Python; non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n")


def save_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save

    atomic_write_bytes(path, save({k: np.asarray(v, order="C") for k, v in arrays.items()}, metadata=metadata))


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"cannot read checkpoint {path}: it is missing") from None
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}") from exc


class RunDirectory:
    """Paths and writers for one run's output folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.resolved.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    @property
    def log_path(self) -> Path:
        return self.root / "log.txt"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def client_state_dir(self) -> Path:
        return self.root / "checkpoints" / "clients"

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for number, line in enumerate(self.metrics_path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{self.metrics_path}:{number}: not valid JSON ({exc})") from exc
        return rows

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(to_jsonable(row), sort_keys=True) + "\n" for row in rows)
        atomic_write_text(self.metrics_path, text)

    def append_metrics(self, row: dict[str, Any]) -> None:
        self.write_metrics([*self.read_metrics(), row])

    def client_checkpoints(self, rounds_completed: int) -> dict[str, Path]:
        """The client weight files a resume after ``rounds_completed`` rounds loads: per client, the
        newest ``client_K.rR.safetensors`` with R < rounds_completed (keys relative to checkpoints/)."""
        newest: dict[int, tuple[int, Path]] = {}
        if self.client_state_dir.is_dir():
            for path in self.client_state_dir.iterdir():
                match = _CLIENT_FILE.fullmatch(path.name)
                if match and int(match.group(2)) < rounds_completed:
                    client, written = int(match.group(1)), int(match.group(2))
                    if client not in newest or written > newest[client][0]:
                        newest[client] = (written, path)
        return {f"clients/{path.name}": path for _, path in newest.values()}


class RunLock:
    """An exclusive lock on a run directory: ``flock`` on the directory itself (the kernel releases it
    when the holder dies, even by SIGKILL) plus ``run.lock`` naming the holder (pid, host, start).

    A ``run.lock`` found while the flock is free was left by a killed process: :attr:`stale` holds
    what it said. :meth:`release` removes ``run.lock``, or with ``restore=True`` puts back exactly
    what was there before (a refused resume leaves the directory byte-for-byte unchanged)."""

    def __init__(self, root: Path, fd: int, previous: bytes | None):
        self.root = root
        self._fd: int | None = fd
        self._previous = previous
        self.stale: dict[str, Any] | None = _holder(previous) if previous is not None else None

    @property
    def path(self) -> Path:
        return self.root / LOCK_FILE

    @classmethod
    def acquire(cls, root: Path, wait_seconds: float = 2.0) -> RunLock:
        """Lock ``root`` (an existing folder) or raise UserError naming the process that holds it. Waits
        up to ``wait_seconds`` only while the holder named in run.lock is no longer running (the kernel
        releases a dead process's lock shortly after it died)."""
        root = Path(root)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = _holder(_read_bytes(root / LOCK_FILE))
                if (holder is None or _alive(holder)) or time.monotonic() >= deadline:
                    os.close(fd)
                    raise UserError(
                        f"{root} is in use by {_describe_holder(holder)}: wait for it to finish or stop it "
                        "(a run directory is run or resumed by one process at a time)"
                    ) from None
                time.sleep(0.05)
        lock = cls(root, fd, _read_bytes(root / LOCK_FILE))
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(lock.path, json.dumps(info, sort_keys=True) + "\n")
        return lock

    def release(self, restore: bool = False) -> None:
        """Give the lock up; ``restore``: put run.lock back as it was found (or remove it)."""
        if self._fd is None:
            return
        try:
            if restore and self._previous is not None:
                atomic_write_bytes(self.path, self._previous)
            else:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _holder(raw: bytes | None) -> dict[str, Any] | None:
    try:
        holder = json.loads(raw or b"")
    except (ValueError, RecursionError):
        return None
    if isinstance(holder, dict) and isinstance(holder.get("pid"), int) and not isinstance(holder["pid"], bool):
        return holder
    return None


def _alive(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, assume it runs
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _describe_holder(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "another fedmmkt process"
    host, started = holder.get("host", "?"), holder.get("started", "?")
    return f"another fedmmkt process (pid {holder['pid']} on {host}, since {started})"
