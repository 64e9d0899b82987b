"""scikit-learn's handwritten digits: 1,797 real 8x8 grey images of 10 classes, offline."""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from fedmmkt_core.data import DataSplits, ImageSet, TaskSpec
from fedmmkt_core.interfaces import ComponentConfig, Dataset
from fedmmkt_core.lazy import lazy_import

sklearn_datasets = lazy_import("sklearn.datasets", "Install it with: pip install scikit-learn")

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class DigitsConfig(ComponentConfig):
    image_size: int = Field(8, ge=8, description="side in pixels; a multiple of 8 (nearest-neighbour upscaling)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out split every client is evaluated on")
    oracle_fraction: float = Field(
        0.15, ge=0, lt=1, description="held out from every party; trains the evaluation oracle"
    )
    public_fraction: float = Field(0.0, ge=0, lt=1, description="the server's public split (generator pre-training)")
    caption_template: str = Field("a photo of the digit {name}", description="caption from the class name")

    @model_validator(mode="after")
    def _check(self) -> DigitsConfig:
        if self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {self.image_size}")
        if self.test_fraction + self.oracle_fraction + self.public_fraction >= 0.9:
            raise ValueError(
                "test_fraction + oracle_fraction + public_fraction must leave at least 10% for the clients"
            )
        if "{name}" not in self.caption_template:
            raise ValueError("caption_template must contain '{name}'")
        return self


class DigitsDataset(Dataset):
    """scikit-learn digits with captions from the labels; stratified test/oracle/public splits."""

    Config = DigitsConfig
    config: DigitsConfig

    def load(self, seed: int) -> DataSplits:
        digits = sklearn_datasets.load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        scale = self.config.image_size // 8
        if scale > 1:
            images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        labels = digits.target.astype(np.int64)
        captions = [self.config.caption_template.format(name=DIGIT_NAMES[y]) for y in labels]
        full = ImageSet(images, labels, captions)
        cfg = self.config
        parts = stratified_split(labels, [cfg.test_fraction, cfg.oracle_fraction, cfg.public_fraction], seed)
        test, oracle, public, train = (full.subset(p) for p in parts)
        task = TaskSpec(class_names=DIGIT_NAMES, image_size=cfg.image_size, channels=1)
        return DataSplits(
            task=task,
            train=train,
            test=test,
            oracle=oracle if len(oracle) else None,
            public=public if len(public) else None,
        )


def stratified_split(labels: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Cut indices into ``len(fractions)`` parts of those shares per class, plus the rest."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for i, fraction in enumerate(fractions):
            count = int(round(fraction * len(idx)))
            parts[i].extend(idx[start : start + count])
            start += count
        parts[-1].extend(idx[start:])
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
