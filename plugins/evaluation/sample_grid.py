"""Sample grids: one row per prompt class, so a person can see what the generator makes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmmkt_core.lazy import lazy_import

PIL_Image = lazy_import("PIL.Image", 'Install it with: pip install "fedmmkt[hf]" (pillow)')


def save_sample_grid(path: Path, images: np.ndarray, class_ids: np.ndarray, columns: int, cell: int = 32) -> None:
    """Write a PNG with up to ``columns`` images of each class in its row, upscaled to ``cell`` pixels."""
    classes = np.unique(class_ids)
    side, channels = images.shape[1], images.shape[3]
    scale = max(1, cell // side)
    tile = side * scale
    gap = 2
    grid = np.full((len(classes) * (tile + gap) + gap, columns * (tile + gap) + gap, channels), 255, dtype=np.uint8)
    for row, label in enumerate(classes):
        for col, image in enumerate(images[class_ids == label][:columns]):
            big = image.repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = gap + row * (tile + gap), gap + col * (tile + gap)
            grid[y : y + tile, x : x + tile] = big
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if channels == 1 else "RGB"
    tmp = path.with_name(path.name + ".tmp")
    PIL_Image.fromarray(grid[..., 0] if channels == 1 else grid, mode=mode).save(tmp, format="PNG")
    tmp.replace(path)
