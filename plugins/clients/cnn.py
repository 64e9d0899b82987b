"""A small convolutional classifier (two conv layers), the workhorse for small images on a CPU."""

from __future__ import annotations

from typing import Any

from fedmmkt_plugins.clients.torch_classifier import TorchClassifier, TorchClassifierConfig, torch
from pydantic import Field

from fedmmkt_core.data import TaskSpec


class CNNConfig(TorchClassifierConfig):
    channels: tuple[int, int] = Field((32, 64), description="output channels of the two conv layers")
    hidden: int = Field(128, ge=1, description="width of the fully connected layer")
    dropout: float = Field(0.25, ge=0, lt=1)


class CNNClient(TorchClassifier):
    """conv3x3-ReLU, conv3x3-ReLU, max-pool, dropout, FC-ReLU, FC."""

    Config = CNNConfig
    config: CNNConfig

    def make_network(self, task: TaskSpec) -> Any:
        nn = torch.nn
        c1, c2 = self.config.channels
        side = task.image_size // 2
        return nn.Sequential(
            nn.Conv2d(task.channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(self.config.dropout),
            nn.Flatten(),
            nn.Linear(c2 * side * side, self.config.hidden),
            nn.ReLU(),
            nn.Linear(self.config.hidden, task.num_classes),
        )
