"""The evaluation oracle: a classifier trained on held-out real data of the clients' domain.

No party trains on the oracle split. The oracle labels generated images (classification accuracy
score, CAS) and embeds them for a Fréchet distance to real test images. Trained once per dataset,
seed and config, and cached as safetensors under the cache directory (with its tensors' sha256,
checked at load).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from fedmmkt_plugins.clients.cnn import CNNClient, CNNConfig
from fedmmkt_plugins.clients.torch_classifier import torch

from fedmmkt_core.cache import build_conditions, load_sealed_tensors, save_sealed_tensors
from fedmmkt_core.data import ImageSet, TaskSpec
from fedmmkt_core.errors import DataError

ORACLE_VERSION = 1


def oracle_half(oracle_split: ImageSet, purpose: str) -> ImageSet:
    """The oracle data split in two, class by class (alternate images of each class): the *selection*
    oracle judges every choice made on the validation split, the *report* oracle the published figures,
    so no setting is chosen on the oracle that reports it."""
    if purpose not in ("selection", "report"):
        raise ValueError(f"oracle purpose must be 'selection' or 'report', not {purpose!r}")
    labels = np.asarray(oracle_split.labels)
    keep = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep[members[0 if purpose == "selection" else 1 :: 2]] = True
    return oracle_split.subset(np.flatnonzero(keep))


class EvaluationOracle:
    """A CNN trained on the oracle split; ``cas`` and ``frechet_distance`` for generated images."""

    def __init__(self, oracle_split: ImageSet | None, task: TaskSpec, cache_dir: Path, seed: int, epochs: int = 40):
        if oracle_split is None or len(oracle_split) == 0:
            raise DataError("the evaluation oracle needs an oracle split: set the dataset's oracle_fraction > 0")
        config = CNNConfig(epochs=epochs, lr=0.003, batch_size=32, dropout=0.25)
        self.model = CNNClient(config)
        self.model.build(task, seed=seed)
        key = hashlib.sha256()
        key.update(oracle_split.images.tobytes())
        key.update(oracle_split.labels.tobytes())
        key.update(
            json.dumps(
                [ORACLE_VERSION, seed, config.model_dump(mode="json"), list(task.class_names), build_conditions("cpu")]
            ).encode()
        )
        self.cache_path = Path(cache_dir) / "oracles" / f"oracle-{key.hexdigest()[:20]}.safetensors"
        # The cached weights carry their sha256: an entry changed on disk is trained again (with a warning).
        cached = load_sealed_tensors(self.cache_path, "the cached evaluation oracle")
        self.from_cache = cached is not None
        if cached is not None:
            self.model.set_weights(cached)
        else:
            self.model.fit(oracle_split, None, seed=seed)
            save_sealed_tensors(self.cache_path, self.model.get_weights())

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict_logits(images).argmax(axis=1)

    def accuracy(self, data: ImageSet) -> float:
        return float((self.predict(data.images) == data.labels).mean())

    def cas(self, images: np.ndarray, class_ids: np.ndarray) -> float:
        """Share of generated images the oracle labels as their prompt's class."""
        return float((self.predict(images) == np.asarray(class_ids)).mean())

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate-layer activations (the oracle's feature space)."""
        net = self.model.net
        net.eval()
        with torch.no_grad():
            return net[:-1](self.model._tensor(images)).double().cpu().numpy()

    def frechet_distance(self, images: np.ndarray, reference: np.ndarray) -> float:
        """Fréchet distance between Gaussians fitted to the two image sets' oracle features."""
        return frechet_distance(self.features(images), self.features(reference))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets ``[N, D]``.

    Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), a symmetric PSD matrix, so two
    eigendecompositions give it stably even for singular covariances.
    """
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)
