"""Checks on what third-party components hand back to the round loop.

A plugin's bug should stop the run where it happens, naming the plugin, not a round later on an
unrelated error. Each check raises :class:`~fedmmkt_core.errors.PluginOutputError`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import PluginOutputError

ROW_SUM_TOLERANCE = 1e-3


def check_soft_labels(labels: Any, shape: tuple[int, int], owner: str) -> np.ndarray:
    """``labels`` as float32 ``[N, C]`` rows of probabilities, or an error naming ``owner``."""
    array = np.asarray(labels)
    if array.shape != tuple(shape):
        raise PluginOutputError(f"{owner} returned soft labels of shape {array.shape}, expected {tuple(shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise PluginOutputError(f"{owner} returned soft labels of dtype {array.dtype}, expected floats")
    if not np.isfinite(array).all():
        raise PluginOutputError(f"{owner} returned soft labels with NaN or infinite values")
    if (array < 0).any():
        raise PluginOutputError(
            f"{owner} returned negative soft labels (min {float(array.min()):.4g}): rows must be probabilities, "
            "not logits (apply a softmax)"
        )
    sums = array.sum(axis=1, dtype=np.float64)
    worst = int(np.argmax(np.abs(sums - 1.0))) if len(sums) else 0
    if len(sums) and abs(sums[worst] - 1.0) > ROW_SUM_TOLERANCE:
        raise PluginOutputError(
            f"{owner} returned soft labels whose rows do not sum to one (row {worst} sums to {sums[worst]:.4g})"
        )
    return array.astype(np.float32)


def check_metrics(metrics: Any, owner: str) -> dict[str, Any]:
    """``metrics`` as a JSON-able dict with finite numbers (numpy scalars become Python numbers)."""
    if not isinstance(metrics, dict):
        raise PluginOutputError(f"{owner} returned metrics of type {type(metrics).__name__}, expected a dict")
    return {str(key): _plain(value, f"{owner} metric '{key}'") for key, value in metrics.items()}


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        value = value.tolist()
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise PluginOutputError(f"{where} is {value}: metrics must be finite")
        return value
    if isinstance(value, list | tuple):
        return [_plain(item, where) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    raise PluginOutputError(f"{where} has type {type(value).__name__}, which is not a JSON value")
