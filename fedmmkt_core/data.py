"""Plain containers for images and labels. numpy only, so every framework can use them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import DataError


@dataclass
class ImageSet:
    """Images as uint8 ``[N, H, W, C]`` with integer labels ``[N]`` and optional captions."""

    images: np.ndarray
    labels: np.ndarray
    captions: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 [N, H, W, C], got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (len(self.images),):
            raise DataError(f"labels must have shape ({len(self.images)},), got {self.labels.shape}")
        if self.captions is not None and len(self.captions) != len(self.images):
            raise DataError(f"{len(self.captions)} captions for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """The samples at ``indices``, in that order (captions too)."""
        idx = np.asarray(indices, dtype=np.int64)
        captions = [self.captions[i] for i in idx] if self.captions is not None else None
        return ImageSet(self.images[idx], self.labels[idx], captions)

    def class_counts(self, num_classes: int) -> np.ndarray:
        """int64 ``[num_classes]``: how many samples each class has."""
        return np.bincount(self.labels, minlength=num_classes).astype(np.int64)

    def class_means(self, num_classes: int, min_count: int) -> tuple[np.ndarray, np.ndarray]:
        """Per class, the mean image on the [-1, 1] scale (float32 ``[num_classes, H, W, C]``) where the class
        has at least ``min_count`` samples, zeros elsewhere; and int64 ``[num_classes]``, the counts with 0
        where the mean is withheld."""
        counts = self.class_counts(num_classes)
        counts[counts < min_count] = 0
        means = np.zeros((num_classes, *self.images.shape[1:]), np.float32)
        for c in np.flatnonzero(counts):
            means[c] = self.images[self.labels == c].astype(np.float32).mean(axis=0) / 127.5 - 1.0
        return means, counts


@dataclass(frozen=True)
class TaskSpec:
    """What every component needs to know about the task: classes and image geometry."""

    class_names: tuple[str, ...]
    image_size: int
    channels: int
    caption_template: str = "a photo of a {name}"

    def prompt(self, class_id: int) -> str:
        """The caption of class ``class_id`` (the prompt a generator is asked for it with)."""
        return self.caption_template.format(name=self.class_names[class_id])

    @property
    def num_classes(self) -> int:
        """How many classes the task has."""
        return len(self.class_names)


@dataclass
class DataSplits:
    """A dataset cut into the splits of the evaluation protocol.

    ``train`` is partitioned among the clients; ``test`` is the held-out split every client is
    evaluated on; ``oracle`` is held out from every party and trains the evaluation oracle;
    ``public`` is what the server may pre-train its generator on (it may come from another domain);
    ``validation`` is carved from the clients' side for choosing defaults (the test split only reports).
    """

    task: TaskSpec
    train: ImageSet
    test: ImageSet
    oracle: ImageSet | None = None
    public: ImageSet | None = None
    validation: ImageSet | None = None


@dataclass(frozen=True)
class ServerData:
    """What the server side of a run may hold: never a client's training data.

    ``evaluation`` is the split clients are evaluated on (``data.evaluate_on``: test or validation),
    ``oracle`` trains the evaluation oracle (held out from every party), ``public`` is the server's own
    pre-training data.
    """

    task: TaskSpec
    evaluation: ImageSet
    oracle: ImageSet | None = None
    public: ImageSet | None = None


def concatenate_sets(sets: Sequence[ImageSet]) -> ImageSet:
    """One image set from several with the same geometry (captions kept when all have them)."""
    if not sets:
        raise DataError("no image sets to concatenate")
    captions = None
    if all(s.captions is not None for s in sets):
        captions = [c for s in sets for c in s.captions]  # type: ignore[union-attr]
    return ImageSet(np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]), captions)


@dataclass
class DistillSet:
    """Synthetic images with the federation's aggregated soft labels, sent to clients to distil."""

    images: np.ndarray
    soft_labels: np.ndarray
    weight: float
    temperature: float


def class_index_map(names: Sequence[str], onto: Sequence[str], what: str) -> np.ndarray:
    """``result[j]`` is the index in ``onto`` of class ``names[j]``: classes matched by name, in any order.

    ``what`` names the dataset with ``names`` (``"data.public ('imagefolder')"``); a class of ``onto`` it
    lacks, one it has beyond ``onto`` or a name it repeats is a :class:`DataError` naming the classes."""
    names, onto = [str(n) for n in names], [str(n) for n in onto]
    repeated = sorted({n for n in names if names.count(n) > 1})
    missing = [n for n in onto if n not in names]
    extra = [n for n in names if n not in onto]
    if repeated or missing or extra:
        problems = [f"missing {missing}"] if missing else []
        problems += [f"extra {extra}"] if extra else []
        problems += [f"repeated {repeated}"] if repeated else []
        raise DataError(
            f"{what} has classes {names}, the clients' dataset has {onto}: {', '.join(problems)} (classes are "
            "matched by name, in any order; the server's prompts must name exactly the clients' classes)"
        )
    position = {name: index for index, name in enumerate(onto)}
    return np.asarray([position[n] for n in names], dtype=np.int64)
