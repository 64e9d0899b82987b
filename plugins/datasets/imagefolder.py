"""A folder of images, one sub-folder per class, with optional captions in ``captions.jsonl``."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from fedmmkt_core.data import DataSplits, ImageSet, TaskSpec
from fedmmkt_core.errors import DataError
from fedmmkt_core.interfaces import Dataset
from fedmmkt_core.lazy import lazy_import
from fedmmkt_core.paths import MAX_IMAGE_SIZE, InputPath, check_allocation, open_regular, read_regular
from fedmmkt_core.splits import SplitConfig, protocol_splits

PIL_Image = lazy_import("PIL.Image", "Install it with: pip install pillow")

MAX_PIXELS = 8192 * 8192  # larger images are refused before they are decoded (decompression bombs)
MAX_CAPTIONS_BYTES = 64 * 1024 * 1024  # a captions file is text: 64 MiB holds captions for millions of images
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def check_pixels(image: Any) -> None:
    """Refuse an opened, not yet decoded PIL image larger than MAX_PIXELS (ValueError)."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"the image is {width}x{height} pixels; at most {MAX_PIXELS} pixels are read")


class ImageFolderConfig(SplitConfig):
    root: InputPath = Field(description="folder with one sub-folder of images per class")
    image_size: int = Field(32, ge=4, le=MAX_IMAGE_SIZE, description="images are resized to image_size x image_size")
    channels: Literal[1, 3] = Field(3, description="1 = greyscale, 3 = RGB")
    captions_file: str = Field("captions.jsonl", description='JSON lines {"file": "class/img.png", "caption": "..."}')


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>``; class names are the sorted folder names. Every bad file is named."""

    Config = ImageFolderConfig
    config: ImageFolderConfig

    def class_names(self) -> tuple[str, ...]:
        """The class folders' names, sorted (no image is read)."""
        return tuple(p.name for p in self._class_dirs())

    def _class_dirs(self) -> list[Path]:
        root = Path(self.config.root)
        if not root.is_dir():
            raise DataError(f"image folder {root} is not a directory")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(class_dirs) < 2:
            raise DataError(f"image folder {root} needs at least two class sub-folders, found {len(class_dirs)}")
        return class_dirs

    def load(self, seed: int) -> DataSplits:
        cfg = self.config
        root = Path(cfg.root)
        class_dirs = self._class_dirs()
        inside = _resolve(root)
        files: list[Path] = []
        labels: list[int] = []
        for label, class_dir in enumerate(class_dirs):
            images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for path in [class_dir, *images]:
                target = _resolve(path)
                if not target.is_relative_to(inside):
                    raise DataError(
                        f"{path} is a link to {target}, outside the image folder {root}: links may only point inside it"
                    )
            if not images:
                raise DataError(f"class folder {class_dir} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += images
            labels += [label] * len(images)
        names = tuple(p.name for p in class_dirs)
        captions = self._captions(root, files, names, labels)
        shape = (len(files), cfg.image_size, cfg.image_size, cfg.channels)
        check_allocation(int(np.prod(shape)), f"{len(files)} images of {cfg.image_size}x{cfg.image_size}", DataError)
        pixels = np.empty(shape, dtype=np.uint8)
        for i, path in enumerate(files):
            pixels[i] = self._read(path)
        full = ImageSet(pixels, np.asarray(labels), captions)
        task = TaskSpec(class_names=names, image_size=cfg.image_size, channels=cfg.channels)
        return protocol_splits(full, task, cfg, seed)

    def _read(self, path: Path) -> np.ndarray:
        with open_regular(path, "image", error=DataError) as handle:
            return self._decode(handle, path)

    def _decode(self, handle: Any, path: Path) -> np.ndarray:
        size = self.config.image_size
        try:
            with PIL_Image.open(handle) as image:
                check_pixels(image)
                image = image.convert("L" if self.config.channels == 1 else "RGB")
                image = image.resize((size, size), PIL_Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, PIL_Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        return array.reshape(size, size, self.config.channels)

    def _captions(self, root: Path, files: list[Path], names: tuple[str, ...], labels: list[int]) -> list[str]:
        captions = [self.config.caption_template.format(name=names[y]) for y in labels]
        path = root / self.config.captions_file
        try:
            os.lstat(path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return captions
        index = {f.relative_to(root).as_posix(): i for i, f in enumerate(files)}
        raw = read_regular(path, "captions file", MAX_CAPTIONS_BYTES, DataError)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); write captions as UTF-8 JSON lines") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            expected = f'{path}:{number}: expected {{"file": "class/image.png", "caption": "..."}}'
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError) as exc:  # ValueError: JSON errors and integers over 4300 digits
                reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                raise DataError(f"{expected} ({reason})") from None
            if not isinstance(entry, dict) or not {"file", "caption"} <= entry.keys():
                got = type(entry).__name__ if not isinstance(entry, dict) else "keys " + ", ".join(map(str, entry))
                raise DataError(f"{expected} (got {got[:200]})")
            file, caption = entry["file"], entry["caption"]
            if not isinstance(file, str):
                raise DataError(f"{expected} ('file' is {type(file).__name__}, not a string)")
            if file not in index:
                raise DataError(f"{path}:{number}: no image '{file}' under {root}")
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(f"{path}:{number}: caption for '{file}' is empty")
            captions[index[file]] = caption
        return captions


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # Python 3.11: RuntimeError for a symlink loop
        raise DataError(f"{path} is a symbolic link loop") from None
