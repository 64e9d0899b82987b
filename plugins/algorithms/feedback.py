"""FedMMKT's data feedback beyond the clients' labels, in one place: what a labelling message asks for, how a
reply's feedback is checked, what the adapter is fine-tuned on, and which recipes refuse it.

Two kinds, both off by default and both outside differential privacy: inversion deltas (:mod:`.inversion`)
and class means (:mod:`.class_means`).
"""

from __future__ import annotations

import numpy as np
from fedmmkt_plugins.algorithms.class_means import (
    check_class_means,
    class_means_request,
    federation_class_means,
    shifted_to_class_means,
)
from fedmmkt_plugins.algorithms.fedmmkt_config import FedMMKTConfig
from fedmmkt_plugins.algorithms.inversion import check_inversion_deltas, inversion_request, nudged_images

from fedmmkt_core.errors import RecipeIssue
from fedmmkt_core.recipe import Recipe
from fedmmkt_core.wire import Message


def feedback_request(
    cfg: FedMMKTConfig, inversion: bool, class_means: bool, class_ids: np.ndarray
) -> tuple[dict, dict[str, np.ndarray]]:
    """The config and arrays a message that asks for labels on images of ``class_ids`` adds."""
    config, arrays = inversion_request(cfg.inversion_steps if inversion else 0, cfg.inversion_step_size, class_ids)
    config.update(class_means_request(cfg.class_mean_min_count if class_means else 0))
    return config, arrays


def check_feedback(reply: Message, images_shape: tuple[int, ...], num_classes: int, cfg: FedMMKTConfig) -> None:
    """A reply's inversion deltas and class means, whichever it has (a client may withhold them)."""
    check_inversion_deltas(reply, images_shape)
    check_class_means(reply, (num_classes, *images_shape[1:]), cfg.class_mean_min_count)


def fine_tune_images(
    images: np.ndarray, class_ids: np.ndarray, replies: dict[int, Message], inversion: bool, class_mean_shift: float
) -> tuple[np.ndarray, dict[str, float]]:
    """The round's images as the adapter is fine-tuned on them, and the round's feedback metrics: moved by the
    clients' mean inversion delta (``inversion``), then towards the federation's class means by
    ``class_mean_shift`` of the way (when > 0 and some client sent them)."""
    moved, metrics = nudged_images(images, replies) if inversion else (images, {})
    pooled = federation_class_means(replies) if class_mean_shift > 0 else None
    if pooled is not None:
        moved, shift_metrics = shifted_to_class_means(moved, class_ids, *pooled, class_mean_shift)
        metrics.update(shift_metrics)
    return moved, metrics


def privacy_issues(cfg: FedMMKTConfig, recipe: Recipe) -> list[RecipeIssue]:
    """A recipe with DP refuses either feedback: neither is noised or counted in ε."""
    if recipe.privacy is None:
        return []
    issues = []
    if cfg.class_mean_shift:
        issues.append(
            RecipeIssue(
                "algorithm.params.class_mean_shift",
                "class-mean feedback uploads each class's mean private image, which differential privacy neither "
                "noises nor counts in ε; set class_mean_shift: 0 or remove privacy",
            )
        )
    if cfg.inversion_steps:
        issues.append(
            RecipeIssue(
                "algorithm.params.inversion_steps",
                "inversion feedback uploads image-sized changes that differential privacy neither noises nor "
                "counts in ε; set inversion_steps: 0 or remove privacy",
            )
        )
    return issues
