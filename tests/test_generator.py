"""The sd-lora generator beyond the conformance suite: diffusers interoperability, caches, errors."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fedmmkt_plugins.generators.sd_lora import (
    SDLoraGenerator,
    TinyPipelineConfig,
    build_tiny_pipeline,
)
from fedmmkt_plugins.losses.weighted_denoising import WeightedDenoisingLoss

from fedmmkt_core.errors import DataError, UserError
from fedmmkt_core.testing import tiny_generator_task

TINY = {"pretrain": {"vae_steps": 20, "steps": 30}, "fine_tune_steps": 3, "batch_size": 16, "num_inference_steps": 4}


def cache() -> Path:
    return Path(os.environ["FEDMMKT_CACHE"])


def make(**params) -> SDLoraGenerator:
    return SDLoraGenerator(SDLoraGenerator.Config.model_validate({**TINY, **params}))


def built(**params) -> tuple[SDLoraGenerator, object]:
    public, task = tiny_generator_task()
    generator = make(**params)
    generator.build(task, seed=0, cache_dir=cache(), public=public)
    return generator, task


def trained(generator, task):
    from fedmmkt_core.interfaces import AlignmentBatch

    class_ids = np.repeat(np.arange(task.num_classes), 3)
    prompts = [task.prompt(int(c)) for c in class_ids]
    images = generator.generate(prompts, list(range(len(prompts))))
    soft = np.eye(task.num_classes, dtype=np.float32)[class_ids]
    batch = AlignmentBatch(images, prompts, class_ids, soft, [task.prompt(c) for c in range(task.num_classes)])
    generator.fine_tune(batch, [(WeightedDenoisingLoss(), 1.0)], seed=1)
    return prompts[:6], list(range(200, 206))


def test_saved_lora_loads_into_diffusers_and_gives_the_same_images(tmp_path):
    generator, task = built()
    prompts, seeds = trained(generator, task)
    ours = generator.generate(prompts, seeds)
    generator.save_adapter(tmp_path / "lora.safetensors")

    pipe = StableDiffusionPipeline.from_pretrained(
        generator.base_path, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path, weight_name="lora.safetensors")
    out = pipe(
        prompts,
        num_inference_steps=TINY["num_inference_steps"],
        guidance_scale=generator.config.guidance_scale,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        height=8,
        width=8,
        output_type="pt",
    ).images
    theirs = (((out * 2 - 1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(theirs, ours)


def test_only_lora_weights_are_saved(tmp_path):
    from safetensors.torch import load_file

    generator, _ = built()
    generator.save_adapter(tmp_path / "lora.safetensors")
    keys = load_file(str(tmp_path / "lora.safetensors")).keys()
    assert keys and all(k.startswith("unet.") and ".lora" in k for k in keys)


def test_pretrained_base_is_cached_by_config(tmp_path):
    unique = {"pretrain": {"vae_steps": 20, "steps": 31}}  # a config no other test pre-trains
    first, task = built(**unique)
    assert not first.cache_hit  # other configs' cached bases (the session's) are not reused
    second, _ = built(**unique)
    assert second.cache_hit and second.base_path == first.base_path
    prompts = [task.prompt(c) for c in range(3)]
    np.testing.assert_array_equal(first.generate(prompts, [1, 2, 3]), second.generate(prompts, [1, 2, 3]))


def test_a_base_built_under_other_conditions_is_not_reused(tmp_path, monkeypatch):
    """The thread count changes the pre-trained weights, so it is in the cache key and the marker."""
    import json

    from fedmmkt_plugins.generators.sd_lora import PRETRAIN_MARKER
    from fedmmkt_plugins.generators.sd_lora import generator as module

    monkeypatch.setenv("FEDMMKT_CACHE", str(tmp_path / "own-cache"))
    unique = {"pretrain": {"vae_steps": 3, "steps": 4}}
    first, _ = built(**unique)
    conditions = json.loads((first.base_path / PRETRAIN_MARKER).read_text())["built_with"]
    assert conditions["threads"] == torch.get_num_threads() and conditions["device"] == "cpu"
    monkeypatch.setattr(module, "build_conditions", lambda device: {**conditions, "threads": conditions["threads"] + 1})
    other, _ = built(**unique)
    assert not other.cache_hit and other.base_path != first.base_path


def test_adapter_of_another_rank_is_rejected_with_the_file_name(tmp_path):
    generator, _ = built(lora={"rank": 4})
    generator.save_adapter(tmp_path / "rank4.safetensors")
    other, _ = built()
    with pytest.raises(DataError, match=r"rank4\.safetensors.*shape"):
        other.load_adapter(tmp_path / "rank4.safetensors")
    targets, _ = built(lora={"targets": ["to_q"]})
    with pytest.raises(DataError, match="do not match"):
        targets.load_adapter(tmp_path / "rank4.safetensors")


def test_tiny_generator_needs_a_public_split():
    _, task = tiny_generator_task()
    with pytest.raises(DataError, match="public_fraction"):
        make().build(task, seed=0, cache_dir=cache(), public=None)


def test_local_pipeline_directory_is_used_and_resized_to_the_task(tmp_path):
    public, task = tiny_generator_task()
    words = sorted({w for c in range(task.num_classes) for w in task.prompt(c).split()})
    pipe = build_tiny_pipeline(TinyPipelineConfig(), 1, words, seed=0)
    pipe.save_pretrained(tmp_path / "sd")
    generator = make(model=str(tmp_path / "sd"), resolution=16)
    generator.build(task, seed=0, cache_dir=cache())
    assert generator.resolution == 16
    images = generator.generate([task.prompt(1), task.prompt(2)], [0, 1])
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8


def test_missing_model_directory_and_offline_hub_are_clear_errors(tmp_path):
    _, task = tiny_generator_task()
    with pytest.raises(UserError, match="not a local directory"):
        make(model=str(tmp_path / "nowhere")).build(task, seed=0, cache_dir=cache())
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        make(model="some-org/some-model").build(task, seed=0, cache_dir=cache())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model_index.json"):
        make(model=str(tmp_path / "empty")).build(task, seed=0, cache_dir=cache())


def test_half_precision_on_cpu_is_refused():
    public, task = tiny_generator_task()
    with pytest.raises(UserError, match="float16 needs CUDA"):
        make(dtype="float16", device="cpu").build(task, seed=0, cache_dir=cache(), public=public)


def test_bfloat16_base_keeps_lora_in_float32():
    generator, task = built(dtype="bfloat16")
    assert generator.pipe.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in generator.lora_parameters())
    prompts, seeds = trained(generator, task)
    assert generator.generate(prompts, seeds).dtype == np.uint8


def test_fresh_and_cached_base_start_from_the_same_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMMKT_CACHE", str(tmp_path / "own-cache"))
    fresh, _ = built(pretrain={"vae_steps": 5, "steps": 7})
    cached, _ = built(pretrain={"vae_steps": 5, "steps": 7})
    assert not fresh.cache_hit and cached.cache_hit
    for key, value in fresh.adapter_state().items():
        assert torch.equal(value, cached.adapter_state()[key]), key


def test_fresh_and_cached_base_train_and_generate_the_same(tmp_path, monkeypatch):
    """A run that pre-trains the base and a rerun that loads it from the cache give the same metrics:
    same generated pixels, same LoRA weights after fine-tuning, bit for bit."""
    monkeypatch.setenv("FEDMMKT_CACHE", str(tmp_path / "own-cache"))
    fresh, task = built(pretrain={"vae_steps": 6, "steps": 9})
    cached, _ = built(pretrain={"vae_steps": 6, "steps": 9})
    assert not fresh.cache_hit and cached.cache_hit
    prompts, seeds = [task.prompt(c) for c in range(4)], [3, 4, 5, 6]
    np.testing.assert_array_equal(fresh.generate(prompts, seeds), cached.generate(prompts, seeds))
    after_fresh, after_cached = trained(fresh, task), trained(cached, task)
    assert after_fresh == after_cached
    for key, value in fresh.adapter_state().items():
        assert torch.equal(value, cached.adapter_state()[key]), key
    np.testing.assert_array_equal(fresh.generate(*after_fresh), cached.generate(*after_cached))


def test_base_generation_ignores_the_adapter():
    generator, task = built()
    prompts, seeds = [task.prompt(c) for c in range(4)], [7, 8, 9, 10]
    np.testing.assert_array_equal(generator.generate_base(prompts, seeds), generator.generate(prompts, seeds))
    base = generator.generate_base(prompts, seeds)
    trained(generator, task)
    np.testing.assert_array_equal(generator.generate_base(prompts, seeds), base)
    assert not np.array_equal(generator.generate(prompts, seeds), base)


def test_adapter_guidance_scale_applies_to_the_adapted_images_only(monkeypatch):
    generator, task = built(adapter_guidance_scale=1.5)
    scales = []
    original = type(generator.pipe).__call__

    def recording(pipe, *args, **kwargs):
        scales.append(kwargs["guidance_scale"])
        return original(pipe, *args, **kwargs)

    monkeypatch.setattr(type(generator.pipe), "__call__", recording)
    prompts, seeds = [task.prompt(c) for c in range(4)], [7, 8, 9, 10]
    adapted, base = generator.generate(prompts, seeds), generator.generate_base(prompts, seeds)
    assert scales == [1.5, 3.0]
    assert not np.array_equal(adapted, base)  # an untrained adapter: only the guidance differs
    generator.config.adapter_guidance_scale = None
    np.testing.assert_array_equal(generator.generate(prompts, seeds), base)


def test_packaged_minilm_text_encoder_conditions_the_tiny_pipeline():
    generator, task = built(tiny={"text_encoder": "minilm", "max_prompt_tokens": 12})
    pipe = generator.pipe
    assert type(pipe.text_encoder).__name__ == "BertModel"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 384
    images = generator.generate([task.prompt(1), task.prompt(2)], [0, 1])
    assert images.shape == (2, 8, 8, 1)
    again, _ = built(tiny={"text_encoder": "minilm", "max_prompt_tokens": 12})
    assert again.cache_hit
    np.testing.assert_array_equal(again.generate([task.prompt(1), task.prompt(2)], [0, 1]), images)


def test_generation_merges_the_adapter_and_restores_the_exact_base_weights():
    from peft.tuners.tuners_utils import BaseTunerLayer

    generator, task = built()
    prompts, seeds = trained(generator, task)
    layers = [m for m in generator.pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    merged = generator.generate(prompts, seeds)
    for layer, weight in zip(layers, before, strict=True):
        assert not layer.merged
        assert torch.equal(layer.get_base_layer().weight, weight)
    with torch.no_grad():  # the unmerged path, as peft computes it
        unmerged = np.concatenate([generator._generate_batch(prompts, seeds, generator.config.guidance_scale)])
    assert np.abs(merged.astype(int) - unmerged).max() <= 1  # float rounding only
    assert (merged == unmerged).mean() > 0.99


# ---------------------------------------------------------------- GPU-minded options (issue 16)


def alignment_pool(task, public, count=24):
    """Public digits as an alignment batch; every third one is confidently seen as another class."""
    from fedmmkt_core.interfaces import AlignmentBatch

    class_ids = public.labels[:count].astype(np.int64)
    seen = class_ids.copy()
    seen[::3] = (seen[::3] + 1) % task.num_classes
    soft = np.eye(task.num_classes, dtype=np.float32)[seen]
    prompts = [task.prompt(int(c)) for c in class_ids]
    return AlignmentBatch(
        public.images[:count], prompts, class_ids, soft, [task.prompt(c) for c in range(task.num_classes)]
    )


def test_latent_cache_gives_bitwise_identical_lora_weights_with_fewer_vae_encodes(tmp_path):
    from fedmmkt_plugins.losses.relabel_denoising import RelabelDenoisingLoss

    public, task = tiny_generator_task()
    batch = alignment_pool(task, public)
    generator = make(fine_tune_steps=4, fine_tune_epochs=None, batch_size=8)
    generator.build(task, seed=0, cache_dir=cache(), public=public)
    generator.save_adapter(tmp_path / "start.safetensors")
    encode = generator.pipe.vae.encode
    states, encodes = {}, {}
    for cache_latents in (True, False):  # the same generator, from the same adapter: only the option differs
        generator.config.cache_latents = cache_latents
        generator.load_adapter(tmp_path / "start.safetensors")
        calls = []
        generator.pipe.vae.encode = lambda x, *a, calls=calls, **k: calls.append(len(x)) or encode(x, *a, **k)
        threshold = WeightedDenoisingLoss.Config(threshold=0.0)
        generator.fine_tune(batch, [(WeightedDenoisingLoss(threshold), 1.0), (RelabelDenoisingLoss(), 0.5)], seed=3)
        states[cache_latents], encodes[cache_latents] = generator.adapter_state(), calls
    assert states[True].keys() == states[False].keys()
    assert all(torch.equal(states[True][k], states[False][k]) for k in states[True])
    assert sum(encodes[True]) == len(batch) and sum(encodes[False]) > len(batch)


def test_new_options_have_todays_defaults_and_are_validated():
    from fedmmkt_plugins.losses.ensemble_ce import EnsembleCELoss
    from pydantic import ValidationError

    cfg = SDLoraGenerator.Config()
    assert (cfg.cache_latents, cfg.gradient_checkpointing, cfg.attention) == (True, False, "default")
    assert EnsembleCELoss.Config().decode_resolution is None
    with pytest.raises(ValidationError):
        SDLoraGenerator.Config(attention="flash")
    with pytest.raises(ValidationError):
        EnsembleCELoss.Config(decode_resolution=4)


def test_checkpointing_and_sliced_attention_train_the_same_adapter():
    public, task = tiny_generator_task()
    batch = alignment_pool(task, public)
    states = []
    for params in ({}, {"gradient_checkpointing": True, "attention": "sliced"}, {"attention": "sdpa"}):
        generator = make(fine_tune_steps=2, fine_tune_epochs=None, batch_size=8, **params)
        generator.build(task, seed=0, cache_dir=cache(), public=public)
        before = {k: v.clone() for k, v in generator.adapter_state().items()}
        generator.fine_tune(batch, [(WeightedDenoisingLoss(WeightedDenoisingLoss.Config(threshold=0.0)), 1.0)], seed=3)
        states.append(generator.adapter_state())
        assert any(not torch.equal(before[k], states[-1][k]) for k in before)  # gradients reached the LoRA
    for other in states[1:]:
        for key, value in states[0].items():
            torch.testing.assert_close(other[key], value, rtol=1e-4, atol=1e-5)


def test_ensemble_ce_decodes_at_its_configured_resolution():
    from fedmmkt_plugins.losses.ensemble_ce import EnsembleCELoss

    generator, task = built()
    public, _ = tiny_generator_task()
    batch = alignment_pool(task, public, count=4)
    sizes = []
    decode = generator.pipe.vae.decode
    generator.pipe.vae.decode = lambda z, *a, **k: sizes.append(tuple(z.shape[-2:])) or decode(z, *a, **k)
    seen = []

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, images):
            seen.append(tuple(images.shape))
            return self.scale * images.flatten(1)[:, : task.num_classes]

    for resolution, latent in ((None, generator.resolution), (4, 4)):
        loss = EnsembleCELoss(EnsembleCELoss.Config(decode_resolution=resolution and 8))
        loss.config.decode_resolution = resolution  # below the recipe minimum, to see it on the tiny VAE
        loss.student = type("S", (), {"net": Student()})()
        assert loss.compute(generator, batch, seed=len(sizes)).isfinite()
        assert sizes[-1] == (latent, latent)
        assert seen[-1] == (4, task.channels, task.image_size, task.image_size)


def test_pretraining_options_change_the_base_and_its_cache_key(tmp_path, monkeypatch):
    from fedmmkt_plugins.generators.sd_lora import PretrainConfig

    # options added later stay out of the cache key at their defaults, so earlier caches stay valid
    assert set(PretrainConfig().cache_fields()) == {"vae_steps", "steps", "batch_size", "lr", "caption_dropout"}
    assert PretrainConfig(snr_gamma=5).cache_fields()["snr_gamma"] == 5.0
    monkeypatch.setenv("FEDMMKT_CACHE", str(tmp_path / "own-cache"))
    plain, task = built(pretrain={"vae_steps": 4, "steps": 6})
    fast, _ = built(pretrain={"vae_steps": 4, "steps": 6, "lr_schedule": "cosine", "warmup_steps": 2, "snr_gamma": 5})
    assert not plain.cache_hit and not fast.cache_hit and plain.base_path != fast.base_path
    unet_plain, unet_fast = plain.pipe.unet.state_dict(), fast.pipe.unet.state_dict()
    assert any(not torch.equal(unet_plain[k], unet_fast[k]) for k in unet_plain if "lora_" not in k)


def test_fine_tune_snr_gamma_scales_each_samples_loss_by_min_snr_over_snr():
    public, task = tiny_generator_task()
    batch = alignment_pool(task, public, count=8)
    generator, _ = built()
    plain = generator.denoise(batch, seed=5)
    generator.config.fine_tune_snr_gamma = 2.0
    weighted = generator.denoise(batch.subset(np.arange(len(batch))), seed=5)  # another batch object: no reuse
    snr = plain.signal_weight / (1 - plain.signal_weight)
    expected = plain.per_sample_loss * snr.clamp(max=2.0) / snr
    torch.testing.assert_close(weighted.per_sample_loss, expected)
    assert (snr > 2.0).any() and not torch.equal(weighted.per_sample_loss, plain.per_sample_loss)
    assert SDLoraGenerator.Config().fine_tune_snr_gamma is None


def _clean_latents_seen_by_the_unet(generator, task) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latents one denoising step feeds the scheduler, and the images' VAE posterior mean (scaled)."""
    from fedmmkt_core.interfaces import AlignmentBatch

    class_ids = np.arange(task.num_classes)
    prompts = [task.prompt(int(c)) for c in class_ids]
    images = generator.generate(prompts, list(range(len(prompts))))
    batch = AlignmentBatch(images, prompts, class_ids, np.eye(task.num_classes, dtype=np.float32), prompts)
    seen = []
    add_noise = generator.pipe.scheduler.add_noise
    generator.pipe.scheduler.add_noise = lambda latents, *rest: seen.append(latents) or add_noise(latents, *rest)
    generator.denoise(batch, seed=5)
    generator.pipe.scheduler.add_noise = add_noise
    with torch.no_grad():
        mean = generator.pipe.vae.encode(generator._pixels(images)).latent_dist.mean
    return seen[0], mean * generator.pipe.vae.config.scaling_factor


