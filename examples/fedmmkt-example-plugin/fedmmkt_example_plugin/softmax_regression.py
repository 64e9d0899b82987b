"""Multinomial logistic regression in plain numpy: a client model with no deep-learning framework."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import Field

from fedmmkt_core.data import DistillSet, ImageSet, TaskSpec
from fedmmkt_core.interfaces import ClientModel, ComponentConfig


class SoftmaxRegressionConfig(ComponentConfig):
    epochs: int = Field(5, ge=1)
    lr: float = Field(0.5, gt=0)
    batch_size: int = Field(32, ge=1)
    l2: float = Field(1e-4, ge=0)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class SoftmaxRegressionClient(ClientModel):
    """Linear classifier on pixels scaled to [0, 1], trained by mini-batch gradient descent."""

    Config = SoftmaxRegressionConfig
    config: SoftmaxRegressionConfig

    def build(self, task: TaskSpec, seed: int) -> None:
        self.task = task
        features = task.image_size * task.image_size * task.channels
        rng = np.random.default_rng(seed)
        self.weight = (rng.normal(size=(features, task.num_classes)) * 0.01).astype(np.float32)
        self.bias = np.zeros(task.num_classes, dtype=np.float32)

    def _features(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float32) / 255.0

    def fit(self, train: ImageSet, distill: DistillSet | None, seed: int) -> dict[str, float]:
        x = self._features(train.images)
        targets = np.eye(self.task.num_classes, dtype=np.float32)[train.labels]
        weights = np.ones(len(x), dtype=np.float32)
        if distill is not None and distill.weight > 0:
            x = np.concatenate([x, self._features(distill.images)])
            targets = np.concatenate([targets, distill.soft_labels.astype(np.float32)])
            weights = np.concatenate([weights, np.full(len(distill.images), distill.weight, dtype=np.float32)])
        rng = np.random.default_rng(seed)
        cfg = self.config
        losses = []
        for _ in range(cfg.epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(x), cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                probs = _softmax(x[idx] @ self.weight + self.bias)
                w = weights[idx, None]
                losses.append(float(-(w * targets[idx] * np.log(probs + 1e-9)).sum() / w.sum()))
                grad = w * (probs - targets[idx]) / w.sum()
                self.weight -= cfg.lr * (x[idx].T @ grad + cfg.l2 * self.weight)
                self.bias -= cfg.lr * grad.sum(axis=0)
        return {"loss": float(np.mean(losses[-max(1, len(losses) // cfg.epochs) :])), "first_loss": losses[0]}

    def predict_logits(self, images: np.ndarray) -> np.ndarray:
        return (self._features(images) @ self.weight + self.bias).astype(np.float32)

    def get_weights(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight.copy(), "bias": self.bias.copy()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        if set(weights) != {"weight", "bias"}:
            raise ValueError(f"expected weights 'weight' and 'bias', got {sorted(weights)}")
        if weights["weight"].shape != self.weight.shape or weights["bias"].shape != self.bias.shape:
            raise ValueError("weight shapes do not match this model")
        self.weight = np.array(weights["weight"], dtype=np.float32)
        self.bias = np.array(weights["bias"], dtype=np.float32)
