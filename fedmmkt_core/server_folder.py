"""What the server holds as a folder of its own, so the server's machine never holds the clients' dataset.

``fedmmkt partition RECIPE OUT`` writes ``OUT/server`` next to the clients' ``OUT/client_K``: the
evaluation split (``data.evaluate_on``), the oracle's split and the server's public split, exactly as
:func:`fedmmkt_core.loading.load_server_data` cuts them from the recipe's dataset. A recipe with
``data.server_folder: OUT/server`` then loads the server side from that folder alone: the dataset plugin
is never called on the server (in-process the clients still cut their shares from the dataset; on
Flower each node reads its own ``client_K``).

Layout (no pickle anywhere)::

    server/
      manifest.json            {"format": "fedmmkt-server-data", "version": 1, "class_names": [...],
                                "image_size": S, "channels": C, "caption_template": "...",
                                "evaluate_on": "test" | "validation",
                                "splits": {"evaluation": {"num_samples": m, "sha256": ..., "captions": [...] | null},
                                           "oracle": {...} | null, "public": {...} | null},
                                "source": {...}}
      evaluation.safetensors   images uint8 [m, S, S, C], labels int64 [m]
      oracle.safetensors       (when the recipe has an oracle split)
      public.safetensors       (when the server has public data)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedmmkt_core.arrayfile import read_image_set, save_image_set
from fedmmkt_core.data import ImageSet, ServerData, TaskSpec
from fedmmkt_core.errors import DataError
from fedmmkt_core.rundir import atomic_write_json

FORMAT = "fedmmkt-server-data"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("evaluation", "oracle", "public")


def write_server_folder(folder: Path, data: ServerData, evaluate_on: str, source: dict[str, Any]) -> Path:
    """Write ``folder``: the server's splits of ``data`` and a manifest naming their sha256."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {}
    for name in SPLITS:
        split: ImageSet | None = getattr(data, name)
        entries[name] = None
        if split is not None:
            entries[name] = {
                "num_samples": len(split),
                "sha256": save_image_set(folder / f"{name}.safetensors", split),
                "captions": list(split.captions) if split.captions is not None else None,
            }
    task = data.task
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "class_names": list(task.class_names),
        "image_size": task.image_size,
        "channels": task.channels,
        "caption_template": task.caption_template,
        "evaluate_on": evaluate_on,
        "splits": entries,
        "source": source,
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return folder


def read_server_folder(folder: Path, evaluate_on: str) -> ServerData:
    """Read and check a server folder written for ``evaluate_on``; every problem is a DataError naming the file."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{folder} is not a server data folder (needs {MANIFEST}; see `fedmmkt partition`)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{manifest_path}: not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{manifest_path}: expected format '{FORMAT}' version {VERSION}")
    try:
        task = TaskSpec(
            tuple(str(name) for name in manifest["class_names"]),
            int(manifest["image_size"]),
            int(manifest["channels"]),
            str(manifest["caption_template"]),
        )
        written_for = str(manifest["evaluate_on"])
        entries = {name: manifest["splits"][name] for name in SPLITS}
        sizes = {name: int(e["num_samples"]) for name, e in entries.items() if e is not None}
        digests = {name: str(e["sha256"]) for name, e in entries.items() if e is not None}
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{manifest_path}: missing or malformed field ({exc})") from None
    if written_for != evaluate_on:
        raise DataError(
            f"{manifest_path}: written for data.evaluate_on '{written_for}', the recipe has '{evaluate_on}' "
            "(write the folder again with `fedmmkt partition`)"
        )
    if entries["evaluation"] is None:
        raise DataError(f"{manifest_path}: no evaluation split")
    geometry = (task.image_size, task.channels)
    splits = {
        name: read_image_set(
            folder / f"{name}.safetensors",
            manifest_path,
            digests[name],
            sizes[name],
            geometry,
            task.num_classes,
            entries[name].get("captions"),
        )
        for name in SPLITS
        if entries[name] is not None
    }
    return ServerData(task, splits["evaluation"], splits.get("oracle"), splits.get("public"))
