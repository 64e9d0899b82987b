"""A folder of IDX files (the format of MNIST, Fashion-MNIST, KMNIST, EMNIST), raw or gzipped.

Every header is read and checked before any payload is allocated: the magic number (unsigned bytes
only), the dimension count, the claimed size against the file's size (for a gzipped file, the
decompressed stream is read in chunks and must end exactly where the header says), the label file's
length against the image count and every label against the number of classes. Each failure is a
:class:`~fedmmkt_core.errors.DataError` naming the file. Only regular files are opened; nothing is
unpickled (``numpy.frombuffer`` on the bytes).

The split files (``train-*``, ``t10k-*``) are pooled, optionally cut down to ``max_samples_per_class``
images per class (a stratified subsample, the same whatever the run's seed), and then cut by the
project's split protocol (test / oracle / public / validation, the rest to the clients), like every other
dataset plugin: the official ``t10k`` split is *not* kept as the test split, so accuracies are not those
of papers that report on it.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from pydantic import Field, model_validator

from fedmmkt_core import paths
from fedmmkt_core.data import DataSplits, ImageSet, TaskSpec
from fedmmkt_core.errors import DataError
from fedmmkt_core.interfaces import Dataset
from fedmmkt_core.paths import InputPath
from fedmmkt_core.splits import SplitConfig, protocol_splits

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions: count, rows, columns
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension: count
UBYTE = 0x08
MAX_PAYLOAD = 2**31  # bytes; a header claiming more is refused from the header alone (EMNIST byclass: 547 MB)
CHUNK = 1 << 20
SUBSAMPLE_SEED = 0  # max_samples_per_class keeps the same images for every run seed

KNOWN_CLASSES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "mnist": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    # KMNIST's ten hiragana, romanised: お き す つ な は ま や れ を
    "kmnist": ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
}
KNOWN_CAPTIONS = {
    "fashion-mnist": "a photo of a {name}",
    "mnist": "a photo of the digit {name}",
    "kmnist": "the hiragana character {name}",
}


class IDXConfig(SplitConfig):
    root: InputPath = Field(
        description="folder holding PREFIX-images-idx3-ubyte[.gz] and PREFIX-labels-idx1-ubyte[.gz]"
    )
    prefixes: list[str] = Field(
        ["train", "t10k"],
        min_length=1,
        description="file-name prefixes of the splits to pool (EMNIST e.g. [emnist-balanced-train, "
        "emnist-balanced-test])",
    )
    known: Literal["fashion-mnist", "mnist", "kmnist"] | None = Field(
        None, description="take the class names (and the default caption) of this dataset"
    )
    class_names: list[str] | None = Field(None, min_length=2, description="class names, label 0 first")
    image_size: int = Field(28, ge=4, le=512, description="side in pixels of the images handed to the run")
    resize: Literal["pad", "nearest", "bilinear"] = Field(
        "pad",
        description="how images reach image_size: 'pad' centres them on a black canvas (28 -> 32), 'nearest' or "
        "'bilinear' rescale them",
    )
    max_samples_per_class: int | None = Field(
        None,
        ge=1,
        description="CPU budget: keep at most this many images per class of the pooled files (stratified, the same "
        "for every seed) before the split protocol",
    )

    @model_validator(mode="before")
    @classmethod
    def _known_caption(cls, data: Any) -> Any:
        if isinstance(data, dict) and "caption_template" not in data and data.get("known") in KNOWN_CAPTIONS:
            data = {**data, "caption_template": KNOWN_CAPTIONS[data["known"]]}
        return data

    @model_validator(mode="after")
    def _check_names(self) -> IDXConfig:
        if (self.known is None) == (self.class_names is None):
            raise ValueError("give exactly one of class_names (a list) and known (fashion-mnist, mnist or kmnist)")
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be distinct")
        if len(set(self.prefixes)) != len(self.prefixes):
            raise ValueError("prefixes must be distinct")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return KNOWN_CLASSES[self.known] if self.known is not None else tuple(self.class_names or ())


# ---------------------------------------------------------------------------------------------------------
# the IDX reader


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file (a FIFO, device or folder is a DataError)."""
    return paths.open_regular(path, "IDX file", error=DataError)


@dataclass(frozen=True)
class IDXHeader:
    path: Path
    dims: tuple[int, ...]
    gzipped: bool
    header_bytes: int

    @property
    def payload(self) -> int:
        return math.prod(self.dims)


def _read_exact(stream: BinaryIO, count: int, path: Path, what: str) -> bytes:
    data = stream.read(count)
    if len(data) != count:
        raise DataError(f"{path}: truncated {what} ({len(data)} of {count} bytes)")
    return data


