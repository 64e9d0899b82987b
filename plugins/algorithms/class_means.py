"""Class-mean feedback: what each class of the clients' private images looks like on average.

With ``class_mean_shift`` λ > 0 every client also returns, beside its logits, the mean image of each
class it holds at least ``class_mean_min_count`` images of (``class_means`` float16 ``[C, H, W, ch]``
on the [-1, 1] scale, zeros for a class it withholds, and ``class_mean_counts`` int64 ``[C]``, 0 there).
The server pools them weighted by count into the federation's class means μ_c and fine-tunes the adapter
on its images moved towards them: each image x of class c becomes ``x + λ·(μ_c - m_c)``, where m_c is
the mean of the round's images of class c. At λ = 1 the round's class-c images have the clients' class
mean (before clipping to the pixel range); their variation is the generator's own.

What it reveals: an average of at least ``class_mean_min_count`` of a client's images per class, not
noised. Differential privacy does not cover it: a recipe with ``privacy`` refuses it and a client under
its own DP withholds it. A client never averages fewer than 10 images, whatever a server asks.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedmmkt_core.wire import Message, MessageError

MEANS = "class_means"
COUNTS = "class_mean_counts"
REQUEST = "class_means_min_count"


def class_means_request(min_count: int) -> dict:
    """The config a fit or predict message adds to ask for class means (none for 0)."""
    return {REQUEST: int(min_count)} if min_count > 0 else {}


def check_class_means(reply: Message, shape: tuple[int, ...], min_count: int) -> None:
    """A reply's class means, when it has any: float16 ``[C, H, W, ch]`` within [-1, 1], counts of
    ``[C]`` that are 0 or at least ``min_count`` (what was asked), with zero means where 0."""
    if MEANS not in reply.arrays and COUNTS not in reply.arrays:
        return
    means = reply.array(MEANS, np.float16, shape, finite=True)
    counts = reply.array(COUNTS, np.int64, (shape[0],))
    if means.size and float(np.abs(means).max()) > 1.0:
        raise MessageError(f"{MEANS} must lie within [-1, 1] (the image scale)")
    if ((counts != 0) & (counts < min_count)).any() or (counts < 0).any():
        raise MessageError(f"{COUNTS} must be 0 (withheld) or at least {min_count} (the least asked for)")
    if np.abs(means[counts == 0]).max(initial=0) > 0:
        raise MessageError(f"{MEANS} of a withheld class (count 0) must be zero")


def federation_class_means(replies: Mapping[int, Message]) -> tuple[np.ndarray, np.ndarray] | None:
    """The clients' class means pooled by count: (float32 ``[C, H, W, ch]``, bool ``[C]`` True where some
    client sent one); None when no client sent any."""
    sent = [reply for _, reply in sorted(replies.items()) if MEANS in reply.arrays]
    if not sent:
        return None
    means = np.stack([reply.arrays[MEANS].astype(np.float64) for reply in sent])  # [K, C, H, W, ch]
    counts = np.stack([reply.arrays[COUNTS].astype(np.float64) for reply in sent])  # [K, C]
    totals = counts.sum(axis=0)
    pooled = np.einsum("kc,kc...->c...", counts, means) / np.maximum(totals, 1).reshape(-1, 1, 1, 1)
    return pooled.astype(np.float32), totals > 0


def shifted_to_class_means(
    images: np.ndarray, class_ids: np.ndarray, means: np.ndarray, held: np.ndarray, strength: float
) -> tuple[np.ndarray, dict[str, float]]:
    """``images`` uint8 ``[N, H, W, ch]`` of classes ``class_ids`` moved by ``strength`` times (the
    federation's class mean - these images' class mean), clipped to the pixel range; classes no client
    sent a mean of are unchanged. Also the metrics: classes moved, mean per-image rms change in grey levels."""
    scaled = images.astype(np.float32) / 127.5 - 1.0
    for c in np.unique(class_ids):
        if held[c]:
            members = class_ids == c
            scaled[members] += strength * (means[c] - scaled[members].mean(axis=0))
    moved = np.rint((np.clip(scaled, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    change = moved.astype(np.float32) - images.astype(np.float32)
    rms = float(np.mean(np.sqrt(np.mean(change**2, axis=tuple(range(1, images.ndim)))))) if len(images) else 0.0
    return moved, {"class_mean_classes": float(held[np.unique(class_ids)].sum()), "class_mean_rms_grey_levels": rms}
