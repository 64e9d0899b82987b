"""The tiny generator's pre-training: its time and the pre-trained generator's CAS, per setting and seed.

    python -m benchmarks pretrain --recipe examples/digits.yaml --seeds 0 1 2 \\
        --setting 'earlier={"steps": 1500, "batch_size": 64, "lr": 0.001, "lr_schedule": "constant", ...}' \\
        --setting 'recipe={}' [--threads 1] [--use-cache]

Each setting is a JSON object laid over the recipe's ``generator.params.pretrain``. For every setting and
seed the tiny pipeline is pre-trained from scratch (into a temporary cache, unless ``--use-cache``) and timed;
then the pre-trained generator is measured as FedMMKT measures it before round 1: CAS and Fréchet distance
on the recipe's evaluation split (``eval_samples_per_class`` images per class, the same prompts and seeds),
plus CAS on 100 further images per class (less sampling noise). The pre-training is the seed's own: the
splits and the generator's initialisation follow the seed, so settings are compared seed by seed.
Writes ``benchmarks/results/pretrain-<recipe>.json``; a killed benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import RESULTS, atomic_write_json, demo_generator, machine, set_threads, spread

EXTRA_PER_CLASS = 100
EXTRA_SEED = 10_000


def measure(recipe_path: Path, seed: int, pretrain: dict[str, Any], use_cache: bool) -> dict[str, Any]:
    """Pre-train (timed, splits loading included) under ``pretrain`` and measure the result as FedMMKT does
    before round 1."""
    from fedmmkt_plugins.evaluation.oracle import EvaluationOracle, frechet_distance, oracle_half

    from fedmmkt_core.cache import cache_dir
    from fedmmkt_core.loading import evaluation_split
    from fedmmkt_core.recipe import load_recipe
    from fedmmkt_core.seeding import derive_seed

    overrides = [f"seed={seed}"] + [f"generator.params.pretrain.{k}={json.dumps(v)}" for k, v in pretrain.items()]
    recipe = load_recipe(recipe_path, overrides)
    if recipe.generator is None or recipe.generator.name != "sd-lora":
        raise SystemExit(f"{recipe_path}: the pretrain benchmark needs the sd-lora generator")
    with tempfile.TemporaryDirectory(prefix="pretrain-") as scratch:
        start = time.perf_counter()
        generator, splits = demo_generator(recipe_path, overrides, cache=None if use_cache else Path(scratch))
        seconds = time.perf_counter() - start
    task = splits.task
    purpose = "selection" if recipe.data.evaluate_on == "validation" else "report"
    oracle = EvaluationOracle(
        oracle_half(splits.oracle, purpose), task, cache_dir(), seed=derive_seed(recipe.seed, "oracle", purpose)
    )
    per_class = int(recipe.algorithm.params.get("eval_samples_per_class", 30))
    class_ids = np.repeat(np.arange(task.num_classes), per_class)
    seeds = [derive_seed(recipe.seed, "evaluate_generator", purpose, j) for j in range(len(class_ids))]
    images = generator.generate([task.prompt(int(c)) for c in class_ids], seeds)
    extra_ids = np.repeat(np.arange(task.num_classes), EXTRA_PER_CLASS)
    extra = generator.generate(
        [task.prompt(int(c)) for c in extra_ids], [EXTRA_SEED + j for j in range(len(extra_ids))]
    )
    return {
        "pretrain": generator.config.pretrain.model_dump(mode="json"),
        "cache_hit": bool(generator.cache_hit),
        "pretrain_seconds": None if generator.cache_hit else seconds,
        "cas": oracle.cas(images, class_ids),
        "cas_extra": oracle.cas(extra, extra_ids),
        "fid": frechet_distance(oracle.features(images), oracle.features(evaluation_split(recipe, splits).images)),
    }


def measure_or_exit(recipe_path: Path, seed: int, pretrain: dict[str, Any], use_cache: bool) -> dict[str, Any]:
    """:func:`measure`, with a bad recipe or setting reported as a message and exit status 2."""
    from fedmmkt_core.errors import UserError

    try:
        return measure(recipe_path, seed, pretrain, use_cache)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def summarize(runs: list[dict[str, Any]], reference: str | None) -> list[dict[str, Any]]:
    """Per setting: mean ± std over seeds, and the mean paired difference to ``reference`` on shared seeds."""
    names = list(dict.fromkeys(r["setting"] for r in runs))
    by = {(r["setting"], r["seed"]): r for r in runs}
    table = []
    for name in names:
        members = [r for r in runs if r["setting"] == name]
        row: dict[str, Any] = {"setting": name, "seeds": sorted(r["seed"] for r in members)}
        for key in ("pretrain_seconds", "cas", "cas_extra", "fid"):
            values = [r[key] for r in members if r.get(key) is not None]  # no time for a cache hit
            if values:
                row[key] = spread(values)
        if reference is not None and name != reference:
            shared = [r["seed"] for r in members if (reference, r["seed"]) in by]
            if shared:
                row["paired_vs_" + reference] = {
                    key: [by[(name, s)][key] - by[(reference, s)][key] for s in sorted(shared)]
                    for key in ("cas", "cas_extra")
                } | {"seeds": sorted(shared)}
        table.append(row)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", type=Path, default=Path("examples/digits.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a pre-training setting laid over the recipe's; repeatable (default: recipe={})",
    )
    parser.add_argument("--reference", default=None, help="the setting paired differences are taken against")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--use-cache", action="store_true", help="load a cached pre-training when there is one")
    parser.add_argument("--results", type=Path, default=None, help="default: results/pretrain-<recipe stem>.json")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    settings: dict[str, dict[str, Any]] = {}
    for item in args.setting or ["recipe={}"]:
        name, _, text = item.partition("=")
        try:
            settings[name] = json.loads(text)
        except json.JSONDecodeError as exc:
            parser.error(f"--setting {name}: not JSON ({exc})")
    result_file: Path = args.results or RESULTS / f"pretrain-{args.recipe.stem}.json"
    previous = json.loads(result_file.read_text()) if result_file.exists() else {}
    runs: list[dict[str, Any]] = previous.get("runs", [])
    for run in runs:
        if run["setting"] in settings and run["overrides"] != settings[run["setting"]]:
            raise SystemExit(f"{result_file}: setting '{run['setting']}' was measured as {run['overrides']}")
    reference = args.reference or previous.get("reference")

    def write() -> list[dict[str, Any]]:
        table = summarize(runs, reference)
        atomic_write_json(result_file, {"recipe": str(args.recipe), "machine": machine(), "runs": runs,
                                        "reference": reference, "table": table})  # fmt: skip
        return table

    done = {(r["setting"], r["seed"]) for r in runs}
    for name, overrides in settings.items():
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            print(f"{name} seed {seed} ...", flush=True)
            run = {
                "setting": name,
                "seed": seed,
                "overrides": overrides,
                "torch_threads": threads,
                **measure_or_exit(args.recipe, seed, overrides, args.use_cache),
            }
            print(
                f"    {run['pretrain_seconds'] or 0:.0f} s  CAS {run['cas']:.3f}  CAS (+{EXTRA_PER_CLASS}/class) "
                f"{run['cas_extra']:.3f}  FD {run['fid']:.0f}",
                flush=True,
            )
            runs.append(run)
            write()
    table = write()
    for row in table:
        print(
            f"{row['setting']:12} seeds {row['seeds']}  {row.get('pretrain_seconds', {}).get('mean', 0):.0f} s  "
            f"CAS {row['cas']['mean']:.3f}  CAS+ {row['cas_extra']['mean']:.3f}  FD {row['fid']['mean']:.0f}"
        )
    print(f"wrote {result_file}")


if __name__ == "__main__":
    main()
