"""A Hugging Face ``datasets`` dataset written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fedmmkt_plugins.datasets.imagefolder import check_pixels
from pydantic import Field

from fedmmkt_core.data import DataSplits, ImageSet, TaskSpec
from fedmmkt_core.errors import DataError
from fedmmkt_core.interfaces import Dataset
from fedmmkt_core.lazy import lazy_import
from fedmmkt_core.paths import MAX_IMAGE_SIZE, InputPath, check_allocation
from fedmmkt_core.splits import SplitConfig, protocol_splits

hf_datasets = lazy_import("datasets", "Install it with: pip install datasets")
PIL_Image = lazy_import("PIL.Image", "Install it with: pip install pillow")

BATCH_ROWS = 256
DECODE_ERRORS = (OSError, ValueError, TypeError, SyntaxError, RuntimeError)


class HFDiskConfig(SplitConfig):
    path: InputPath = Field(description="folder written by Dataset.save_to_disk or DatasetDict.save_to_disk")
    split: str = Field("train", min_length=1, description="split to use when the folder holds a DatasetDict")
    image_column: str = Field("image", min_length=1, description="column of images (Image feature or arrays)")
    label_column: str = Field("label", min_length=1, description="column of labels (ClassLabel or plain values)")
    caption_column: str | None = Field(None, description="column of captions; default: caption_template")
    image_size: int = Field(32, ge=4, le=MAX_IMAGE_SIZE, description="images are resized to image_size x image_size")
    channels: Literal[1, 3] = Field(3, description="1 = greyscale, 3 = RGB")
    max_samples: int | None = Field(None, ge=2, description="keep this many rows: the first rows of each class")


class HFDiskDataset(Dataset):
    """A saved ``datasets`` folder; class names from the label's ClassLabel, else its sorted values.

    ``max_samples`` keeps the first rows of every class in proportion to its size (no randomness).
    Float array images are read as 0..1 when every value fits, else as 0..255. Bad rows are named.
    """

    Config = HFDiskConfig
    config: HFDiskConfig

    def class_names(self) -> tuple[str, ...]:
        """The label's ClassLabel names, else its sorted values (the label column only; no image is read)."""
        data, where = self._open()
        column = self.config.label_column
        _check_columns(data, where, [column])
        feature = data.features[column]
        if isinstance(feature, hf_datasets.ClassLabel):
            return tuple(str(name) for name in feature.names)
        return self._labels(feature, data.with_format("arrow")[column].to_pylist(), where)[0]

    def load(self, seed: int) -> DataSplits:
        cfg = self.config
        data, where = self._open()
        _check_columns(data, where, [c for c in (cfg.image_column, cfg.label_column, cfg.caption_column) if c])
        if len(data) == 0:
            raise DataError(f"{where} has no rows")
        raw = data.with_format("arrow")
        names, labels = self._labels(data.features[cfg.label_column], raw[cfg.label_column].to_pylist(), where)
        rows = self._rows(labels)
        labels = labels[rows]
        present = np.unique(labels)
        if len(names) < 2 or len(present) < 2:
            raise DataError(f"{where} needs at least two classes; the rows used hold {len(present)} of {len(names)}")
        images = self._images(raw, data.features[cfg.image_column], rows, where)
        captions = self._captions(raw, rows, names, labels, where)
        full = ImageSet(images, labels, captions)
        task = TaskSpec(class_names=names, image_size=cfg.image_size, channels=cfg.channels)
        return protocol_splits(full, task, cfg, seed)

    def _open(self) -> tuple[Any, str]:
        path = Path(self.config.path)
        if not path.is_dir():
            raise DataError(f"{path} is not a folder written by save_to_disk")
        try:
            loaded = hf_datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"cannot load {path} with datasets.load_from_disk: {exc}") from None
        if isinstance(loaded, hf_datasets.DatasetDict):
            split = self.config.split
            if split not in loaded:
                available = ", ".join(sorted(loaded)) or "none"
                raise DataError(f"split '{split}' not found in {path}; available splits: {available}")
            return loaded[split], f"{path} (split '{split}')"
        return loaded, str(path)

    def _labels(self, feature: Any, values: list[Any], where: str) -> tuple[tuple[str, ...], np.ndarray]:
        column = self.config.label_column
        for row, value in enumerate(values):
            if value is None:
                raise DataError(f"{where}: row {row} has no label in column '{column}'")
            if isinstance(value, (list, dict)):
                raise DataError(f"{where}: column '{column}' must hold one label per row, row {row} has {value!r}")
        if isinstance(feature, hf_datasets.ClassLabel):
            names = tuple(str(name) for name in feature.names)
            labels = np.asarray(values, dtype=np.int64)
            bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
            if len(bad):
                row = int(bad[0])
                raise DataError(f"{where}: row {row} has label {labels[row]}, not one of the {len(names)} classes")
            return names, labels
        try:
            uniques = sorted(set(values))
        except TypeError:
            uniques = sorted(set(values), key=str)
        index = {value: i for i, value in enumerate(uniques)}
        return tuple(str(value) for value in uniques), np.asarray([index[v] for v in values], dtype=np.int64)

    def _rows(self, labels: np.ndarray) -> np.ndarray:
        """All row indices, or ``max_samples`` of them: the first rows of each class, stratified."""
        cap = self.config.max_samples
        if cap is None or cap >= len(labels):
            return np.arange(len(labels), dtype=np.int64)
        classes, counts = np.unique(labels, return_counts=True)
        shares = cap * counts / len(labels)
        quotas = np.floor(shares).astype(np.int64)
        order = np.argsort(-(shares - quotas), kind="stable")
        quotas[order[: cap - int(quotas.sum())]] += 1
        picked = [np.flatnonzero(labels == c)[:q] for c, q in zip(classes, quotas, strict=True)]
        return np.sort(np.concatenate(picked))

    def _images(self, raw: Any, feature: Any, rows: np.ndarray, where: str) -> np.ndarray:
        cfg = self.config
        decoder = hf_datasets.Image() if isinstance(feature, hf_datasets.Image) else None
        shape = (len(rows), cfg.image_size, cfg.image_size, cfg.channels)
        check_allocation(int(np.prod(shape)), f"{len(rows)} images of {cfg.image_size}x{cfg.image_size}", DataError)
        out = np.empty(shape, dtype=np.uint8)
        for start in range(0, len(rows), BATCH_ROWS):
            batch = rows[start : start + BATCH_ROWS]
            values = raw[batch.tolist()].column(cfg.image_column).to_pylist()
            for offset, (row, value) in enumerate(zip(batch.tolist(), values, strict=True)):
                try:
                    if value is None:
                        raise ValueError("the image is missing")
                    image = decoder.decode_example(value) if decoder is not None else _to_pil(value)
                    out[start + offset] = self._fit(image)
                except (*DECODE_ERRORS, PIL_Image.DecompressionBombError) as exc:
                    raise DataError(
                        f"{where}: cannot decode the image in row {row} of column '{cfg.image_column}': {exc}"
                    ) from None
        return out

    def _fit(self, image: Any) -> np.ndarray:
        size, channels = self.config.image_size, self.config.channels
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (size, size):
            image = image.resize((size, size), PIL_Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8).reshape(size, size, channels)

    def _captions(
        self, raw: Any, rows: np.ndarray, names: tuple[str, ...], labels: np.ndarray, where: str
    ) -> list[str]:
        column = self.config.caption_column
        if column is None:
            return [self.config.caption_template.format(name=names[y]) for y in labels]
        values = raw[column].to_pylist()
        captions = []
        for row in rows.tolist():
            caption = values[row]
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(f"{where}: row {row} has an empty or non-text caption in column '{column}'")
            captions.append(caption)
        return captions


