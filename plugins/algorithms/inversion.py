"""Inversion feedback: the clients' view of how each synthetic image should change, beyond its logits.

With ``inversion_steps`` > 0 every client also returns, for each image it labels, a small change of the
image (:meth:`~fedmmkt_core.interfaces.ClientModel.inversion_deltas`): normalised gradient steps on its own
model's cross-entropy of the image's class and, for networks with BatchNorm, on DeepInversion's distance
between the images' feature statistics and its private data's running statistics. The server averages the
clients' changes and fine-tunes the adapter on the changed images: a signal that carries the clients' data
distribution (stroke, contrast, style), not only their labels of what the base already draws. The deltas
are a function of each client's private model, like its logits, but are not noised: a recipe with DP
refuses them and a client under its own DP withholds them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedmmkt_core.wire import Message, MessageError

DELTAS = "inversion_deltas"


def inversion_request(steps: int, step_size: float, class_ids: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
    """The config and arrays a fit or predict message adds to ask for inversion deltas (none for 0 steps)."""
    if steps <= 0:
        return {}, {}
    config = {"inversion_steps": int(steps), "inversion_step_size": float(step_size)}
    return config, {"image_class_ids": np.asarray(class_ids, np.int64)}


def check_inversion_deltas(reply: Message, shape: tuple[int, ...]) -> None:
    """A reply's deltas, when it has any: float16 of the images' shape, finite, within [-2, 2]."""
    if DELTAS not in reply.arrays:
        return
    deltas = reply.array(DELTAS, np.float16, shape, finite=True)
    if deltas.size and float(np.abs(deltas).max()) > 2.0:
        raise MessageError(f"{DELTAS} must lie within [-2, 2] (the [-1, 1] image scale's width)")


def nudged_images(images: np.ndarray, replies: Mapping[int, Message]) -> tuple[np.ndarray, dict[str, float]]:
    """``images`` uint8 moved by the mean of the replies' deltas (clipped to the pixel range), and the
    round's metrics: how many clients sent deltas and the mean per-image root-mean-square change in grey
    levels. Unchanged when no client sent any."""
    deltas = [reply.arrays[DELTAS].astype(np.float32) for _, reply in sorted(replies.items()) if DELTAS in reply.arrays]
    metrics = {"inversion_clients": float(len(deltas))}
    if not deltas:
        return images, metrics
    scaled = images.astype(np.float32) / 127.5 - 1.0 + np.mean(deltas, axis=0)
    moved = np.rint((np.clip(scaled, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)  # within [0, 255]
    change = moved.astype(np.float32) - images.astype(np.float32)
    metrics["inversion_rms_grey_levels"] = float(np.mean(np.sqrt(np.mean(change**2, axis=(1, 2, 3)))))
    return moved, metrics
