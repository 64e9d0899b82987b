"""The evaluation protocol's splits, shared by every dataset plugin."""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from .data import DataSplits, ImageSet, TaskSpec
from .interfaces import ComponentConfig


class SplitConfig(ComponentConfig):
    """Shares of each class held out for testing, for the evaluation oracle and for the server."""

    test_fraction: float = Field(0.2, gt=0, lt=1, description="held-out split every client is evaluated on")
    oracle_fraction: float = Field(
        0.15, ge=0, lt=1, description="held out from every party; trains the evaluation oracle"
    )
    public_fraction: float = Field(0.0, ge=0, lt=1, description="the server's public split (generator pre-training)")
    caption_template: str = Field("a photo of a {name}", description="caption from the class name")

    @model_validator(mode="after")
    def _check_shares(self) -> SplitConfig:
        if self.test_fraction + self.oracle_fraction + self.public_fraction >= 0.9:
            raise ValueError("test_fraction + oracle_fraction + public_fraction must leave at least 10% for clients")
        if "{name}" not in self.caption_template:
            raise ValueError("caption_template must contain '{name}'")
        return self


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


def protocol_splits(full: ImageSet, task: TaskSpec, config: SplitConfig, seed: int) -> DataSplits:
    """Stratified test / oracle / public splits of ``full``; the rest is the clients' training data."""
    fractions = [config.test_fraction, config.oracle_fraction, config.public_fraction]
    test, oracle, public, train = (full.subset(p) for p in stratified_split(full.labels, fractions, seed))
    return DataSplits(
        task=task,
        train=train,
        test=test,
        oracle=oracle if len(oracle) else None,
        public=public if len(public) else None,
    )
