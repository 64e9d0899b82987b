"""Checks on what the clients upload about the synthetic set, before the server uses any of it."""

from __future__ import annotations

import numpy as np

from fedmmkt_core.privacy import SoftLabelPrivacy
from fedmmkt_core.wire import Message, MessageError

# Trained classifiers' logits stay within tens; a reply far beyond is broken or hostile.
MAX_ABS_LOGIT = 1000.0
MAX_SITE_NOISE_FACTOR = 10.0  # a stricter site's reported noise widens the logit bound up to this many times


def check_logits(reply: Message, shape: tuple[int, int], logits_dtype: str, privacy: SoftLabelPrivacy | None) -> None:
    """A reply's ``logits [N, C]``: the expected dtype and shape, finite, within the plausible bound (widened by
    the DP noise it was sent under, :func:`reply_privacy`); without DP also its ``class_counts`` and a
    positive ``num_samples``. A :class:`MessageError` otherwise."""
    count, num_classes = shape
    logits = reply.array("logits", np.dtype(logits_dtype), shape, finite=True)
    largest = float(np.abs(logits).max()) if count else 0.0
    noised_under = reply_privacy(reply, privacy)
    bound = MAX_ABS_LOGIT + (8 * noised_under.noise_std(count) if noised_under is not None else 0.0)
    if largest > bound:
        raise MessageError(f"logits reach {largest:.4g}, beyond the plausible ±{bound:g}")
    if noised_under is not None:  # under DP (the recipe's or a site's own) counts are withheld (they would escape ε)
        return
    counts = reply.array("class_counts", np.int64, (num_classes,))
    if (counts < 0).any():
        raise MessageError("class_counts must not be negative")
    if int(reply.config.get("num_samples", 0)) <= 0:
        raise MessageError("num_samples must be positive")


def reply_privacy(reply: Message, privacy: SoftLabelPrivacy | None) -> SoftLabelPrivacy | None:
    """The DP settings a reply's logits were noised under, for their plausibility bound: the recipe's
    (``privacy``), or a stricter site's noise multiplier the client reports, up to ``MAX_SITE_NOISE_FACTOR``
    times the recipe's (a claim of less noise than the recipe's changes nothing). In a recipe without DP, a
    site that runs under its own reports its multiplier too (default clipping, as the client applies it; the
    cap is ``MAX_SITE_NOISE_FACTOR`` times a multiplier of 1); ``None`` for a reply that reports none."""
    reported = reply.config.get("privacy_noise_multiplier")
    if reported is None:
        return privacy
    try:
        value = float(reported)
    except (TypeError, ValueError):
        raise MessageError(f"privacy_noise_multiplier must be a number, got {reported!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise MessageError(f"privacy_noise_multiplier must be positive and finite, got {value}")
    base = privacy if privacy is not None else SoftLabelPrivacy(noise_multiplier=1.0)
    recipe = privacy.noise_multiplier if privacy is not None else 0.0
    noise = min(max(value, recipe), MAX_SITE_NOISE_FACTOR * base.noise_multiplier)
    return base.model_copy(update={"noise_multiplier": noise})
