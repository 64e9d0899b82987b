"""Deterministic seeds derived from the recipe's seed and a purpose, e.g. ("fit", round, client)."""

from __future__ import annotations

import importlib.util
import random
import sys
import zlib

import numpy as np


def derive_seed(seed: int, *keys: str | int) -> int:
    """A 31-bit seed that depends only on ``seed`` and ``keys`` (stable across processes)."""
    parts = [seed & 0xFFFFFFFF]
    for key in keys:
        parts.append(zlib.crc32(key.encode()) if isinstance(key, str) else int(key) & 0xFFFFFFFF)
    return int(np.random.SeedSequence(parts).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch (when installed)."""
    random.seed(seed)
    np.random.seed(seed)
    if "torch" in sys.modules or importlib.util.find_spec("torch") is not None:
        import torch

        torch.manual_seed(seed)
