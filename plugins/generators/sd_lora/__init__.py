"""Stable Diffusion with a LoRA adapter on the UNet's attention projections (diffusers + peft).

Two ways to get the base pipeline:

* ``model``: a local diffusers Stable Diffusion directory (or a hub id when a hub is reachable);
* no ``model``: a *tiny* Stable Diffusion built offline from configs (word-level tokenizer, small CLIP
  text encoder, a VAE without down-sampling, a UNet with cross-attention at every level), pre-trained
  by the toolkit on the dataset's public split and cached by a hash of everything that shapes it.

Only the LoRA weights are ever trained after pre-training, and only they are saved (safetensors in
diffusers' format, so ``pipeline.load_lora_weights`` reads them).
"""

from fedmmkt_plugins.generators.sd_lora.config import PretrainConfig, SDLoraConfig, TinyPipelineConfig
from fedmmkt_plugins.generators.sd_lora.generator import SDLoraGenerator
from fedmmkt_plugins.generators.sd_lora.libraries import quiet_libraries
from fedmmkt_plugins.generators.sd_lora.pipeline import build_tiny_pipeline
from fedmmkt_plugins.generators.sd_lora.pretrain import PRETRAIN_MARKER, pretraining_latents
from fedmmkt_plugins.generators.sd_lora.text import build_word_tokenizer, split_words

__all__ = [
    "PRETRAIN_MARKER",
    "PretrainConfig",
    "SDLoraConfig",
    "SDLoraGenerator",
    "TinyPipelineConfig",
    "build_tiny_pipeline",
    "build_word_tokenizer",
    "pretraining_latents",
    "quiet_libraries",
    "split_words",
]