class IDXFile:
    """One IDX file, raw or gzipped: ``header`` is checked on open, ``read()`` returns its uint8 array."""

    def __init__(self, path: Path, magic: int, kind: str):
        self.path = Path(path)
        self.kind = kind
        self.header = self._read_header(magic)

    def _stream(self) -> BinaryIO:
        raw = open_regular(self.path)
        if raw.read(2) == b"\x1f\x8b":
            raw.seek(0)
            return gzip.GzipFile(fileobj=raw, mode="rb")  # closing it does not close raw; see _close
        raw.seek(0)
        return raw

    @staticmethod
    def _close(stream: BinaryIO) -> None:
        inner = getattr(stream, "fileobj", None)
        stream.close()
        if inner is not None:
            inner.close()

    def _read_header(self, magic: int) -> IDXHeader:
        path = self.path
        stream = self._stream()
        gzipped = isinstance(stream, gzip.GzipFile)
        try:
            head = _read_exact(stream, 4, path, "header")
            if head[:2] != b"\0\0":
                raise DataError(f"{path}: not an IDX file (magic number 0x{head.hex()}; expected 0x{magic:08x})")
            if head[2] != UBYTE:
                raise DataError(
                    f"{path}: IDX data type 0x{head[2]:02x}; only unsigned bytes (0x08) are read "
                    f"(magic number 0x{head.hex()}, expected 0x{magic:08x})"
                )
            if int.from_bytes(head, "big") != magic:
                raise DataError(
                    f"{path}: magic number 0x{head.hex()} has {head[3]} dimensions; an IDX {self.kind} file has "
                    f"magic 0x{magic:08x} ({magic & 0xFF} dimensions)"
                )
            ndim = head[3]
            dims = tuple(int(d) for d in np.frombuffer(_read_exact(stream, 4 * ndim, path, "header"), dtype=">u4"))
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: cannot read the IDX header: {exc}") from None
        finally:
            self._close(stream)
        header = IDXHeader(path, dims, gzipped, 4 + 4 * ndim)
        claimed = header.payload
        if claimed > MAX_PAYLOAD:
            raise DataError(
                f"{path}: the header claims {' x '.join(map(str, dims))} = {claimed} bytes of data; at most "
                f"{MAX_PAYLOAD} are read"
            )
        if not gzipped:
            size = os.stat(path).st_size
            if size != header.header_bytes + claimed:
                raise DataError(
                    f"{path}: the header claims {' x '.join(map(str, dims))} = {claimed} bytes of data but the file "
                    f"holds {size - header.header_bytes} after its {header.header_bytes}-byte header "
                    f"({'truncated' if size < header.header_bytes + claimed else 'too long'})"
                )
        return header

    def read(self) -> np.ndarray:
        """The payload as a uint8 array of the header's shape; a stream shorter or longer than claimed is refused."""
        header, path = self.header, self.path
        claimed = header.payload
        stream = self._stream()
        try:
            stream.read(header.header_bytes)
            if header.gzipped:
                # grow with the data actually decompressed, never preallocate the header's claim
                buffer = bytearray()
                while len(buffer) < claimed:
                    chunk = stream.read(min(CHUNK, claimed - len(buffer)))
                    if not chunk:
                        raise DataError(
                            f"{path}: truncated: the header claims {claimed} bytes of data, the decompressed "
                            f"stream holds {len(buffer)}"
                        )
                    buffer += chunk
                if stream.read(1):
                    raise DataError(
                        f"{path}: too long: the decompressed stream holds more than the {claimed} bytes its header "
                        "claims"
                    )
                array = np.frombuffer(buffer, dtype=np.uint8)
            else:
                array = np.empty(claimed, dtype=np.uint8)  # equal to the file's size, checked on open
                got = stream.readinto(memoryview(array))
                if got != claimed or stream.read(1):
                    raise DataError(f"{path}: the file changed while it was read ({got} of {claimed} bytes)")
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: cannot read: {exc}") from None
        finally:
            self._close(stream)
        return array.reshape(header.dims)


def find_split_files(root: Path, prefix: str) -> tuple[Path, Path]:
    """``PREFIX-images-idx3-ubyte`` and ``PREFIX-labels-idx1-ubyte`` in ``root`` ('.' before idx, '.gz' allowed).

    Where both a raw and a gzipped copy are present the raw one is read."""
    found = []
    for kind, tag in (("images", "idx3"), ("labels", "idx1")):
        names = [f"{prefix}-{kind}{dot}{tag}-ubyte{gz}" for gz in ("", ".gz") for dot in "-."]
        hits = [root / n for n in names if (root / n).exists() or (root / n).is_symlink()]
        if not hits:
            raise DataError(
                f"{root}: no {prefix}-{kind}-{tag}-ubyte or {prefix}-{kind}-{tag}-ubyte.gz (Fashion-MNIST: "
                "fedmmkt data fetch fashion-mnist DIR)"
            )
        found.append(hits[0])
    return found[0], found[1]


