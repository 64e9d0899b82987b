"""Profile of a demo round, and the speed-up the profile led to.

    python -m benchmarks profile [--threads N] [--repeats 3]

1. Runs two rounds of the demo recipe (``examples/digits.yaml``) and profiles the second with
   cProfile: time per phase, and the functions that take the most time of their own.
2. The profile's lesson: the slowest phases generate images, and inside the UNet peft's unmerged
   LoRA layers cost three matmuls where a merged layer costs one. The generator now folds the
   adapter into the base weights while generating. This step measures generation with and without
   the merge (same prompts, seeds and pipeline; min/median/max over repeats).

Writes ``benchmarks/results/profile-digits.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import shutil
import time
from pathlib import Path
from typing import Any

from .common import RESULTS, alternating_seconds, atomic_write_json, demo_generator, machine, set_threads, spread

RECIPE = Path("examples/digits.yaml")
RESULT_FILE = RESULTS / "profile-digits.json"


def profile_round(out: Path, top: int) -> dict[str, Any]:
    from fedmmkt_core.recipe import load_recipe
    from fedmmkt_core.server.runner import Runner

    recipe = load_recipe(RECIPE, ["federation.rounds=2", "loggers=[]"])
    shutil.rmtree(out, ignore_errors=True)
    profiler = cProfile.Profile()
    captured: dict[str, Any] = {}

    def events(kind: str, **data: Any) -> None:
        if kind == "round_start" and data["round"] == 2:
            captured["start"] = time.perf_counter()
            profiler.enable()
        elif kind == "round_end" and data["round"] == 2:
            profiler.disable()
            captured["wall"] = time.perf_counter() - captured["start"]
            captured["phases"] = {k[8:]: v for k, v in data["metrics"].items() if k.startswith("seconds_")}

    Runner(recipe, out, events=events).run()
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, function), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        short = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        rows.append({"function": f"{short}:{line}({function})", "calls": ncalls, "own_seconds": tottime,
                     "cumulative_seconds": cumtime})  # fmt: skip
    rows.sort(key=lambda r: r["own_seconds"], reverse=True)
    phases = {k: v for k, v in captured["phases"].items() if k != "round"}
    return {
        "round": 2,
        "wall_seconds": captured["wall"],
        "phase_seconds": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
        "top_functions_by_own_time": rows[:top],
    }


def generation_with_and_without_merge(repeats: int, count: int) -> dict[str, Any]:
    import torch
    from fedmmkt_plugins.generators.sd_lora import SDLoraGenerator

    generator, splits = demo_generator(RECIPE, [])
    torch.manual_seed(0)
    for param in generator.lora_parameters():  # a trained adapter is non-zero; LoRA's B starts at zero
        param.data.add_(torch.randn_like(param) * 0.05)
    prompts = [splits.task.prompt(j % splits.task.num_classes) for j in range(count)]
    seeds = list(range(count))
    merged_method = SDLoraGenerator._merged_adapter

    def run(merge: bool) -> None:
        SDLoraGenerator._merged_adapter = merged_method if merge else (lambda self: contextlib.nullcontext())
        try:
            generator.generate(prompts, seeds)
        finally:
            SDLoraGenerator._merged_adapter = merged_method

    seconds = alternating_seconds({"merged": lambda: run(True), "unmerged": lambda: run(False)}, repeats)
    rates = {name: [count / s for s in values] for name, values in seconds.items()}
    speedups = [m / u for m, u in zip(rates["merged"], rates["unmerged"], strict=True)]
    print(
        f"  generation {count} images: merged {spread(rates['merged'])['median']:.1f} img/s, "
        f"unmerged {spread(rates['unmerged'])['median']:.1f} img/s, speed-up ×{spread(speedups)['median']:.3f}"
    )
    return {
        "images": count,
        "images_per_second_merged": spread(rates["merged"]),
        "images_per_second_unmerged": spread(rates["unmerged"]),
        "speedup": spread(speedups),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-profile"))
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    print("profiling round 2 of the demo ...", flush=True)
    profile = profile_round(args.out, args.top)
    for phase, seconds in profile["phase_seconds"].items():
        print(f"  {phase:22} {seconds:7.2f} s")
    for row in profile["top_functions_by_own_time"][:8]:
        print(f"  {row['own_seconds']:7.2f} s own  {row['function']}")
    print("generation with and without merging the adapter ...", flush=True)
    merge = generation_with_and_without_merge(args.repeats, args.images)
    command = f"python -m benchmarks profile --repeats {args.repeats} --images {args.images}"
    command += f" --threads {args.threads}" if args.threads else ""
    atomic_write_json(RESULT_FILE, {
        "command": command, "recipe": str(RECIPE), "torch_threads": threads, "machine": machine(),
        "profile": profile, "lora_merge": merge,
    })  # fmt: skip
    print(f"wrote {RESULT_FILE}")


if __name__ == "__main__":
    main()
