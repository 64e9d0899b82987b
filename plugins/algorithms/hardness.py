"""How hard a synthetic image is for the federation: the measures hard-sample transfer ranks images by."""

from __future__ import annotations

import numpy as np
from fedmmkt_plugins.aggregators.kd import softmax


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of ``probabilities [N, C]``."""
    p = np.asarray(probabilities, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)


def disagreement(logits: list[np.ndarray], temperature: float = 1.0) -> np.ndarray:
    """How much the clients disagree on each image: the Jensen-Shannon divergence of their softmax outputs
    (``logits``: one ``[N, C]`` array per client), the entropy of their mean minus their mean entropy."""
    probabilities = [softmax(np.asarray(x, np.float64), temperature) for x in logits]
    return entropy(np.mean(probabilities, axis=0)) - np.mean([entropy(p) for p in probabilities], axis=0)
