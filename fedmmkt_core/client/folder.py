"""One client's data as a folder of its own: what a site keeps on its own disk.

``fedmmkt partition RECIPE OUT`` writes ``OUT/client_K`` for every client K: exactly the share
:class:`~fedmmkt_core.client.ClientFactory` cuts for that client from the recipe's dataset (same images,
same labels, same order), and the shared evaluation split every client is evaluated on
(``data.evaluate_on``: the test or the validation split). A Flower SuperNode started with
``--node-config "data-root=OUT/client_K"`` reads only that folder: it never loads the recipe's dataset.

Layout (no pickle anywhere)::

    client_K/
      manifest.json             {"format": "fedmmkt-client-data", "version": 2, "client_id": K, "num_clients": N,
                                 "class_names": [...], "image_size": S, "channels": C,
                                 "caption_template": "a photo of a {name}", "num_samples": n,
                                 "sha256": <of train.safetensors>, "captions": [...] | null,
                                 "evaluation": {"split": "test", "num_samples": m,
                                                "sha256": <of evaluation.safetensors>, "captions": [...] | null},
                                 "source": {...}}
      train.safetensors         images uint8 [n, S, S, C], labels int64 [n]
      evaluation.safetensors    images uint8 [m, S, S, C], labels int64 [m] (the same in every client's folder)

A folder written by other means (a site's own data) needs the same three files; ``source`` is
informational. Every array file is checked against its sha256 in the manifest before it is decoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmmkt_core.arrayfile import read_image_set, save_image_set
from fedmmkt_core.data import ImageSet, TaskSpec
from fedmmkt_core.errors import DataError
from fedmmkt_core.rundir import atomic_write_json

FORMAT = "fedmmkt-client-data"
VERSION = 2  # 1: no evaluation split (the node loaded the recipe's dataset for it)
MANIFEST = "manifest.json"
ARRAYS = "train.safetensors"
EVALUATION = "evaluation.safetensors"
DEFAULT_CAPTION = "a photo of a {name}"


@dataclass
class ClientFolder:
    """A client folder as read back: its training data, the shared evaluation split and its task."""

    client_id: int
    num_clients: int
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    train: ImageSet
    evaluation: ImageSet
    evaluate_on: str = "test"
    caption_template: str = DEFAULT_CAPTION

    @property
    def task(self) -> TaskSpec:
        """The task as the folder declares it (the node needs no dataset to know it)."""
        return TaskSpec(self.class_names, self.image_size, self.channels, self.caption_template)

    def check_task(self, task: TaskSpec, folder: Path) -> None:
        """Raise DataError when this folder's classes or image geometry differ from ``task`` (the server's)."""
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
    folder: Path,
    client_id: int,
    num_clients: int,
    train: ImageSet,
    task: TaskSpec,
    source: dict[str, Any],
    evaluation: ImageSet,
    evaluate_on: str = "test",
) -> None:
    """Write ``folder``: client ``client_id``'s ``train`` share and the shared ``evaluation`` split."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "client_id": client_id,
        "num_clients": num_clients,
        "class_names": list(task.class_names),
        "image_size": task.image_size,
        "channels": task.channels,
        "caption_template": task.caption_template,
        "num_samples": len(train),
        "sha256": save_image_set(folder / ARRAYS, train),
        "captions": list(train.captions) if train.captions is not None else None,
        "evaluation": {
            "split": evaluate_on,
            "num_samples": len(evaluation),
            "sha256": save_image_set(folder / EVALUATION, evaluation),
            "captions": list(evaluation.captions) if evaluation.captions is not None else None,
        },
        "source": source,
    }
    atomic_write_json(folder / MANIFEST, manifest)


def read_client_folder(folder: Path) -> ClientFolder:
    """Read and check a client folder; every problem is a DataError naming the file."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file() or not (folder / ARRAYS).is_file():
        raise DataError(
            f"{folder} is not a client data folder (needs {MANIFEST}, {ARRAYS} and {EVALUATION}; see "
            "`fedmmkt partition`)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{manifest_path}: not JSON ({exc})") from None
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("version") == 1:
        raise DataError(
            f"{manifest_path}: version 1 (no evaluation split): write the folder again with `fedmmkt partition`"
        )
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{manifest_path}: expected format '{FORMAT}' version {VERSION}")
    try:
        client_id, num_clients = int(manifest["client_id"]), int(manifest["num_clients"])
        class_names = tuple(str(name) for name in manifest["class_names"])
        geometry = (int(manifest["image_size"]), int(manifest["channels"]))
        caption_template = str(manifest.get("caption_template", DEFAULT_CAPTION))
        num_samples, digest = int(manifest["num_samples"]), str(manifest["sha256"])
        evaluation = manifest["evaluation"]
        evaluate_on = str(evaluation["split"])
        eval_samples, eval_digest = int(evaluation["num_samples"]), str(evaluation["sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{manifest_path}: missing or malformed field ({exc})") from None
    if "{name}" not in caption_template:
        raise DataError(f"{manifest_path}: 'caption_template' must contain '{{name}}'")
    train = read_image_set(
        folder / ARRAYS, manifest_path, digest, num_samples, geometry, len(class_names), manifest.get("captions")
    )
    held_out = read_image_set(
        folder / EVALUATION,
        manifest_path,
        eval_digest,
        eval_samples,
        geometry,
        len(class_names),
        evaluation.get("captions"),
    )
    return ClientFolder(
        client_id, num_clients, class_names, geometry[0], geometry[1], train, held_out, evaluate_on, caption_template
    )
