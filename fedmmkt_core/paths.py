"""Path types for component configs (relative paths resolve against the recipe's folder), and reading a
user's file only when it is a regular file of bounded size."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Annotated, BinaryIO

from pydantic import AfterValidator, ValidationInfo

from .errors import UserError


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir", "."))


def _resolve(value: Path, info: ValidationInfo) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = _base_dir(info) / path
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a symlink loop
        raise ValueError(f"{path} is a symbolic link loop") from None


def _existing(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    if not path.exists():
        raise ValueError(f"path does not exist: {path}")
    return path


InputPath = Annotated[Path, AfterValidator(_existing)]
"""A file or folder that must exist (resolved against the recipe's folder)."""

RecipePath = Annotated[Path, AfterValidator(_resolve)]
"""A path resolved against the recipe's folder that need not exist where the recipe is read (a folder only
one party holds: the server's data folder is absent on a client's node)."""


def _safetensors_folder(value: Path, info: ValidationInfo) -> Path:
    path = _existing(value, info)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder saved by save_pretrained")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise ValueError(
            f"{path} holds no model.safetensors (found: {found}); only safetensors weights are read, never "
            "pickle files such as pytorch_model.bin: re-save the model with save_pretrained(safe_serialization=True)"
        )
    return path


PretrainedFolder = Annotated[Path, AfterValidator(_safetensors_folder)]
"""A save_pretrained folder holding safetensors weights (pickle-based weight files are refused)."""


# --------------------------------------------------------------------------- reading user files

MAX_IMAGE_SIZE = 1024
"""The largest ``image_size`` a dataset accepts (pixels per side): a task model trains on images
in memory, so 1024 x 1024 x 3 bytes per image is already far beyond what this toolkit is for."""

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words ("a regular file", "a FIFO (named pipe)", ...)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refusal(path: Path, what: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return f"{what} {path} is a symbolic link loop"
    if exc.errno == errno.ENOENT:
        return f"{what} {path} does not exist"
    if exc.errno == errno.ENOTDIR:
        return f"{what} {path}: a part of the path is not a folder"
    return f"cannot read {what} {path}: {exc.strerror or exc}"


def open_regular(
    path: str | Path, what: str = "file", max_bytes: int | None = None, error: type[Exception] = UserError
) -> BinaryIO:
    """Open a user's file for reading only when it is a regular file (no FIFO, device, folder or socket,
    whose reads hang or never end) of at most ``max_bytes``; anything else raises ``error`` naming the
    path and what it is. The type is checked on the opened descriptor (``O_NONBLOCK``: opening a FIFO
    does not wait for a writer), so a file swapped after the check is caught too."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what} {path} is {file_kind(mode)}, not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise error(_refusal(path, what, exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {path} is {file_kind(info.st_mode)}, not a regular file")
        if max_bytes is not None and info.st_size > max_bytes:
            raise error(f"{what} {path} is {info.st_size} bytes; at most {max_bytes} bytes are read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(
    path: str | Path, what: str = "file", max_bytes: int | None = None, error: type[Exception] = UserError
) -> bytes:
    """The bytes of a regular file (see :func:`open_regular`), at most ``max_bytes`` of them."""
    with open_regular(path, what, max_bytes, error) as handle:
        try:
            data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
        except OSError as exc:
            raise error(_refusal(Path(path), what, exc)) from None
    if max_bytes is not None and len(data) > max_bytes:  # grew since fstat
        raise error(f"{what} {path} is over {max_bytes} bytes; at most {max_bytes} bytes are read")
    return data


def check_allocation(nbytes: int, what: str, error: type[Exception] = UserError) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` when it exceeds the memory available now (estimated
    before the allocation, so a recipe that asks for too much fails with a message, not MemoryError)."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise error(
            f"{what} would need {_human(nbytes)} of memory, more than the {_human(available)} available: use a "
            "smaller image_size or fewer images"
        )


def _human(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def available_memory() -> int | None:
    """Bytes of memory available to allocate (MemAvailable on Linux), or None when unknown."""
    try:
        with open("/proc/meminfo", "rb") as handle:
            for line in handle:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_output_folder(
    path: str | Path, what: str = "output folder", error: type[Exception] = UserError, probe: bool = False
) -> None:
    """Refuse, before any work, a folder that cannot be written: ``path`` exists and is not a folder, a
    part of it is a file, or the folder (or the nearest existing one above it) is not writable. Raises
    ``error`` naming ``what``, the path and the problem. ``probe``: also create and remove a temporary
    file there (permission bits do not tell a read-only mount or /proc from a writable folder for root)."""
    path = Path(path)
    probe_at = path
    try:
        while True:
            try:
                mode = os.stat(probe_at).st_mode
                break
            except FileNotFoundError:
                if probe_at.parent == probe_at:
                    raise
                probe_at = probe_at.parent
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise error(f"{what} {path} cannot be created: a part of the path is a file, not a folder") from None
        if exc.errno == errno.ELOOP:
            raise error(f"{what} {path} cannot be created: {probe_at} is a symbolic link loop") from None
        raise error(f"{what} {path}: cannot check it: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(mode):
        if probe_at == path:
            raise error(f"{what} {path} is {file_kind(mode)}, not a folder")
        raise error(f"{what} {path} cannot be created: {probe_at} is {file_kind(mode)}, not a folder")
    where = "" if probe_at == path else f" ({probe_at}, where it would be created)"
    if not os.access(probe_at, os.W_OK | os.X_OK):
        raise error(f"{what} {path} is not writable{where}")
    if probe:
        try:
            with tempfile.TemporaryFile(dir=probe_at):
                pass
        except OSError as exc:
            raise error(f"{what} {path} is not writable{where}: {exc.strerror or exc}") from None