def _check_columns(data: Any, where: str, columns: list[str]) -> None:
    for column in columns:
        if column not in data.column_names:
            raise DataError(
                f"column '{column}' not found in {where}; columns: {', '.join(data.column_names) or 'none'}"
            )


def _to_pil(value: Any) -> Any:
    """A PIL image from encoded bytes or an [H, W], [H, W, C] or [C, H, W] array (C = 1, 3 or 4)."""
    if isinstance(value, PIL_Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        value = value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        image = PIL_Image.open(BytesIO(value))
        check_pixels(image)
        image.load()
        return image
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))) or 0 in array.shape:
        raise ValueError(f"expected an [H, W], [H, W, C] or [C, H, W] array with C in 1, 3, 4; got {array.shape}")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"expected numeric pixels, got {array.dtype}")
    pixels = array.astype(np.float64)
    if not np.isfinite(pixels).all():
        raise ValueError("pixels are not all finite")
    low, high = float(pixels.min()), float(pixels.max())
    if array.dtype.kind == "b" or (array.dtype.kind == "f" and low >= 0.0 and high <= 1.0):
        pixels = pixels * 255.0
    elif low < 0.0 or high > 255.0:
        raise ValueError(f"pixel values span [{low:g}, {high:g}]; expected 0..255 (or floats in 0..1)")
    return PIL_Image.fromarray(np.round(pixels).astype(np.uint8))
