"""The sd-lora generator class: building its pipeline (pre-training and caching the tiny one), and generating."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fedmmkt_plugins.generators.sd_lora.adapter import LatentCache, LoraAdapterMixin
from fedmmkt_plugins.generators.sd_lora.config import SDLoraConfig
from fedmmkt_plugins.generators.sd_lora.images import to_task_geometry
from fedmmkt_plugins.generators.sd_lora.libraries import peft, quiet_libraries, torch
from fedmmkt_plugins.generators.sd_lora.pipeline import build_tiny_pipeline, load_pipeline, set_attention
from fedmmkt_plugins.generators.sd_lora.pretrain import (
    PRETRAIN_MARKER,
    TINY_VERSION,
    pretrain_tiny,
    pretraining_latents,
)
from fedmmkt_plugins.generators.sd_lora.text import split_words

from fedmmkt_core.cache import build_conditions, seal_folder, usable_folder
from fedmmkt_core.data import ImageSet, TaskSpec
from fedmmkt_core.errors import DataError, UserError
from fedmmkt_core.interfaces import AlignmentBatch, DenoisingStep, Generator, Progress
from fedmmkt_core.seeding import derive_seed

log = logging.getLogger("fedmmkt")


class SDLoraGenerator(LoraAdapterMixin, Generator):
    """A diffusers Stable Diffusion pipeline whose UNet attention is adapted with peft LoRA."""

    Config = SDLoraConfig
    config: SDLoraConfig

    # ------------------------------------------------------------------ building
    def build(
        self,
        task: TaskSpec,
        seed: int,
        cache_dir: Path,
        public: ImageSet | None = None,
        progress: Progress | None = None,
    ) -> None:
        quiet_libraries()
        cfg = self.config
        self.task = task
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        elif cfg.device == "cuda" and not torch.cuda.is_available():
            raise UserError("generator.params.device: cuda, but torch sees no CUDA device here; use auto or cpu")
        else:
            self.device = torch.device(cfg.device)
        self.dtype = getattr(torch, cfg.dtype)
        if self.device.type == "cpu" and cfg.dtype == "float16":
            raise UserError("generator.params.dtype: float16 needs CUDA; use float32 or bfloat16 on a CPU")
        torch.manual_seed(seed)
        if cfg.model is None:
            self.pipe = self._tiny_pipeline(task, seed, Path(cache_dir), public, progress)
        else:
            self.pipe = load_pipeline(cfg.model, self.dtype)
            self.base_path = Path(cfg.model)
        self.latent_kind = cfg.fine_tune_latents
        if self.latent_kind == "auto":
            self.latent_kind = "mean" if cfg.model is None else pretraining_latents(self.base_path)
        pipe = self.pipe
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
            module.eval()
        pipe.to(self.device, self.dtype)
        set_attention(pipe.unet, cfg.attention)
        if cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        lora = cfg.lora
        # LoRA's A matrices are drawn from the global RNG: seed it here, so a freshly pre-trained base
        # and the same base loaded from the cache start from the same adapter.
        torch.manual_seed(derive_seed(seed, "lora"))
        pipe.unet.add_adapter(
            peft.LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                init_lora_weights="gaussian",
                target_modules=list(lora.targets),
            )
        )
        # Mixed precision: the frozen base may be half precision, the trained adapter stays float32.
        for param in self.lora_parameters():
            param.data = param.data.float()
        self.resolution = cfg.resolution or (
            task.image_size if cfg.model is None else int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
        )
        self._embedding_cache: dict[str, Any] = {}
        # (batch, seed, step) of the last denoise call: every loss on a mini-batch shares one UNet pass.
        # The batch itself is kept (not its id), so a new batch can never be mistaken for a freed one.
        self._last_step: tuple[AlignmentBatch, int, DenoisingStep] | None = None
        # During a fine-tuning call with cache_latents: the VAE posterior (mean, std) of every pool image,
        # found by the image's bytes (so a loss's own batch of pool images, e.g. relabelled, hits it too).
        self._posteriors: LatentCache | None = None

    def _tiny_pipeline(
        self, task: TaskSpec, seed: int, cache_dir: Path, public: ImageSet | None, progress: Progress | None
    ) -> Any:
        if public is None or len(public) == 0:
            raise DataError(
                "the tiny sd-lora generator is pre-trained on the dataset's public split, which is empty: "
                "set data.dataset.params.public_fraction > 0 (or give generator.params.model)"
            )
        cfg = self.config
        tiny = cfg.tiny
        multiple = 2 ** (len(tiny.vae_widths) - 1) * 2 ** (len(tiny.unet_channels) - 1)
        if task.image_size % multiple or task.image_size % 8:
            raise DataError(
                f"the tiny sd-lora generator needs an image size divisible by 8 and by {multiple} "
                f"(2^(VAE levels - 1) x 2^(UNet levels - 1)), got {task.image_size}: change "
                "data.dataset.params.image_size or generator.params.tiny"
            )
        captions = public.captions or [task.prompt(int(y)) for y in public.labels]
        conditions = build_conditions(self.device.type)  # pre-training runs on the generator's device
        key = hashlib.sha256()
        key.update(
            json.dumps(
                [TINY_VERSION, seed, cfg.tiny.model_dump(mode="json"), cfg.pretrain.cache_fields()]
                + [list(task.class_names), task.image_size, task.channels, task.caption_template, conditions]
            ).encode()
        )
        key.update(public.images.tobytes())
        key.update(public.labels.tobytes())
        key.update("\n".join(captions).encode())
        directory = cache_dir / "generators" / f"sd-tiny-{key.hexdigest()[:20]}"
        self.base_path = directory
        if usable_folder(directory, "the cached pre-trained generator"):  # its files match their sha256
            log.info("tiny generator: loading the pre-trained pipeline from %s", directory)
            self.cache_hit = True
            return load_pipeline(str(directory), torch.float32)
        self.cache_hit = False
        words = sorted(
            {w for text in [*captions, *(task.prompt(c) for c in range(task.num_classes))] for w in split_words(text)}
        )
        pipe = build_tiny_pipeline(cfg.tiny, task.channels, words, seed)
        pretrain_tiny(pipe, public, captions, cfg.pretrain, seed, progress, self.device)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / PRETRAIN_MARKER).write_text(json.dumps({"latents": "mean", "built_with": conditions}) + "\n")
        seal_folder(staging)  # every file's sha256, checked when the cache is loaded
        try:
            os.replace(staging, directory)
        except OSError:  # another run finished the same pre-training first
            shutil.rmtree(staging, ignore_errors=True)
        log.info("tiny generator: pre-trained and cached in %s", directory)
        # Continue from the saved files, as a rerun that finds the cache will: both runs then hold the same
        # objects (tokenizer, attention implementation, config floats), so they give the same metrics.
        return load_pipeline(str(directory), torch.float32)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        cfg = self.config
        guidance = cfg.guidance_scale if cfg.adapter_guidance_scale is None else cfg.adapter_guidance_scale
        return self._generate(prompts, seeds, guidance)

    def _generate(self, prompts: Sequence[str], seeds: Sequence[int], guidance: float) -> np.ndarray:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        cfg = self.config
        outputs = []
        with self._merged_adapter():
            for start in range(0, len(prompts), cfg.generation_batch_size):
                chunk = slice(start, start + cfg.generation_batch_size)
                outputs.append(self._generate_batch(prompts[chunk], seeds[chunk], guidance))
        if not outputs:
            return np.zeros((0, self.task.image_size, self.task.image_size, self.task.channels), dtype=np.uint8)
        return np.concatenate(outputs)

    def _generate_batch(self, prompts: Sequence[str], seeds: Sequence[int], guidance: float) -> np.ndarray:
        cfg = self.config
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            result = self.pipe(
                list(prompts),
                num_inference_steps=cfg.num_inference_steps,
                guidance_scale=guidance,
                generator=generators,
                height=self.resolution,
                width=self.resolution,
                output_type="pt",
            )
        return self._to_task_images(result.images.float() * 2 - 1)

    @contextlib.contextmanager
    def _merged_adapter(self) -> Iterator[None]:
        """Fold the LoRA update into the base weights while generating.

        The profile of the demo's slowest phase (generation) showed peft's unmerged LoRA layers cost
        ~10 % of it: three matmuls per adapted layer instead of one. The exact base weights are copied
        back afterwards (unmerging alone would leave rounding drift in them, and a resumed run would
        then differ from an uninterrupted one).
        """
        tuner = importlib.import_module("peft.tuners.tuners_utils")
        layers = [m for m in self.pipe.unet.modules() if isinstance(m, tuner.BaseTunerLayer)]
        if not layers or any(layer.disable_adapters or layer.merged for layer in layers):
            yield
            return
        saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
        for layer in layers:
            layer.merge()
        try:
            yield
        finally:
            for layer, weight in zip(layers, saved, strict=True):
                layer.unmerge()
                layer.get_base_layer().weight.data.copy_(weight)

    def generate_base(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        unet = self.pipe.unet
        unet.disable_adapters()
        try:
            return self._generate(prompts, seeds, self.config.guidance_scale)
        finally:
            unet.enable_adapters()

    def _to_task_images(self, images: Any) -> np.ndarray:
        """Float ``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]`` at the task's size and channels."""
        images = to_task_geometry(images, self.task)
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()
