"""Getting a Stable Diffusion pipeline: loading a diffusers folder (or hub id), building the tiny one from
configs, and choosing the UNet's attention implementation."""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmmkt_plugins.generators.sd_lora.config import TinyPipelineConfig
from fedmmkt_plugins.generators.sd_lora.libraries import diffusers, torch
from fedmmkt_plugins.generators.sd_lora.text import build_word_encoder, load_minilm

from fedmmkt_core.errors import UserError


def set_attention(unet: Any, mode: str) -> None:
    """Choose the UNet's attention implementation (see ``SDLoraConfig.attention``)."""
    if mode == "sdpa":
        unet.set_attn_processor(importlib.import_module("diffusers.models.attention_processor").AttnProcessor2_0())
    elif mode == "sliced":
        unet.set_attention_slice("auto")


def load_pipeline(model: str, dtype: Any) -> Any:
    """A diffusers Stable Diffusion pipeline from a local directory (or a hub id when online)."""
    local = Path(model).expanduser()
    if not local.is_dir():
        if os.environ.get("HF_HUB_OFFLINE") == "1" or model.startswith((".", "/", "~")):
            raise UserError(
                f"generator.params.model: '{model}' is not a local directory"
                + (
                    " and the model hub is offline (HF_HUB_OFFLINE=1)"
                    if os.environ.get("HF_HUB_OFFLINE") == "1"
                    else ""
                )
            )
    elif not (local / "model_index.json").exists():
        raise UserError(f"generator.params.model: {local} has no model_index.json (not a diffusers pipeline folder)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)  # renamed in 0.36
            return diffusers.StableDiffusionPipeline.from_pretrained(
                str(local) if local.is_dir() else model,
                torch_dtype=dtype,
                safety_checker=None,
                requires_safety_checker=False,
            )
    except (OSError, ValueError) as exc:
        raise UserError(f"generator.params.model: could not load '{model}': {exc}") from None


def build_tiny_pipeline(cfg: TinyPipelineConfig, channels: int, words: Sequence[str], seed: int) -> Any:
    """A real ``StableDiffusionPipeline`` with tiny, freshly initialised components."""
    torch.manual_seed(seed)
    if cfg.text_encoder == "minilm":
        tokenizer, text_encoder = load_minilm(cfg.max_prompt_tokens)
    else:
        tokenizer, text_encoder = build_word_encoder(cfg, words)
    levels = len(cfg.unet_channels)
    groups = min(8, *cfg.unet_channels)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=int(text_encoder.config.hidden_size),
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=groups,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=cfg.vae_widths,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_widths),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_widths),
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(8, *cfg.vae_widths),
        sample_size=8,
    )
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
