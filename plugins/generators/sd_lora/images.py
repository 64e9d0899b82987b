"""Image tensors between numpy batches, the VAE's range and the task's geometry."""

from __future__ import annotations

from typing import Any

import numpy as np
from fedmmkt_plugins.generators.sd_lora.libraries import torch

from fedmmkt_core.data import TaskSpec
from fedmmkt_core.errors import DataError


def pixels_to_tensor(images: np.ndarray) -> Any:
    """uint8 ``[N, H, W, C]`` -> float ``[N, C, H, W]`` in [-1, 1], the range the VAE works in."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def match_channels(images: Any, channels: int) -> Any:
    """Grey <-> RGB by averaging or repeating the channel axis of ``[N, C, H, W]``."""
    have = images.shape[1]
    if have == channels:
        return images
    if channels == 1:
        return images.mean(dim=1, keepdim=True)
    if have == 1:
        return images.repeat(1, channels, 1, 1)
    raise DataError(f"cannot convert {have}-channel images to {channels} channels")


def to_task_geometry(images: Any, task: TaskSpec) -> Any:
    """Resize ``[N, C, H, W]`` to the task's square size (area averaging when shrinking) and channels."""
    images = match_channels(images, task.channels)
    if images.shape[-1] != task.image_size:
        mode = "area" if images.shape[-1] > task.image_size else "bilinear"
        images = torch.nn.functional.interpolate(images, size=(task.image_size, task.image_size), mode=mode)
    return images
