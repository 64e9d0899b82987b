"""scikit-learn's handwritten digits: 1,797 real 8x8 grey images of 10 classes, offline."""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from fedmmkt_core.data import DataSplits, ImageSet, TaskSpec
from fedmmkt_core.errors import DataError
from fedmmkt_core.interfaces import Dataset
from fedmmkt_core.lazy import lazy_import
from fedmmkt_core.paths import MAX_IMAGE_SIZE, check_allocation
from fedmmkt_core.splits import SplitConfig, protocol_splits

sklearn_datasets = lazy_import("sklearn.datasets", "Install it with: pip install scikit-learn")

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class DigitsConfig(SplitConfig):
    image_size: int = Field(
        8, ge=8, le=MAX_IMAGE_SIZE, description="side in pixels; a multiple of 8 (nearest-neighbour upscaling)"
    )
    caption_template: str = Field("a photo of the digit {name}", description="caption from the class name")

    @model_validator(mode="after")
    def _check_size(self) -> DigitsConfig:
        if self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {self.image_size}")
        return self


class DigitsDataset(Dataset):
    """scikit-learn digits with captions from the labels; stratified test/oracle/public splits."""

    Config = DigitsConfig
    config: DigitsConfig

    def class_names(self) -> tuple[str, ...]:
        return DIGIT_NAMES

    def load(self, seed: int) -> DataSplits:
        digits = sklearn_datasets.load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        scale = self.config.image_size // 8
        size = self.config.image_size
        check_allocation(2 * len(images) * size * size, f"{len(images)} images of {size}x{size}", DataError)
        if scale > 1:
            images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        labels = digits.target.astype(np.int64)
        captions = [self.config.caption_template.format(name=DIGIT_NAMES[y]) for y in labels]
        full = ImageSet(images, labels, captions)
        task = TaskSpec(class_names=DIGIT_NAMES, image_size=self.config.image_size, channels=1)
        return protocol_splits(full, task, self.config, seed)
