"""The ``sd-lora`` generator on a Stable-Diffusion-shaped pipeline, against bare diffusers + peft.

    python -m benchmarks sd-shaped [--shape small|sd15] [--repeats 3] [--dtypes float32,bfloat16] [--threads N]

Builds a pipeline offline with random weights (``sd15``: Stable Diffusion 1.5's UNet, VAE and a 12-layer
CLIP text encoder; ``small``: the same structure, narrow, for CPUs), saves it as a diffusers folder and
loads it through the toolkit (``generator.params.model``) and through ``StableDiffusionPipeline``. Then,
per dtype the device allows, alternating toolkit and bare repeats:

* generation images/s: ``generate`` against ``pipe(prompts, ..., output_type="np")`` (the toolkit folds
  its LoRA into the weights while generating, so the bare pipeline runs without one);
* LoRA fine-tuning steps/s, per alignment loss: ``fine_tune`` against a hand-written peft loop
  (``vae.encode`` -> noise -> UNet -> MSE; for ``ensemble-ce`` also x̂₀ -> ``vae.decode`` -> student
  cross-entropy), same batch size, rank and steps; the student is distilled once, before timing;
* peak memory of each phase: GPU memory allocated on CUDA, resident memory on a CPU (sampled);
* before vs after: the toolkit's fine-tuning with ``cache_latents`` off (every step re-encodes its
  images, as before) and on.

``sd15`` runs on CUDA only. Writes ``benchmarks/results/sd-shaped-<cpu|cuda>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .common import RESULTS, alternating_seconds, atomic_write_json, machine, set_threads, spread

LOSSES = ("weighted-denoising", "ensemble-ce")
PROMPTS = ["a photo of the digit zero", "a photo of the digit one", "a photo of the digit two"]

# shape: pipeline sizes and the work each phase does
SHAPES: dict[str, dict[str, Any]] = {
    "small": {
        "unet": {"block_out_channels": (32, 64), "layers_per_block": 1, "attention_head_dim": 8, "sample_size": 16},
        "vae": {"block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 32},
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "max_tokens": 16,
        "images": 8,
        "inference_steps": 8,
        "batch_size": 8,
        "pool": 32,
        "steps": 12,
    },
    "sd15": {
        "unet": {
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "sample_size": 64,
        },  # fmt: skip
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 512},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        "max_tokens": 77,
        "images": 4,
        "inference_steps": 20,
        "batch_size": 4,
        "pool": 16,
        "steps": 10,
    },
}


def build_pipeline(shape: dict[str, Any], seed: int = 0) -> Any:
    """A ``StableDiffusionPipeline`` of Stable Diffusion 1.5's structure with random weights."""
    import diffusers
    import torch
    import transformers
    from fedmmkt_plugins.generators.sd_lora import build_word_tokenizer, split_words

    torch.manual_seed(seed)
    words = sorted({w for p in PROMPTS for w in split_words(p)})
    tokenizer = build_word_tokenizer(words, shape["max_tokens"])
    text = shape["text"]
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=shape["max_tokens"], hidden_act="quick_gelu",
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **text,
        )
    )  # fmt: skip
    levels = len(shape["unet"]["block_out_channels"])
    unet = diffusers.UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=text["hidden_size"],
        norm_num_groups=min(32, *shape["unet"]["block_out_channels"]),
        **shape["unet"],
    )
    vae_levels = len(shape["vae"]["block_out_channels"])
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        latent_channels=4,
        norm_num_groups=min(32, *shape["vae"]["block_out_channels"]),
        scaling_factor=0.18215,
        **shape["vae"],
    )
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


