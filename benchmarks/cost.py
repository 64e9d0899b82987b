"""Cost of a FedMMKT round: time per phase, toolkit overhead, generation throughput, bytes.

    python -m benchmarks cost [--rounds 3] [--repeats 3] [--threads N]

* **Overhead ratio** = a round's wall time (round start to checkpoint written) ÷ the time spent inside
  the model calls it makes, each timed directly around the call: client ``fit`` / ``predict_logits``,
  generator ``generate`` / ``fine_tune``, the oracle's ``predict`` / ``features`` and the Fréchet
  distance. Everything else (messages encoded and decoded, clients built and their weights loaded
  and saved, validation, aggregation, checkpoints, metrics, sample grids) is the toolkit's overhead.
* **Generation ratio** = images/s through ``generator.generate`` ÷ images/s calling the same
  diffusers pipeline directly with the same prompts, seeds, steps, guidance, size and batch size.
* **Client fit, plugin ÷ plain PyTorch**: ``TorchClassifier.fit`` (the ResNet and ViT plugins' local
  update) against a bare loop doing the same optimiser steps on the same network with tensors made
  up front: what the model calls above leave out of the toolkit's account.
* **Bytes** per client per round up and down, from the run's metrics.

Runs the demo recipe (``examples/digits.yaml``, seed 0, heterogeneous clients) and writes
``benchmarks/results/cost-digits.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import RESULTS, alternating_seconds, atomic_write_json, demo_generator, machine, set_threads, spread

RECIPE = Path("examples/digits.yaml")
RESULT_FILE = RESULTS / "cost-digits.json"


class ComputeTimer:
    """Wraps model calls with a timer; nested timed calls count once (the outermost)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._local = threading.local()
        self._patched: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        timer = self

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(timer._local, "depth", 0)
            if depth:
                return original(*args, **kwargs)
            timer._local.depth = 1
            start = timer.clock()
            try:
                return original(*args, **kwargs)
            finally:
                timer._local.depth = 0
                timer.seconds[label] = timer.seconds.get(label, 0.0) + timer.clock() - start
                timer.calls[label] = timer.calls.get(label, 0) + 1

        self._patched.append((owner, name, original))
        setattr(owner, name, timed)

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        seconds, calls = self.seconds, self.calls
        self.seconds, self.calls = {}, {}
        return seconds, calls

    def restore(self) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()


def instrument() -> ComputeTimer:
    from fedmmkt_plugins.clients import torch_classifier
    from fedmmkt_plugins.evaluation import oracle
    from fedmmkt_plugins.generators import sd_lora

    timer = ComputeTimer()
    timer.wrap(torch_classifier.TorchClassifier, "fit", "client_fit")
    timer.wrap(torch_classifier.TorchClassifier, "predict_logits", "client_predict")
    timer.wrap(sd_lora.SDLoraGenerator, "generate", "generator_generate")
    timer.wrap(sd_lora.SDLoraGenerator, "fine_tune", "generator_fine_tune")
    timer.wrap(oracle.EvaluationOracle, "predict", "oracle_predict")
    timer.wrap(oracle.EvaluationOracle, "features", "oracle_features")
    timer.wrap(oracle, "frechet_distance", "frechet_distance")
    return timer


