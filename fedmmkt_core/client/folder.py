"""One client's training data as a folder of its own: what a site keeps on its own disk.

``fedmmkt partition RECIPE OUT`` writes ``OUT/client_K`` for every client K: exactly the share
:class:`~fedmmkt_core.client.ClientFactory` cuts for that client from the recipe's dataset (same images,
same labels, same order). A Flower SuperNode started with ``--node-config "data-root=OUT/client_K"``
trains on that folder instead of loading the recipe's dataset and cutting a partition.

Layout (no pickle anywhere)::

    client_K/
      manifest.json        {"format": "fedmmkt-client-data", "version": 1, "client_id": K, "num_clients": N,
                            "class_names": [...], "image_size": S, "channels": C, "num_samples": n,
                            "sha256": <of train.safetensors>, "captions": [...] | null, "source": {...}}
      train.safetensors    images uint8 [n, S, S, C], labels int64 [n]

A folder written by other means (a site's own data) needs only the same two files; ``source`` is
informational.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmmkt_core.data import ImageSet, TaskSpec
from fedmmkt_core.errors import DataError
from fedmmkt_core.rundir import atomic_write_json, save_safetensors

if TYPE_CHECKING:
    pass

FORMAT = "fedmmkt-client-data"
VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "train.safetensors"


@dataclass
class ClientFolder:
    """A client folder as read back: its training data and what it declares about itself."""

    client_id: int
    num_clients: int
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    train: ImageSet

    def check_task(self, task: TaskSpec, folder: Path) -> None:
        """Raise DataError when this folder's classes or image geometry differ from the recipe's task."""
        if self.class_names != tuple(task.class_names):
            raise DataError(
                f"{folder}: classes {list(self.class_names)} differ from the recipe's {list(task.class_names)}"
            )
        if (self.image_size, self.channels) != (task.image_size, task.channels):
            raise DataError(
                f"{folder}: images are {self.image_size}x{self.image_size}x{self.channels}, the recipe's task "
                f"needs {task.image_size}x{task.image_size}x{task.channels}"
            )


def write_client_folder(
    folder: Path, client_id: int, num_clients: int, train: ImageSet, task: TaskSpec, source: dict[str, Any]
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / ARRAYS, {"images": train.images, "labels": train.labels.astype(np.int64)})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "client_id": client_id,
        "num_clients": num_clients,
        "class_names": list(task.class_names),
        "image_size": task.image_size,
        "channels": task.channels,
        "num_samples": len(train),
        "sha256": hashlib.sha256((folder / ARRAYS).read_bytes()).hexdigest(),
        "captions": list(train.captions) if train.captions is not None else None,
        "source": source,
    }
    atomic_write_json(folder / MANIFEST, manifest)


def read_client_folder(folder: Path) -> ClientFolder:
    """Read and check a client folder; every problem is a DataError naming the file."""
    from safetensors.numpy import load

    folder = Path(folder)
    manifest_path, arrays_path = folder / MANIFEST, folder / ARRAYS
    if not manifest_path.is_file() or not arrays_path.is_file():
        raise DataError(
            f"{folder} is not a client data folder (needs {MANIFEST} and {ARRAYS}; see `fedmmkt partition`)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{manifest_path}: not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{manifest_path}: expected format '{FORMAT}' version {VERSION}")
    try:
        client_id, num_clients = int(manifest["client_id"]), int(manifest["num_clients"])
        class_names = tuple(str(name) for name in manifest["class_names"])
        image_size, channels = int(manifest["image_size"]), int(manifest["channels"])
        num_samples, digest = int(manifest["num_samples"]), str(manifest["sha256"])
        captions = manifest.get("captions")
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{manifest_path}: missing or malformed field ({exc})") from None
    blob = arrays_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != digest:
        raise DataError(f"{arrays_path}: its sha256 differs from the one in {MANIFEST} (changed or truncated)")
    try:
        arrays = load(blob)
    except Exception as exc:
        raise DataError(f"{arrays_path}: cannot read ({exc})") from None
    images, labels = arrays.get("images"), arrays.get("labels")
    shape = (num_samples, image_size, image_size, channels)
    if images is None or images.dtype != np.uint8 or images.shape != shape:
        raise DataError(f"{arrays_path}: 'images' must be uint8 {shape}")
    if labels is None or labels.dtype != np.int64 or labels.shape != (num_samples,):
        raise DataError(f"{arrays_path}: 'labels' must be int64 ({num_samples},)")
    if num_samples and not (0 <= labels.min() and labels.max() < len(class_names)):
        raise DataError(f"{arrays_path}: labels outside 0..{len(class_names) - 1}")
    if captions is not None and (
        not isinstance(captions, list) or len(captions) != num_samples or not all(isinstance(c, str) for c in captions)
    ):
        raise DataError(f"{manifest_path}: 'captions' must be null or {num_samples} strings")
    return ClientFolder(client_id, num_clients, class_names, image_size, channels, ImageSet(images, labels, captions))
