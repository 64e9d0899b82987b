"""A run's files back to ``fedmmkt run`` through Flower's log stream, for a submitter that shares no
filesystem with the SuperLink (``backend.params.server_dir``).

When the run ends (finished or failed) the ServerApp prints each small file of its run directory
(metrics, summary, status, recipe, sample grids, logs; not checkpoints) as marker lines on its stdout,
which ``flwr run --stream`` relays; :class:`RunFileReceiver` takes those lines out of the stream, checks
each file's size and sha256, and writes it into the submitter's ``--out``. Nothing here is unpickled
or executed: a file is bytes written under the run directory, its relative path checked first.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from fedmmkt_core.rundir import atomic_write_bytes

log = logging.getLogger("fedmmkt")

BEGIN = "@@fedmmkt-file "  # + JSON header: path, size, sha256, chunks
CHUNK = "@@fedmmkt-chunk "  # + index, space, base64
CHUNK_CHARS = 16_384  # base64 characters per line
MAX_FILE_BYTES = 8 * 1024 * 1024  # larger files stay on the server's machine (checkpoints never travel)
SKIPPED_FOLDERS = {"checkpoints", "flower_replies"}
SKIPPED_FILES = {"run.lock", "flower.lock"}


def run_files(root: Path) -> list[Path]:
    """The files of a run directory that travel back, in a stable order."""
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or path.is_symlink() or relative.parts[0] in SKIPPED_FOLDERS:
            continue
        if path.name in SKIPPED_FILES or path.stat().st_size > MAX_FILE_BYTES:
            continue
        found.append(path)
    return found


def emit_run_files(root: Path, write: Callable[[str], None] = print) -> int:
    """Print every file of :func:`run_files` as marker lines; returns how many."""
    files = run_files(root)
    for path in files:
        data = path.read_bytes()
        text = base64.b64encode(data).decode("ascii")
        chunks = [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]
        header = {
            "path": path.relative_to(root).as_posix(),
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "chunks": len(chunks),
        }
        write(BEGIN + json.dumps(header))
        for index, chunk in enumerate(chunks):
            write(f"{CHUNK}{index} {chunk}")
    return len(files)


class RunFileReceiver:
    """Collects the files :func:`emit_run_files` printed, from a stream that also carries other lines."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.header: dict | None = None
        self.parts: list[str] = []
        self.written: list[str] = []
        self.rejected: list[str] = []

    def feed(self, line: str) -> bool:
        """Consume ``line`` if it is a marker line (returns True); other lines are the caller's."""
        start = line.find(BEGIN)
        if start >= 0:
            self._finish()
            try:
                header = json.loads(line[start + len(BEGIN) :])
                self.header = header if self._valid(header) else None
            except ValueError:
                self.header = None
            if self.header is None:
                self.rejected.append(line[start : start + 200])
            self.parts = []
            return True
        start = line.find(CHUNK)
        if start < 0:
            return False
        if self.header is not None:
            index, _, chunk = line[start + len(CHUNK) :].strip().partition(" ")
            if index == str(len(self.parts)):
                self.parts.append(chunk)
            if len(self.parts) == self.header["chunks"]:
                self._finish()
        return True

    @staticmethod
    def _valid(header: object) -> bool:
        if not isinstance(header, dict):
            return False
        path = header.get("path")
        if not isinstance(path, str) or not path or "\\" in path:
            return False
        parts = PurePosixPath(path).parts
        if PurePosixPath(path).is_absolute() or ".." in parts or parts[0] in SKIPPED_FOLDERS:
            return False
        size, chunks = header.get("size"), header.get("chunks")
        return (
            isinstance(size, int)
            and 0 <= size <= MAX_FILE_BYTES
            and isinstance(chunks, int)
            and 1 <= chunks <= MAX_FILE_BYTES // CHUNK_CHARS + 2
            and isinstance(header.get("sha256"), str)
        )

    def _finish(self) -> None:
        header, self.header = self.header, None
        if header is None:
            return
        path = header["path"]
        if len(self.parts) != header["chunks"]:
            self.rejected.append(f"{path}: {len(self.parts)} of {header['chunks']} parts arrived")
            return
        try:
            data = base64.b64decode("".join(self.parts), validate=True)
        except ValueError:
            self.rejected.append(f"{path}: not base64")
            return
        if len(data) != header["size"] or hashlib.sha256(data).hexdigest() != header["sha256"]:
            self.rejected.append(f"{path}: size or sha256 differs from its header")
            return
        target = self.folder / PurePosixPath(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
        self.written.append(path)

    def close(self) -> None:
        """End of stream: a file still incomplete is rejected; rejections are logged."""
        if self.header is not None:
            self.rejected.append(f"{self.header['path']}: {len(self.parts)} of {self.header['chunks']} parts arrived")
            self.header = None
        for reason in self.rejected:
            log.warning("a run file from the ServerApp was not written: %s", reason)
