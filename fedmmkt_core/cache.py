"""Integrity of the cache (``$FEDMMKT_CACHE``): pre-trained generators, oracles, any pre-trained part.

An entry carries a content hash written when it is built and checked when it is loaded. An entry
whose content differs (weights edited, a file truncated, added or removed) or that carries no hash
(built by an older fedmmkt) is never used: the caller rebuilds it, after a warning saying which file
and why (``log.txt`` and the console). Two forms:

* a folder (a diffusers pipeline): ``fedmmkt-cache.json`` inside it records every file's sha256
  (:func:`seal_folder` before the folder is renamed into place, :func:`usable_folder` at load);
* one safetensors file: its metadata records the sha256 of its tensors
  (:func:`save_sealed_tensors`, :func:`load_sealed_tensors`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .rundir import atomic_write_json, save_safetensors, sha256_file

log = logging.getLogger("fedmmkt")

MANIFEST = "fedmmkt-cache.json"  # in a cached folder: {"files": {relative path: sha256}}
TENSORS_KEY = "fedmmkt_tensors_sha256"  # in a cached safetensors file's metadata


def build_conditions(device: str = "cpu") -> dict[str, Any]:
    """What decides the bits of a model trained in this process, beyond its recipe, seed and data.

    torch's kernels split their reductions by thread count and by the processor's instruction set (and
    run other kernels on a GPU): 40 steps of the tiny generator's pre-training on 1 and on 2 threads
    already give other weights. A cache key that hashes these is used only by a process that would
    have built the same entry, so a recipe and seed give the same metrics with or without the cache.
    """
    import torch

    conditions: dict[str, Any] = {"torch": str(torch.__version__), "device": device}
    if device == "cpu":
        conditions["threads"] = torch.get_num_threads()
        conditions["cpu"] = torch.backends.cpu.get_cpu_capability()
    else:
        conditions["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return conditions


class CacheWarning(UserWarning):
    """A cache entry was not used (its content differs from its hash): it is rebuilt."""


def warn_rebuild(what: str, path: Path, reason: str) -> None:
    message = f"{what} {path} is not used: {reason}; building it again"
    log.warning("%s", message)
    warnings.warn(message, CacheWarning, stacklevel=2)


def discard(path: Path) -> None:
    """Move a bad entry aside and remove it (another process may be discarding it too)."""
    path = Path(path)
    aside = path.with_name(f".{path.name}.discarded-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            aside.unlink()


# ------------------------------------------------------------------------------------------- folders


def _files(folder: Path) -> dict[str, Path]:
    found = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = Path(base) / name
            relative = path.relative_to(folder).as_posix()
            if relative != MANIFEST:
                found[relative] = path
    return found


def seal_folder(folder: Path) -> None:
    """Record the sha256 of every file in ``folder`` (call it before the folder is moved into place)."""
    files = {name: sha256_file(path) for name, path in sorted(_files(Path(folder)).items())}
    atomic_write_json(Path(folder) / MANIFEST, {"files": files})


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` does not match the hashes recorded when it was built (None: it matches)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
    except FileNotFoundError:
        return f"it has no {MANIFEST} (no content hash: built by an older fedmmkt or not by fedmmkt)"
    except (OSError, ValueError, RecursionError) as exc:
        return f"its {MANIFEST} is unreadable ({type(exc).__name__})"
    recorded = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        return f"its {MANIFEST} holds no file hashes"
    try:
        present = _files(folder)
        for name in sorted(set(recorded) | set(present)):
            if name not in present:
                return f"{folder / name} is missing"
            if name not in recorded:
                return f"{folder / name} was added after the entry was built"
            if sha256_file(present[name]) != recorded[name]:
                return f"{folder / name} differs from the file written when the entry was built (sha256)"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    return None


def usable_folder(folder: Path, what: str) -> bool:
    """True when the cached ``folder`` exists and matches its hashes. A folder that does not match is
    discarded with a warning naming the file and why, and False is returned: the caller rebuilds it."""
    folder = Path(folder)
    if not folder.exists():
        return False
    problem = folder_problem(folder)
    if problem is None:
        return True
    warn_rebuild(what, folder, problem)
    discard(folder)
    return False


# ------------------------------------------------------------------------------------- single files


def tensors_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        header = json.dumps([name, array.dtype.str, list(array.shape)]).encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_sealed_tensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a cache entry as safetensors whose metadata holds its tensors' sha256."""
    save_safetensors(path, arrays, metadata={TENSORS_KEY: tensors_sha256(arrays)})


def load_sealed_tensors(path: Path, what: str) -> dict[str, np.ndarray] | None:
    """The tensors of a cached safetensors file, or None (after a warning naming the file and why, the
    file discarded) when it is missing, unreadable or differs from the hash it was written with."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="np") as handle:
            recorded = (handle.metadata() or {}).get(TENSORS_KEY)
        arrays = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        problem = f"it cannot be read ({type(exc).__name__}: {exc})"
    else:
        if recorded is None:
            problem = "it has no content hash (built by an older fedmmkt or not by fedmmkt)"
        elif tensors_sha256(arrays) != recorded:
            problem = "its tensors differ from those written when it was built (sha256)"
        else:
            return arrays
    warn_rebuild(what, path, problem)
    discard(path)
    return None


def cache_dir() -> Path:
    """Where expensive artefacts (pre-trained generators, oracles) are cached: ``$FEDMMKT_CACHE``."""
    return Path(os.environ.get("FEDMMKT_CACHE", Path.home() / ".cache" / "fedmmkt"))