def test_fine_tuning_feeds_the_tiny_unet_the_posterior_means_it_was_pre_trained_on():
    """The tiny base was pre-trained on VAE posterior means; fine-tuning on posterior samples would feed
    it latents whose posterior noise outweighs the signal (the collapse docs/design.md describes)."""
    generator, task = built()
    assert generator.latent_kind == "mean"
    latents, mean = _clean_latents_seen_by_the_unet(generator, task)
    torch.testing.assert_close(latents, mean)

    sampled, _ = built(fine_tune_latents="sample")
    latents, mean = _clean_latents_seen_by_the_unet(sampled, task)
    assert (latents - mean).abs().mean() > 1e-3  # mean + std·ε: a draw, not the mean


def test_a_saved_pipeline_folder_says_which_latents_it_was_pre_trained_on(tmp_path):
    from fedmmkt_plugins.generators.sd_lora import PRETRAIN_MARKER, pretraining_latents

    generator, task = built()
    assert (generator.base_path / PRETRAIN_MARKER).is_file()  # the toolkit's own pre-training marks its folder
    assert pretraining_latents(generator.base_path) == "mean"
    external = tmp_path / "external"
    shutil.copytree(generator.base_path, external)
    (external / PRETRAIN_MARKER).unlink()  # a diffusers folder as another tool saved it
    assert pretraining_latents(external) == "sample"  # what diffusers' Stable Diffusion scripts train on
    loaded = make(model=str(external))
    loaded.build(task, seed=0, cache_dir=cache())
    assert loaded.latent_kind == "sample"
    (external / PRETRAIN_MARKER).write_text('{"latents": "mean"}')
    assert pretraining_latents(external) == "mean"
    (external / PRETRAIN_MARKER).write_text('{"latents": "noise"}')
    with pytest.raises(DataError, match=PRETRAIN_MARKER):
        pretraining_latents(external)


