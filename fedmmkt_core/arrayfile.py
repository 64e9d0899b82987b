"""An image set as one safetensors file checked by its sha256: the unit of the data folders a site or the
server keeps (:mod:`fedmmkt_core.client.folder`, :mod:`fedmmkt_core.server_folder`). No pickle."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from fedmmkt_core.data import ImageSet
from fedmmkt_core.errors import DataError
from fedmmkt_core.rundir import save_safetensors


def save_image_set(path: Path, data: ImageSet) -> str:
    """Write ``images`` (uint8) and ``labels`` (int64) to ``path``; return the file's sha256."""
    save_safetensors(path, {"images": data.images, "labels": data.labels.astype(np.int64)})
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_image_set(
    path: Path,
    manifest_path: Path,
    digest: str,
    num_samples: int,
    geometry: tuple[int, int],
    num_classes: int,
    captions: Any,
) -> ImageSet:
    """One array file named by ``manifest_path``, checked against its sha256 before it is decoded, then
    against the manifest's count, ``geometry`` (image size, channels), classes and ``captions``."""
    from safetensors.numpy import load

    if not path.is_file():
        raise DataError(f"{path} is missing (the manifest {manifest_path} names it; see `fedmmkt partition`)")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != digest:
        raise DataError(f"{path}: its sha256 differs from the one in {manifest_path.name} (changed or truncated)")
    try:
        arrays = load(blob)
    except Exception as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    images, labels = arrays.get("images"), arrays.get("labels")
    shape = (num_samples, geometry[0], geometry[0], geometry[1])
    if images is None or images.dtype != np.uint8 or images.shape != shape:
        raise DataError(f"{path}: 'images' must be uint8 {shape}")
    if labels is None or labels.dtype != np.int64 or labels.shape != (num_samples,):
        raise DataError(f"{path}: 'labels' must be int64 ({num_samples},)")
    if num_samples and not (0 <= labels.min() and labels.max() < num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    if captions is not None and (
        not isinstance(captions, list) or len(captions) != num_samples or not all(isinstance(c, str) for c in captions)
    ):
        raise DataError(f"{manifest_path}: the captions of {path.name} must be null or {num_samples} strings")
    return ImageSet(images, labels, captions)