def measure_overhead(rounds: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    """One instrumented run of the demo recipe; per round: wall, compute inside it, phases, bytes."""
    from fedmmkt_core.recipe import load_recipe
    from fedmmkt_core.server.runner import Runner

    recipe = load_recipe(RECIPE, [f"federation.rounds={rounds}", "loggers=[]", *overrides])
    shutil.rmtree(out, ignore_errors=True)
    timer = instrument()
    started: dict[int, float] = {}
    per_round: list[dict[str, Any]] = []

    def events(kind: str, **data: Any) -> None:
        if kind == "run_start":
            timer.take()  # set-up (generator build, oracle) is not part of a round
        elif kind == "round_start":
            started[data["round"]] = time.perf_counter()
        elif kind == "round_end":
            wall = time.perf_counter() - started[data["round"]]
            seconds, calls = timer.take()
            row = data["metrics"]
            compute = sum(seconds.values())
            per_round.append(
                {
                    "round": data["round"],
                    "wall_seconds": wall,
                    "compute_seconds": compute,
                    "overhead_ratio": wall / compute,
                    "compute_by_call": seconds,
                    "calls": calls,
                    "phase_seconds": {k[len("seconds_") :]: v for k, v in row.items() if k.startswith("seconds_")},
                    "bytes_up_per_client": row["bytes_up_per_client"],
                    "bytes_down_per_client": row["bytes_down_per_client"],
                }
            )
            print(f"  round {data['round']}: wall {wall:.2f} s, compute {compute:.2f} s, ratio {wall / compute:.3f}")

    try:
        Runner(recipe, out, events=events).run()
    finally:
        timer.restore()
    ratios = [r["overhead_ratio"] for r in per_round]
    return {"rounds": per_round, "overhead_ratio": spread(ratios)}


def measure_generation(repeats: int, count: int, overrides: list[str]) -> dict[str, Any]:
    """Images/s through the toolkit's generator vs the same diffusers pipeline called directly."""
    import torch

    generator, splits = demo_generator(RECIPE, overrides)
    task = splits.task
    cfg = generator.config
    prompts = [task.prompt(j % task.num_classes) for j in range(count)]
    seeds = list(range(count))
    pipe = generator.pipe

    def toolkit() -> None:
        generator.generate(prompts, seeds)

    def direct() -> None:
        batch = cfg.generation_batch_size
        for start in range(0, count, batch):
            with torch.no_grad():
                pipe(
                    prompts[start : start + batch],
                    num_inference_steps=cfg.num_inference_steps,
                    guidance_scale=cfg.guidance_scale,
                    generator=[torch.Generator().manual_seed(s) for s in seeds[start : start + batch]],
                    height=generator.resolution,
                    width=generator.resolution,
                    output_type="pt",
                )

    def direct_fused() -> None:  # the same call with the adapter folded in, as the toolkit generates
        with generator._merged_adapter():
            direct()

    seconds = alternating_seconds({"toolkit": toolkit, "direct": direct, "direct_fused": direct_fused}, repeats)
    rates = {name: [count / s for s in values] for name, values in seconds.items()}
    ratios = [t / d for t, d in zip(rates["toolkit"], rates["direct"], strict=True)]
    fused_ratios = [t / d for t, d in zip(rates["toolkit"], rates["direct_fused"], strict=True)]
    print(
        f"  generation: toolkit {spread(rates['toolkit'])['median']:.1f} img/s, "
        f"direct {spread(rates['direct'])['median']:.1f} img/s (ratio {spread(ratios)['median']:.3f}), "
        f"direct with the adapter fused {spread(rates['direct_fused'])['median']:.1f} img/s "
        f"(ratio {spread(fused_ratios)['median']:.3f})"
    )
    return {
        "images": count,
        "batch_size": cfg.generation_batch_size,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "images_per_second_toolkit": spread(rates["toolkit"]),
        "images_per_second_direct": spread(rates["direct"]),
        "images_per_second_direct_fused": spread(rates["direct_fused"]),
        "ratio": spread(ratios),
        "ratio_to_fused": spread(fused_ratios),
    }


def measure_client_fit(repeats: int, overrides: list[str]) -> dict[str, Any]:
    """One ResNet and one ViT client of the demo: the plugin's fit vs the same steps in a bare loop."""
    import numpy as np

    from fedmmkt_core.data import DistillSet
    from fedmmkt_core.loading import load_data
    from fedmmkt_core.recipe import load_recipe

    recipe = load_recipe(RECIPE, ["loggers=[]", *overrides])
    splits, partitions = load_data(recipe)
    rng = np.random.default_rng(0)
    distill_images = splits.public.images[rng.choice(len(splits.public), 500)]
    soft = rng.dirichlet(np.ones(splits.task.num_classes), 500).astype(np.float32)
    distill = DistillSet(distill_images, soft, weight=1.0, temperature=1.0)
    groups = recipe.client_groups()
    results = {}
    for name in ("resnet", "vit"):
        client_id = next(i for i, g in enumerate(groups) if g.name == name)
        model = recipe.build("client_model", groups[client_id])
        model.build(splits.task, seed=0)
        results[name] = compare_fit(model, splits.train.subset(partitions[client_id]), distill, repeats)
        print(f"  client fit {name}: plugin / bare loop {results[name]['ratio']['median']:.3f}")
    return results


def compare_fit(model: Any, train: Any, distill: Any, repeats: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    cfg = model.config
    x, y = model._tensor(train.images), torch.from_numpy(train.labels)
    dx, dy = model._tensor(distill.images), torch.from_numpy(distill.soft_labels)

    def plugin() -> None:
        model.fit(train, distill, seed=1)

    def bare() -> None:
        net = model.net
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        net.train()
        n, m, b = len(x), len(dx), cfg.batch_size
        for _ in range(cfg.epochs):
            order, distill_order = torch.randperm(n), torch.randperm(m)
            for step in range(max(1, (n + b - 1) // b)):
                idx = order[step * b : (step + 1) * b]
                didx = distill_order[(step * b) % m : (step * b) % m + b]
                loss = F.cross_entropy(net(x[idx]), y[idx])
                loss = loss + F.kl_div(F.log_softmax(net(dx[didx]), dim=1), dy[didx], reduction="batchmean")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    times = alternating_seconds({"plugin": plugin, "bare": bare}, repeats)
    ratios = [p / b for p, b in zip(times["plugin"], times["bare"], strict=True)]
    return {
        "samples": len(train),
        "epochs": cfg.epochs,
        "plugin_seconds": spread(times["plugin"]),
        "bare_seconds": spread(times["bare"]),
        "ratio": spread(ratios),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the generation comparison")
    parser.add_argument("--images", type=int, default=500, help="images per generation repeat")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-cost"))
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    print(f"overhead: {args.rounds} rounds of {RECIPE} ...", flush=True)
    overhead = measure_overhead(args.rounds, args.out, args.overrides)
    print(f"generation: {args.repeats} × {args.images} images each way ...", flush=True)
    generation = measure_generation(args.repeats, args.images, args.overrides)
    print(f"client fit: {args.repeats} repeats each way ...", flush=True)
    client_fit = measure_client_fit(args.repeats, args.overrides)
    command = f"python -m benchmarks cost --rounds {args.rounds} --repeats {args.repeats} --images {args.images}"
    command += f" --threads {args.threads}" if args.threads else ""
    command += "".join(f" --set {o}" for o in args.overrides)
    result = {
        "command": command,
        "recipe": str(RECIPE),
        "overrides": args.overrides,
        "torch_threads": threads,
        "machine": machine(),
        "overhead": overhead,
        "generation": generation,
        "client_fit": client_fit,
    }
    atomic_write_json(RESULT_FILE, result)
    print(json.dumps({"overhead_ratio": overhead["overhead_ratio"], "generation_ratio": generation["ratio"]}, indent=1))
    print(f"wrote {RESULT_FILE}")


if __name__ == "__main__":
    main()
