"""Helpers for the generator's fine-tuning pairs (:class:`~fedmmkt_core.interfaces.AlignmentBatch`)."""

from __future__ import annotations

import numpy as np

from fedmmkt_core.interfaces import AlignmentBatch


def concatenate(first: AlignmentBatch, second: AlignmentBatch) -> AlignmentBatch:
    """``first``'s pairs, then ``second``'s (whose ``class_prompts`` the result keeps)."""
    return AlignmentBatch(
        np.concatenate([first.images, second.images]),
        first.prompts + second.prompts,
        np.concatenate([first.class_ids, second.class_ids]),
        np.concatenate([first.soft_labels, second.soft_labels]),
        second.class_prompts,
    )


def counted_aligned(batch: AlignmentBatch) -> AlignmentBatch:
    """``batch`` with every pair's soft label the one-hot of its prompt's class (a_j = 1): every pair kept."""
    one_hot = np.eye(batch.soft_labels.shape[1], dtype=np.float32)[batch.class_ids]
    return AlignmentBatch(batch.images, batch.prompts, batch.class_ids, one_hot, batch.class_prompts)
