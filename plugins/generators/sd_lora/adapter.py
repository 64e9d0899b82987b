"""Training and saving the LoRA adapter: denoising steps, fine-tuning, cached latents, adapter files."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fedmmkt_plugins.generators.sd_lora.images import match_channels, pixels_to_tensor, to_task_geometry
from fedmmkt_plugins.generators.sd_lora.libraries import diffusers, peft, torch
from fedmmkt_plugins.generators.sd_lora.pretrain import min_snr_weight

from fedmmkt_core.errors import DataError
from fedmmkt_core.interfaces import AlignmentBatch, AlignmentLoss, DenoisingStep
from fedmmkt_core.seeding import derive_seed

log = logging.getLogger("fedmmkt")


class LoraAdapterMixin:
    """The LoRA side of :class:`~fedmmkt_plugins.generators.sd_lora.generator.SDLoraGenerator`: it uses the
    attributes ``build`` sets (``config``, ``task``, ``pipe``, ``device``, ``dtype``, ``resolution``,
    ``latent_kind`` and the caches)."""

    def lora_parameters(self) -> list[Any]:
        return [p for name, p in self.pipe.unet.named_parameters() if "lora_" in name]

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
        done = skipped = 0
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
                total, values = None, {}
                for loss, weight in active_losses:
                    value = loss.compute(self, mini, step_seed)
                    if value is None:
                        continue
                    values[f"loss_{loss.registered_name or type(loss).__name__}"] = float(value.detach())
                    total = weight * value if total is None else total + weight * value
                if total is None:
                    continue
                optimizer.zero_grad(set_to_none=True)
                finite = all(math.isfinite(v) for v in values.values())  # read above: no second device sync
                if finite:
                    total.backward()
                    finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
                if not finite:  # a half-precision overflow: skip the step, as a gradient scaler would
                    skipped += 1
                    continue
                for name, value in values.items():
                    totals[name] = totals.get(name, 0.0) + value
                optimizer.step()
                done += 1
        finally:
            self.pipe.unet.eval()
            self._last_step = None
            self._posteriors = None
        metrics = {k: v / max(done, 1) for k, v in totals.items()}
        metrics.update({"generator_steps": float(done), "generator_pool": float(len(pool))})
        if skipped:
            log.warning("generator fine-tuning: %d of %d steps skipped (a non-finite loss or gradient)", skipped, steps)
            metrics["generator_skipped_steps"] = float(skipped)
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
