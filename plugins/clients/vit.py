"""Vision Transformer client model from transformers: sized from the config, or a local checkpoint."""

from __future__ import annotations

from typing import Any

from fedmmkt_plugins.clients.torch_classifier import (
    TorchClassifier,
    TorchClassifierConfig,
    hf_classifier_module,
    pretrained_hf_classifier,
)
from pydantic import Field, model_validator

from fedmmkt_core.data import TaskSpec
from fedmmkt_core.lazy import lazy_import
from fedmmkt_core.paths import PretrainedFolder

transformers = lazy_import("transformers", "Install it with: pip install transformers")


class ViTClientConfig(TorchClassifierConfig):
    pretrained: PretrainedFolder | None = Field(
        None,
        description="save_pretrained folder with model.safetensors (no pickle weights); the head is replaced",
    )
    patch_size: int = Field(2, ge=1, description="side of a patch in pixels (must divide the image size)")
    hidden_size: int = Field(32, ge=1)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ViTClientConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


class ViTClient(TorchClassifier):
    """``transformers.ViTForImageClassification``; CE + KD local update from TorchClassifier."""

    Config = ViTClientConfig
    config: ViTClientConfig

    def make_network(self, task: TaskSpec) -> Any:
        cfg = self.config
        if cfg.pretrained is not None:
            return pretrained_hf_classifier(transformers.ViTForImageClassification, cfg.pretrained, task)
        if task.image_size % cfg.patch_size:
            raise ValueError(f"patch_size {cfg.patch_size} does not divide the image size {task.image_size}")
        config = transformers.ViTConfig(
            image_size=task.image_size,
            patch_size=cfg.patch_size,
            num_channels=task.channels,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            num_labels=task.num_classes,
        )
        return hf_classifier_module(
            transformers.ViTForImageClassification(config), task, task.channels, task.image_size
        )