def test_a_multi_level_vae_gives_smaller_latents_and_images_at_the_task_size():
    """vae_channels with three widths: 32x32 images denoised as 8x8 latents (the 28x28 recipes' sizing)."""
    import dataclasses

    from fedmmkt_core.data import ImageSet

    small, task = tiny_generator_task(count=60)
    big = ImageSet(small.images.repeat(4, axis=1).repeat(4, axis=2), small.labels, small.captions)
    task = dataclasses.replace(task, image_size=32)
    generator = make(tiny={"vae_channels": [8, 16, 16]}, pretrain={"vae_steps": 2, "steps": 2})
    generator.build(task, seed=0, cache_dir=cache(), public=big)
    assert generator.pipe.vae_scale_factor == 4
    latents = generator.pipe.vae.encode(generator._pixels(big.images[:2])).latent_dist.mean
    assert tuple(latents.shape) == (2, 4, 8, 8)
    images = generator.generate([task.prompt(0), task.prompt(1)], [0, 1])
    assert images.shape == (2, 32, 32, 1) and images.dtype == np.uint8
    with pytest.raises(DataError, match="divisible by 8 and by 16"):
        make(tiny={"vae_channels": [8, 16, 16, 16]}).build(
            dataclasses.replace(task, image_size=24), seed=0, cache_dir=cache(), public=big
        )
    with pytest.raises(ValueError, match="at least 8"):
        TinyPipelineConfig(vae_channels=(8, 4))