class PeakMemory:
    """Peak memory while a block runs: GPU memory allocated on CUDA, resident set size on a CPU
    (``/proc/self/statm`` sampled every 2 ms; ``getrusage`` where there is no ``/proc``)."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            self.peak = max(self.peak, int(torch.cuda.max_memory_allocated()))
            return
        statm = Path("/proc/self/statm")
        if not statm.exists():
            yield
            self.peak = max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            return
        page = resource.getpagesize()
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                self.peak = max(self.peak, int(statm.read_text().split()[1]) * page)
                done.wait(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def toolkit_generator(folder: Path, task: Any, dtype: str, device: str, shape: dict[str, Any], **params: Any) -> Any:
    from fedmmkt_plugins.generators.sd_lora import SDLoraGenerator

    config = {
        "model": str(folder), "dtype": dtype, "device": device, "num_inference_steps": shape["inference_steps"],
        "generation_batch_size": shape["images"], "fine_tune_steps": shape["steps"], "fine_tune_epochs": None,
        "batch_size": shape["batch_size"], **params,
    }  # fmt: skip
    generator = SDLoraGenerator(SDLoraGenerator.Config.model_validate(config))
    generator.build(task, seed=0, cache_dir=folder.parent / "cache")
    return generator


def bare_pipeline(folder: Path, dtype: Any, device: str) -> Any:
    import diffusers

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)  # as the toolkit
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            str(folder), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipe.to(device)


def bare_fine_tune(pipe: Any, student: Any, loss: str, images: np.ndarray, prompts: list[str], shape: dict[str, Any],
                   lora: Any, seed: int = 0) -> Callable[[], None]:  # fmt: skip
    """A hand-written peft LoRA loop: what a user would write with diffusers and peft alone."""
    import torch

    device, dtype = pipe.unet.device, pipe.unet.dtype
    params = [p for name, p in pipe.unet.named_parameters() if "lora_" in name]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)  # fmt: skip
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
    targets = torch.arange(len(images), device=device) % 3
    alphas = pipe.scheduler.alphas_cumprod.to(device)
    scaling = pipe.vae.config.scaling_factor
    g = torch.Generator().manual_seed(seed)

    def run() -> None:
        pipe.unet.train()
        for _ in range(shape["steps"]):
            idx = torch.randperm(len(images), generator=g)[: shape["batch_size"]]
            with torch.no_grad():
                latents = pipe.vae.encode(pixels[idx].to(device, dtype)).latent_dist.sample() * scaling
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (len(idx),), device=device)
            noisy = pipe.scheduler.add_noise(latents, noise, t)
            prediction = pipe.unet(noisy, t, encoder_hidden_states=states[idx.to(device)]).sample.float()
            if loss == "weighted-denoising":
                total = torch.nn.functional.mse_loss(prediction, noise.float())
            else:
                a = alphas[t].float().view(-1, 1, 1, 1)
                x0 = (noisy.float() - (1 - a).sqrt() * prediction) / a.sqrt()
                decoded = pipe.vae.decode((x0 / scaling).to(dtype)).sample.float().clamp(-1, 1)
                ce = torch.nn.functional.cross_entropy(student(decoded), targets[idx.to(device)], reduction="none")
                total = (a.view(-1) * ce).sum() / a.sum()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        pipe.unet.eval()

    return run


def alignment_batch(count: int, size: int, seed: int = 0) -> Any:
    from fedmmkt_core.interfaces import AlignmentBatch

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    class_ids = np.arange(count) % 3
    soft = np.eye(3, dtype=np.float32)[class_ids]
    return AlignmentBatch(images, [PROMPTS[c] for c in class_ids], class_ids, soft, list(PROMPTS))


def prepared_loss(name: str, batch: Any, task: Any) -> Any:
    """The registered loss, prepared once (the ensemble-ce student distilled) and then kept as is."""
    from fedmmkt_plugins.losses.ensemble_ce import EnsembleCELoss
    from fedmmkt_plugins.losses.weighted_denoising import WeightedDenoisingLoss

    if name == "weighted-denoising":
        return WeightedDenoisingLoss(WeightedDenoisingLoss.Config(threshold=0.0))
    loss = EnsembleCELoss(EnsembleCELoss.Config(student_epochs=1))
    loss.prepare(batch, task, 0)
    loss.prepare = lambda *args: None  # type: ignore[method-assign]
    return loss


def ratio(toolkit: list[float], bare: list[float]) -> float:
    """Toolkit speed over bare speed (same work): median bare seconds / median toolkit seconds."""
    return spread(bare)["median"] / spread(toolkit)["median"]


def measure_dtype(folder: Path, dtype_name: str, device: str, shape: dict[str, Any], repeats: int) -> dict[str, Any]:
    import peft
    import torch
    from fedmmkt_plugins.generators.sd_lora import SDLoraGenerator

    from fedmmkt_core.data import TaskSpec

    size = shape["vae"]["sample_size"]
    task = TaskSpec(class_names=("zero", "one", "two"), image_size=size, channels=3,
                    caption_template="a photo of the digit {name}")  # fmt: skip
    dtype = getattr(torch, dtype_name)
    memory = {"toolkit_generation": PeakMemory(device), "bare_generation": PeakMemory(device)}
    toolkit = toolkit_generator(folder, task, dtype_name, device, shape)
    bare = bare_pipeline(folder, dtype, device)
    prompts = [PROMPTS[i % 3] for i in range(shape["images"])]
    seeds = list(range(len(prompts)))
    guidance = float(SDLoraGenerator.Config().guidance_scale)

    def run_toolkit() -> None:
        with memory["toolkit_generation"].measure():
            toolkit.generate(prompts, seeds)

    def run_bare() -> None:
        with memory["bare_generation"].measure():
            generators = [torch.Generator(device).manual_seed(s) for s in seeds]
            bare(prompts, num_inference_steps=shape["inference_steps"], guidance_scale=guidance, height=size,
                 width=size, generator=generators, output_type="np")  # fmt: skip

    seconds = alternating_seconds({"toolkit": run_toolkit, "bare": run_bare}, repeats)
    images = shape["images"]
    result: dict[str, Any] = {
        "generation": {
            "images": images,
            "inference_steps": shape["inference_steps"],
            "images_per_second": {k: spread([images / s for s in v]) for k, v in seconds.items()},
            "ratio_to_bare": ratio(seconds["toolkit"], seconds["bare"]),
        },
        "fine_tune": {},
    }
    batch = alignment_batch(shape["pool"], size)
    lora = toolkit.config.lora
    bare.unet.add_adapter(peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights="gaussian",
                                          target_modules=list(lora.targets)))  # fmt: skip
    for param in bare.unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    for name in LOSSES:
        loss = prepared_loss(name, batch, task)
        student = getattr(loss, "student", None)
        net = student.net.to(device) if student is not None else None
        memory[f"toolkit_fine_tune_{name}"] = PeakMemory(device)
        memory[f"bare_fine_tune_{name}"] = PeakMemory(device)
        bare_run = bare_fine_tune(bare, net, name, batch.images, batch.prompts, shape, lora)

        def toolkit_run(loss: Any = loss, name: str = name) -> None:
            with memory[f"toolkit_fine_tune_{name}"].measure():
                toolkit.fine_tune(batch, [(loss, 1.0)], seed=1)

        def bare_timed(run: Callable[[], None] = bare_run, name: str = name) -> None:
            with memory[f"bare_fine_tune_{name}"].measure():
                run()

        seconds = alternating_seconds({"toolkit": toolkit_run, "bare": bare_timed}, repeats)
        result["fine_tune"][name] = {
            "steps": shape["steps"],
            "batch_size": shape["batch_size"],
            "steps_per_second": {k: spread([shape["steps"] / s for s in v]) for k, v in seconds.items()},
            "ratio_to_bare": ratio(seconds["toolkit"], seconds["bare"]),
        }
    result["peak_memory_bytes"] = {k: m.peak for k, m in memory.items()}
    if dtype_name == "float32":
        result["fine_tune"]["before_after"] = before_after(folder, task, device, shape, repeats, batch)
    return result


def before_after(folder: Path, task: Any, device: str, shape: dict[str, Any], repeats: int, batch: Any) -> dict:
    """The toolkit's fine-tuning steps/s with every step re-encoding its images (before) and with each
    image encoded once per call (after, ``cache_latents``); same settings, alternating repeats."""
    loss = prepared_loss("weighted-denoising", batch, task)
    before = toolkit_generator(folder, task, "float32", device, shape, cache_latents=False)
    after = toolkit_generator(folder, task, "float32", device, shape, cache_latents=True)
    seconds = alternating_seconds(
        {
            "before": lambda: before.fine_tune(batch, [(loss, 1.0)], seed=1),
            "after": lambda: after.fine_tune(batch, [(loss, 1.0)], seed=1),
        },
        repeats,
    )
    return {
        "loss": "weighted-denoising",
        "steps_per_second": {k: spread([shape["steps"] / s for s in v]) for k, v in seconds.items()},
        "speedup": ratio(seconds["after"], seconds["before"]),
    }


def summarise(by_dtype: dict[str, Any], headline: str = "float32") -> dict[str, Any]:
    """The issue's headline fields (from ``headline``'s dtype), next to every dtype's figures."""
    main = by_dtype[headline]
    fine = {k: v for k, v in main["fine_tune"].items() if k != "before_after"}
    return {
        "generation": {
            "ratio_to_bare": main["generation"]["ratio_to_bare"],
            "images_per_second": main["generation"]["images_per_second"]["toolkit"]["median"],
        },
        "fine_tune": {
            "ratio_to_bare": {name: v["ratio_to_bare"] for name, v in fine.items()},
            "steps_per_second": {name: v["steps_per_second"]["toolkit"]["median"] for name, v in fine.items()},
            "before_after": main["fine_tune"].get("before_after"),
        },
        "peak_memory_bytes": main["peak_memory_bytes"],
        "headline_dtype": headline,
        "by_dtype": by_dtype,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sd-shaped", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default=None, help="comma-separated; default: every dtype the device allows")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/sd-shaped-<device>.json")
    args = parser.parse_args(argv)
    import torch
    from fedmmkt_plugins.generators.sd_lora import quiet_libraries

    quiet_libraries()
    threads = set_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shape == "sd15" and device != "cuda":
        print("sd-shaped --shape sd15 needs a CUDA GPU (an 860M-parameter UNet at 512 px); none here. "
              "Use --shape small on a CPU.")  # fmt: skip
        raise SystemExit(2)
    allowed = ["float32", "bfloat16", "float16"] if device == "cuda" else ["float32", "bfloat16"]
    dtypes = args.dtypes.split(",") if args.dtypes else allowed
    if "float32" not in dtypes or not set(dtypes) <= set(allowed):
        parser.error(f"--dtypes must include float32 and be among {allowed} on {device}")
    shape = SHAPES[args.shape]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="sd-shaped-") as tmp:
        folder = Path(tmp) / "pipeline"
        build_pipeline(shape).save_pretrained(folder, safe_serialization=True)
        by_dtype = {}
        for dtype in dtypes:
            print(f"-- {dtype}", flush=True)
            by_dtype[dtype] = measure_dtype(folder, dtype, device, shape, args.repeats)
            figures = by_dtype[dtype]
            print(f"   generation toolkit/bare {figures['generation']['ratio_to_bare']:.3f}; fine-tune "
                  + ", ".join(f"{k} {v['ratio_to_bare']:.3f}" for k, v in figures["fine_tune"].items()
                              if k != "before_after"), flush=True)  # fmt: skip
    result = {
        "command": "python -m benchmarks sd-shaped " + " ".join(argv),
        "shape": args.shape,
        "device": device,
        "settings": {k: v for k, v in shape.items() if k not in ("unet", "vae", "text")} | {"threads": threads},
        "pipeline": {k: shape[k] for k in ("unet", "vae", "text")},
        "seconds": time.time() - started,
        "machine": machine(),
        "peak_rss_process_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **summarise(by_dtype),
    }
    out = args.out or RESULTS / f"sd-shaped-{device}.json"
    atomic_write_json(out, result)
    before_after_figures = result["fine_tune"]["before_after"]
    print(json_line(result["generation"]["ratio_to_bare"], result["fine_tune"]["ratio_to_bare"], before_after_figures))
    print(f"wrote {out}")


def json_line(generation: float, fine_tune: dict[str, float], before_after_figures: dict[str, Any]) -> str:
    steps = before_after_figures["steps_per_second"]
    return (
        f"float32: generation toolkit/bare {generation:.3f}; fine-tune toolkit/bare "
        + ", ".join(f"{k} {v:.3f}" for k, v in fine_tune.items())
        + f"; steps/s before {steps['before']['median']:.2f} -> after {steps['after']['median']:.2f}"
        f" (x{before_after_figures['speedup']:.2f})"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
