"""Small real data for the suites: a slice of scikit-learn's digits, with captions for generators."""

from __future__ import annotations

import numpy as np

from ..data import ImageSet, TaskSpec


def digits_sample(count: int = 300, seed: int = 0) -> tuple[ImageSet, TaskSpec]:
    """``count`` real digits images (uint8 8x8x1) and their task spec."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(digits.target))[:count]
    images = np.round(digits.images[idx] * (255.0 / 16.0)).astype(np.uint8)[..., None]
    names = tuple(str(i) for i in range(10))
    return ImageSet(images, digits.target[idx]), TaskSpec(class_names=names, image_size=8, channels=1)


def tiny_generator_task(count: int = 200, seed: int = 0) -> tuple[ImageSet, TaskSpec]:
    """A public split for generator tests: real digits with captions from a template."""
    import dataclasses

    data, task = digits_sample(count, seed)
    task = dataclasses.replace(task, caption_template="a photo of the digit {name}")
    captions = [task.prompt(int(y)) for y in data.labels]
    return ImageSet(data.images, data.labels, captions), task