def test_a_step_with_a_non_finite_loss_is_skipped_and_counted(caplog):
    """A half-precision overflow (here: a loss that is inf on the first step) must not reach the LoRA."""
    public, task = tiny_generator_task()
    batch = alignment_pool(task, public)
    generator = make(fine_tune_steps=3, fine_tune_epochs=None, batch_size=8)
    generator.build(task, seed=0, cache_dir=cache(), public=public)
    inner = WeightedDenoisingLoss(WeightedDenoisingLoss.Config(threshold=0.0))
    calls = []

    class OverflowOnce(WeightedDenoisingLoss):
        registered_name = "weighted-denoising"

        def compute(self, generator, batch, seed):
            value = inner.compute(generator, batch, seed)
            calls.append(seed)
            return value * float("inf") if len(calls) == 1 else value

    before = {k: v.clone() for k, v in generator.adapter_state().items()}
    with caplog.at_level("WARNING", logger="fedmmkt"):
        metrics = generator.fine_tune(batch, [(OverflowOnce(inner.config), 1.0)], seed=3)
    assert len(calls) == 3
    assert metrics["generator_steps"] == 2.0 and metrics["generator_skipped_steps"] == 1.0
    assert np.isfinite(metrics["loss_weighted-denoising"])
    after = generator.adapter_state()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the two finite steps trained
    assert "1 of 3 steps skipped" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_cuda_device_is_a_clear_error():
    public, task = tiny_generator_task()
    with pytest.raises(UserError, match=r"generator.params.device: cuda, but torch sees no CUDA device"):
        make(device="cuda").build(task, seed=0, cache_dir=cache(), public=public)
