"""The evaluation protocol's splits, shared by every dataset plugin."""

from __future__ import annotations

import dataclasses
import string
from typing import Literal

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
    validation_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="carved from the clients' side: the split defaults are chosen on (data.evaluate_on: validation); "
        "the test split only reports",
    )
    caption_template: str = Field("a photo of a {name}", description="caption from the class name")
    public_style: Literal["same", "inverted"] = Field(
        "same",
        description="domain gap of the server's public split: 'inverted' stores a share of it as negatives "
        "(another acquisition: dark strokes on a light ground), so the server's generator does not know the "
        "clients' domain",
    )
    public_style_fraction: float = Field(0.7, ge=0, le=1, description="share of the public split in public_style")

    @model_validator(mode="after")
    def _check_shares(self) -> SplitConfig:
        held_out = self.test_fraction + self.oracle_fraction + self.public_fraction + self.validation_fraction
        if held_out >= 0.9:
            raise ValueError(
                "test_fraction + oracle_fraction + public_fraction + validation_fraction must leave at least 10% "
                "for clients"
            )
        if "{name}" not in self.caption_template:
            raise ValueError("caption_template must contain '{name}'")
        check_caption_template(self.caption_template)
        return self


def check_caption_template(template: str) -> None:
    """Refuse a template other than text with ``{name}`` fields (``{0}``, ``{other}``, ``{name.x}``,
    ``{name:>99999999}``, a lone brace): ValueError naming the problem."""
    shown = template if len(template) <= 80 else template[:80] + "..."
    try:
        fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(template)]
    except ValueError as exc:
        reason = str(exc)
    else:
        bad = [
            "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            for field, spec, conversion in fields
            if field is not None and (field, spec, conversion) != ("name", "", None)
        ]
        if not bad:
            return
        reason = f"{bad[0][:40]} is not {{name}}"
    raise ValueError(
        f"caption_template {shown!r} cannot be filled in ({reason}): use {{name}} for the class name and write a "
        "literal brace as {{ or }}"
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


def protocol_splits(full: ImageSet, task: TaskSpec, config: SplitConfig, seed: int) -> DataSplits:
    """Stratified test / oracle / public / validation splits of ``full``; the rest is the clients' training data.

    Validation is cut last, so adding it leaves the test, oracle and public splits unchanged."""
    fractions = [config.test_fraction, config.oracle_fraction, config.public_fraction, config.validation_fraction]
    parts = stratified_split(full.labels, fractions, seed)
    test, oracle, public, validation, train = (full.subset(p) for p in parts)
    if config.public_style == "inverted" and len(public):
        public = shifted_style(public, config.public_style_fraction, seed)
    return DataSplits(
        task=dataclasses.replace(task, caption_template=config.caption_template),
        train=train,
        test=test,
        oracle=oracle if len(oracle) else None,
        public=public if len(public) else None,
        validation=validation if len(validation) else None,
    )


def shifted_style(data: ImageSet, fraction: float, seed: int) -> ImageSet:
    """Invert a stratified ``fraction`` of ``data`` (the same share of every class)."""
    (chosen, _rest) = stratified_split(data.labels, [fraction], seed + 1)
    images = data.images.copy()
    images[chosen] = 255 - images[chosen]
    return ImageSet(images, data.labels, data.captions)