@dataclass
class SplitFiles:
    images: IDXFile
    labels: IDXFile

    @classmethod
    def open(cls, root: Path, prefix: str) -> SplitFiles:
        image_path, label_path = find_split_files(root, prefix)
        images = IDXFile(image_path, IMAGES_MAGIC, "images")
        labels = IDXFile(label_path, LABELS_MAGIC, "labels")
        count, rows, cols = images.header.dims
        if labels.header.dims[0] != count:
            raise DataError(f"{label_path}: {labels.header.dims[0]} labels for the {count} images of {image_path}")
        if rows == 0 or cols == 0:
            raise DataError(f"{image_path}: images of {rows} x {cols} pixels")
        return cls(images, labels)

    def read_labels(self, num_classes: int) -> np.ndarray:
        labels = self.labels.read()
        bad = np.flatnonzero(labels >= num_classes)
        if len(bad):
            raise DataError(
                f"{self.labels.path}: label {int(labels[bad[0]])} at index {int(bad[0])} (and {len(bad) - 1} more); "
                f"there are {num_classes} classes (labels 0 to {num_classes - 1})"
            )
        return labels.astype(np.int64)


def stratified_subsample(labels: np.ndarray, per_class: int, seed: int = SUBSAMPLE_SEED) -> np.ndarray:
    """Sorted indices of at most ``per_class`` items of each class, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def fit_images(images: np.ndarray, size: int, mode: str, path: Path) -> np.ndarray:
    """``[N, H, W]`` uint8 to ``[N, size, size]``: centred zero padding, or a nearest / bilinear rescale."""
    n, rows, cols = images.shape
    if rows == size and cols == size:
        return images
    if mode == "pad":
        if rows > size or cols > size:
            raise DataError(f"{path}: images of {rows} x {cols} do not fit image_size {size} (resize: pad)")
        out = np.zeros((n, size, size), dtype=np.uint8)
        top, left = (size - rows) // 2, (size - cols) // 2
        out[:, top : top + rows, left : left + cols] = images
        return out
    if mode == "nearest":
        ys = np.minimum((np.arange(size) + 0.5) * rows / size, rows - 1).astype(np.int64)
        xs = np.minimum((np.arange(size) + 0.5) * cols / size, cols - 1).astype(np.int64)
        return images[:, ys][:, :, xs]
    ry, rx = _bilinear_matrix(rows, size), _bilinear_matrix(cols, size)
    out = np.empty((n, size, size), dtype=np.uint8)
    for start in range(0, n, 4096):  # float32 in chunks: a bounded working set
        block = images[start : start + 4096].astype(np.float32)
        out[start : start + 4096] = np.clip(np.rint(ry @ block @ rx.T), 0, 255).astype(np.uint8)
    return out


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """``[dst, src]`` weights of bilinear interpolation with aligned pixel centres (as PIL and OpenCV)."""
    pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, src - 1)
    frac = (pos - low).astype(np.float32)
    matrix = np.zeros((dst, src), dtype=np.float32)
    matrix[np.arange(dst), low] += 1 - frac
    matrix[np.arange(dst), high] += frac
    return matrix


class IDXDataset(Dataset):
    """IDX files in ``root``; class names from ``class_names`` or ``known``; the protocol's stratified splits."""

    Config = IDXConfig
    config: IDXConfig

    def class_names(self) -> tuple[str, ...]:
        return self.config.names

    def load(self, seed: int) -> DataSplits:
        cfg = self.config
        root = Path(cfg.root)
        if not root.is_dir():
            raise DataError(f"IDX folder {root} is not a directory")
        names = cfg.names
        splits = [SplitFiles.open(root, prefix) for prefix in cfg.prefixes]  # every header before any payload
        shapes = {s.images.header.dims[1:] for s in splits}
        if len(shapes) > 1:
            raise DataError(
                f"{root}: the image files disagree on the image size: "
                + ", ".join(f"{s.images.path.name} {s.images.header.dims[1:]}" for s in splits)
            )
        labels = [s.read_labels(len(names)) for s in splits]
        pooled = np.concatenate(labels)
        if not len(pooled):
            raise DataError(f"{root}: the IDX files hold no images")
        if cfg.max_samples_per_class is not None:
            keep = stratified_subsample(pooled, cfg.max_samples_per_class)
        else:
            keep = np.arange(len(pooled))
        size = cfg.image_size
        if len(keep) * size * size > MAX_PAYLOAD:
            raise DataError(
                f"{root}: {len(keep)} images of {size}x{size} would take {len(keep) * size * size / 2**30:.1f} GiB; "
                f"at most {MAX_PAYLOAD / 2**30:.0f} GiB: set max_samples_per_class or a smaller image_size"
            )
        images, offset = [], 0
        for split, split_labels in zip(splits, labels, strict=True):
            mine = keep[(keep >= offset) & (keep < offset + len(split_labels))] - offset
            offset += len(split_labels)
            if len(mine):
                pixels = split.images.read()
                if len(mine) < len(pixels):
                    pixels = pixels[mine]
                images.append(fit_images(pixels, cfg.image_size, cfg.resize, split.images.path))
                del pixels
        pixels = np.concatenate(images)[..., None] if len(images) > 1 else images[0][..., None]
        del images
        targets = pooled[keep]
        captions = [cfg.caption_template.format(name=names[y]) for y in targets]
        full = ImageSet(pixels, targets, captions)
        task = TaskSpec(class_names=names, image_size=cfg.image_size, channels=1)
        return protocol_splits(full, task, cfg, seed)
