"""Fine-tuning the generator on its own samples with their own prompts should be (nearly) a no-op.

    python -m benchmarks self-finetune --recipe examples/digits.yaml --seeds 0 1 2 3 4 \\
        [--latents mean sample] [--calls 2] [--threads 1]

For every seed and latent kind (``generator.params.fine_tune_latents``): build the recipe's generator (the
cached pre-trained base), draw ``samples_per_class`` images per class from the base, then fine-tune the
LoRA ``--calls`` times on them with their own prompts (``weighted-denoising``, every pair aligned: no client
signal, so nothing should change). CAS on 100 images per class (by an oracle trained on the whole oracle
split: a diagnostic, not a selection) and the Fréchet distance to the evaluation split are measured before
and after each call. A fine-tuning that feeds the UNet latents of another distribution than pre-training
did (posterior samples instead of means) turns the images to noise here; one that matches keeps CAS and
the distance about where they were.
Writes ``benchmarks/results/self-finetune-<recipe>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from .common import RESULTS, atomic_write_json, demo_generator, machine, set_threads, spread

CAS_PER_CLASS = 100
CAS_SEED = 20_000
SAMPLE_SEED = 30_000


def measure(recipe_path: Path, seed: int, latents: str, calls: int) -> dict[str, Any]:
    from fedmmkt_plugins.evaluation.oracle import EvaluationOracle, frechet_distance
    from fedmmkt_plugins.losses.weighted_denoising import WeightedDenoisingLoss

    from fedmmkt_core.cache import cache_dir
    from fedmmkt_core.interfaces import AlignmentBatch
    from fedmmkt_core.loading import evaluation_split
    from fedmmkt_core.recipe import load_recipe
    from fedmmkt_core.seeding import derive_seed

    overrides = [f"seed={seed}", f"generator.params.fine_tune_latents={latents}"]
    recipe = load_recipe(recipe_path, overrides)
    generator, splits = demo_generator(recipe_path, overrides)
    task = splits.task
    oracle = EvaluationOracle(splits.oracle, task, cache_dir(), seed=derive_seed(recipe.seed, "oracle"))
    reference = oracle.features(evaluation_split(recipe, splits).images)
    prompts = [task.prompt(c) for c in range(task.num_classes)]
    eval_ids = np.repeat(np.arange(task.num_classes), CAS_PER_CLASS)
    eval_seeds = [CAS_SEED + j for j in range(len(eval_ids))]

    def score() -> dict[str, float]:
        images = generator.generate([prompts[c] for c in eval_ids], eval_seeds)
        return {"cas": oracle.cas(images, eval_ids), "fid": frechet_distance(oracle.features(images), reference)}

    per_class = int(recipe.algorithm.params.get("samples_per_class", 50))
    class_ids = np.repeat(np.arange(task.num_classes), per_class)
    images = generator.generate([prompts[c] for c in class_ids], [SAMPLE_SEED + j for j in range(len(class_ids))])
    soft = np.eye(task.num_classes, dtype=np.float32)[class_ids]
    batch = AlignmentBatch(images, [prompts[c] for c in class_ids], class_ids, soft, prompts)
    trajectory = [score()]
    losses = []
    for call in range(calls):
        update = generator.fine_tune(batch, [(WeightedDenoisingLoss(), 1.0)], seed=derive_seed(seed, "self", call))
        losses.append(next((v for k, v in update.items() if k.startswith("loss_")), None))
        trajectory.append(score())
    return {"cas": [t["cas"] for t in trajectory], "fid": [t["fid"] for t in trajectory], "loss": losses}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks self-finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", type=Path, default=Path("examples/digits.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--latents", nargs="+", default=["mean", "sample"], choices=["mean", "sample"])
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    result_file: Path = args.results or RESULTS / f"self-finetune-{args.recipe.stem}.json"
    previous = json.loads(result_file.read_text()) if result_file.exists() else {}
    runs = previous.get("runs", []) if previous.get("calls") == args.calls else []  # resume a killed benchmark
    done = {(r["latents"], r["seed"]) for r in runs}
    for latents in args.latents:
        for seed in args.seeds:
            if (latents, seed) in done:
                continue
            run = {"latents": latents, "seed": seed, **measure(args.recipe, seed, latents, args.calls)}
            runs.append(run)
            print(
                f"{latents:6} seed {seed}: CAS "
                + " -> ".join(f"{v:.3f}" for v in run["cas"])
                + "  FD "
                + " -> ".join(f"{v:.0f}" for v in run["fid"])
                + "  first loss "
                + (f"{run['loss'][0]:.3f}" if run["loss"] and run["loss"][0] is not None else "-"),
                flush=True,
            )
            atomic_write_json(result_file, {"recipe": str(args.recipe), "calls": args.calls, "machine": machine(),
                                            "torch_threads": threads, "runs": runs})  # fmt: skip
    table = []
    for latents in args.latents:
        members = [r for r in runs if r["latents"] == latents]
        if not members:
            continue
        row = {
            "latents": latents,
            "seeds": [r["seed"] for r in members],
            "cas_start": spread([r["cas"][0] for r in members]),
            "cas_end": spread([r["cas"][-1] for r in members]),
            "cas_change": spread([r["cas"][-1] - r["cas"][0] for r in members]),
            "fid_ratio": spread([r["fid"][-1] / r["fid"][0] for r in members]),
        }
        table.append(row)
        print(
            f"{latents:6} CAS {row['cas_start']['mean']:.3f} -> {row['cas_end']['mean']:.3f} "
            f"(change min {row['cas_change']['min']:+.3f}, max {row['cas_change']['max']:+.3f})  "
            f"FD ratio {row['fid_ratio']['mean']:.2f} (max {row['fid_ratio']['max']:.2f})"
        )
    atomic_write_json(result_file, {"recipe": str(args.recipe), "calls": args.calls, "machine": machine(),
                                    "torch_threads": threads, "runs": runs, "table": table})  # fmt: skip
    print(f"wrote {result_file}")


if __name__ == "__main__":
    main()
