"""ResNet client model from transformers: sized from the config, or a local pre-trained checkpoint."""

from __future__ import annotations

from typing import Any, Literal

from fedmmkt_plugins.clients.torch_classifier import (
    TorchClassifier,
    TorchClassifierConfig,
    hf_classifier_module,
    pretrained_hf_classifier,
)
from pydantic import Field

from fedmmkt_core.data import TaskSpec
from fedmmkt_core.lazy import lazy_import
from fedmmkt_core.paths import PretrainedFolder

transformers = lazy_import("transformers", "Install it with: pip install transformers")


class ResNetClientConfig(TorchClassifierConfig):
    pretrained: PretrainedFolder | None = Field(
        None,
        description="save_pretrained folder with model.safetensors (no pickle weights); the head is replaced",
    )
    embedding_size: int = Field(16, ge=1, description="stem width (ignored with pretrained)")
    hidden_sizes: list[int] = Field([16, 32], min_length=1, description="widths of the stages")
    depths: list[int] = Field([1, 1], min_length=1, description="blocks per stage")
    layer_type: Literal["basic", "bottleneck"] = "basic"


class ResNetClient(TorchClassifier):
    """``transformers.ResNetForImageClassification``; CE + KD local update from TorchClassifier."""

    Config = ResNetClientConfig
    config: ResNetClientConfig

    def make_network(self, task: TaskSpec) -> Any:
        cfg = self.config
        if cfg.pretrained is not None:
            return pretrained_hf_classifier(transformers.ResNetForImageClassification, cfg.pretrained, task)
        if len(cfg.hidden_sizes) != len(cfg.depths):
            raise ValueError("hidden_sizes and depths must have the same length")
        config = transformers.ResNetConfig(
            num_channels=task.channels,
            embedding_size=cfg.embedding_size,
            hidden_sizes=cfg.hidden_sizes,
            depths=cfg.depths,
            layer_type=cfg.layer_type,
            downsample_in_first_stage=False,
            num_labels=task.num_classes,
        )
        model = transformers.ResNetForImageClassification(config)
        return hf_classifier_module(model, task, task.channels, task.image_size)
