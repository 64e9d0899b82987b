"""Pre-training of the tiny pipeline on the public split, and the marker that says what it was trained on."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from fedmmkt_plugins.generators.sd_lora.config import PretrainConfig
from fedmmkt_plugins.generators.sd_lora.images import pixels_to_tensor
from fedmmkt_plugins.generators.sd_lora.libraries import torch, transformers

from fedmmkt_core.data import ImageSet
from fedmmkt_core.errors import DataError
from fedmmkt_core.interfaces import Progress

TINY_VERSION = 1  # bump when the tiny pipeline or its pre-training changes, to invalidate caches
# Written beside a pipeline the toolkit pre-trained: what its UNet was trained on, so a fine-tuning of
# that folder (given as ``model``) feeds it the same kind of latents.
PRETRAIN_MARKER = "fedmmkt_pretrain.json"


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


def pretrain_tiny(
    pipe: Any,
    public: ImageSet,
    captions: Sequence[str],
    cfg: PretrainConfig,
    seed: int,
    progress: Progress | None,
    device: Any = "cpu",
) -> None:
    """Train the tiny pipeline on the public split: the VAE first, then UNet and text encoder together.

    Trains on ``device`` in float32 and leaves the pipeline on the CPU. Every random draw comes from one
    CPU generator, so the draws are the same on every device."""
    report = progress or (lambda task, done, total: None)
    g = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    pipe.to(device)
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
        batch = pixels[idx].to(device)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = torch.nn.functional.mse_loss(recon, batch) + 1e-4 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == cfg.vae_steps - 1:
            report("pretrain generator: VAE", step + 1, cfg.vae_steps)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(pixels[i : i + 256].to(device)).latent_dist.mean for i in range(0, n, 256)])
    scaling = float(1.0 / means.std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=scaling)
    latents = means * scaling

    tokenizer = pipe.tokenizer
    text = [*captions, ""]
    ids = tokenizer(
        text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
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
        caption_idx = torch.where(drop, torch.full_like(idx, empty), idx).to(device)
        x0 = latents[idx.to(device)]
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1).to(device)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        states = text_encoder(ids[caption_idx])[0] if train_text else frozen_states[caption_idx]
        prediction = unet(noisy, t.to(device), encoder_hidden_states=states).sample
        if cfg.snr_gamma is None:
            loss = torch.nn.functional.mse_loss(prediction, noise)
        else:
            weight = min_snr_weight(alphas[t], cfg.snr_gamma).to(device)
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
    pipe.to("cpu")


def min_snr_weight(alpha_bar: Any, gamma: float, velocity: bool = False) -> Any:
    """Min-SNR-gamma loss weights (Hang et al., ICCV 2023) for timesteps with cumulative signal ``alpha_bar``:
    min(SNR, gamma) / SNR for a noise-predicting model, min(SNR, gamma) / (SNR + 1) for a velocity one."""
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / (snr + 1 if velocity else snr)
