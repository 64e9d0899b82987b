"""The run directory: resolved recipe, per-round metrics, summary, log, checkpoints.

Every file is written to a temporary name and renamed into place, so a crash never leaves a torn
file behind: a reader sees the old content or the new, never half. A run holds the directory's lock
(:class:`RunLock`) while it writes; ``run.json`` records the resolved recipe's sha256 and the sha256
of ``checkpoints/state.json`` (see :class:`RunRecord`), and ``state.json`` the sha256 of every
checkpoint file, all checked before a resume changes anything.

A new run goes only into a missing folder, an empty one or one fedmmkt wrote
(:func:`refuse_foreign_folder`); a run that fails before its first round removes only the paths
that appeared after it started (:func:`snapshot`, :func:`remove_new_paths`), never a user's files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .faults import crash_point

RUN_FILE = "run.json"  # the resolved recipe's sha256 and state.json's (RunRecord)
LOCK_FILE = "run.lock"  # who holds the run directory's lock (pid, host, start time)
STATE_FILE = "state.json"  # in checkpoints/: rounds completed, the algorithm's state, checkpoint hashes
# What marks a folder as one fedmmkt wrote: run.json with the recipe's hash, a run.lock naming a
# process, or the Flower launcher's flower_run.json (written before the ServerApp's runner starts).
_RUN_MARKERS = {RUN_FILE: "recipe_sha256", "flower_run.json": "run_key", LOCK_FILE: "pid"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


class RunRecord:
    """``run.json``: the resolved recipe's sha256 (written when the run starts) and the sha256 of
    ``checkpoints/state.json``, so a resume refuses a state file edited or deleted after it was written.

    Writing a checkpoint state is three atomic steps: :meth:`pending` records the new state's hash
    beside the committed one, the state file is renamed into place, :meth:`commit` makes the new hash
    the only one. A SIGKILL anywhere leaves a state file whose hash the record holds (the old state,
    or the new one), or no state file while no state was ever committed (``state_sha256`` null)."""

    def __init__(self, root: Path, recipe_sha256: str, state_sha256: str | None = None):
        self.path = Path(root) / RUN_FILE
        self.recipe_sha256 = recipe_sha256
        self.state_sha256 = state_sha256  # the state file on disk (None: none was ever committed)

    def write(self, pending: str | None = None) -> None:
        data: dict[str, Any] = {"recipe_sha256": self.recipe_sha256, "state_sha256": self.state_sha256}
        if pending is not None:
            data["pending_state_sha256"] = pending
        atomic_write_json(self.path, data)

    def pending(self, digest: str) -> None:
        self.write(pending=digest)

    def commit(self, digest: str) -> None:
        self.state_sha256 = digest
        self.write()

    @classmethod
    def verify(cls, root: Path, state_path: Path) -> RunRecord:
        """Read ``run.json`` and check ``state_path`` against it; a mismatch is a UserError naming the
        file. Reads only."""
        path = Path(root) / RUN_FILE
        data = read_json_file(path, "cannot resume: run record")
        where = f"cannot resume {root}: {path}"
        recorded = data.get("recipe_sha256") if isinstance(data, dict) else None
        if not isinstance(recorded, str):
            raise UserError(f"{where} holds no recipe_sha256")
        assert isinstance(data, dict)
        if "state_sha256" not in data:
            raise UserError(
                f"{where} records no hash of {state_path.name} (the run was started by an older fedmmkt): "
                "start a new run"
            )
        hashes = [data["state_sha256"], data.get("pending_state_sha256")]
        if not all(h is None or (isinstance(h, str) and _SHA256.fullmatch(h)) for h in hashes):
            raise UserError(f"{where}: state_sha256 / pending_state_sha256 must be sha256 hex digests or null")
        committed, pending = hashes
        if not state_path.exists():
            if committed is not None:
                raise UserError(
                    f"cannot resume {root}: {state_path} is missing, but {path} records that it was written "
                    "(the run has completed rounds); restore it or start a new run"
                )
            return cls(root, recorded, None)
        try:
            digest = sha256_file(state_path)
        except OSError as exc:
            raise UserError(f"cannot resume {root}: cannot read {state_path}: {exc.strerror or exc}") from None
        if digest not in {committed, pending} - {None}:
            raise UserError(
                f"cannot resume {root}: {state_path} was changed after it was written (its sha256 differs "
                f"from the one recorded in {path}); restore it or start a new run"
            )
        return cls(root, recorded, digest)


def refuse_foreign_folder(root: Path) -> None:
    """Refuse (UserError, nothing touched) a new run into an existing folder that is not empty and holds
    no mark of fedmmkt: a run that fails must never be in a position to remove someone else's files."""
    root = Path(root)
    try:
        if not root.is_dir():
            return  # missing (created by the run) or not a folder (refused by the runner)
        names = sorted(entry.name for entry in os.scandir(root))
    except OSError as exc:
        raise UserError(f"cannot read the run directory {root}: {exc.strerror or exc}") from None
    if not names or any(_is_marker(root / name, key) for name, key in _RUN_MARKERS.items() if name in names):
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise UserError(
        f"{root} is not empty and is not a fedmmkt run directory (it holds {shown}); give --out a new or "
        "empty folder, nothing was changed"
    )


def _is_marker(path: Path, key: str) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > 1 << 16:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and key in data


def snapshot(root: Path) -> set[str]:
    """Every path under ``root`` (relative, links not followed): what a run found when it started."""
    found: set[str] = set()
    for folder, dirs, files in os.walk(root):
        base = Path(folder).relative_to(root)
        found.update(str(base / name) for name in [*dirs, *files])
    return found


def remove_new_paths(root: Path, before: set[str]) -> None:
    """Remove what appeared under ``root`` since :func:`snapshot` returned ``before``: a path that was
    there is kept (a folder that was there is entered), so nothing the run found is ever removed."""

    def sweep(folder: Path, relative: Path) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            name = str(relative / entry.name)
            if name in before:
                if entry.is_dir(follow_symlinks=False):
                    sweep(Path(entry.path), relative / entry.name)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    sweep(Path(root), Path("."))


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
