"""Every algorithm on the same recipe, partition and seed: client accuracy, generator CAS, bytes, time.

    python -m benchmarks.algorithms [--recipe examples/digits.yaml] [--seeds 0] [--set KEY=VALUE ...]

Writes ``benchmarks/results/algorithms-<recipe>.json`` and prints a table. The generator's
pre-training is cached (``$FEDMMKT_CACHE``), so only the first run pays for it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from fedmmkt_core.recipe import load_recipe
from fedmmkt_core.server.runner import Runner

from .common import atomic_write_json

ALGORITHMS = ["local", "feddf", "fedmmkt-frozen-generator", "fedmmkt-no-feedback", "fedmmkt"]
GENERATOR_ALGORITHMS = {"feddf", "fedmmkt-frozen-generator", "fedmmkt-no-feedback", "fedmmkt"}
RESULTS = Path(__file__).resolve().parent / "results"


def run_one(recipe_path: Path, algorithm: str, seed: int, overrides: list[str], out: Path) -> dict:
    recipe = load_recipe(recipe_path, [*overrides, f"seed={seed}"])
    params = recipe.algorithm.params if algorithm in GENERATOR_ALGORITHMS else {}
    settings = [*overrides, f"seed={seed}", f"algorithm={json.dumps({'name': algorithm, 'params': params})}"]
    recipe = load_recipe(recipe_path, settings)
    start = time.perf_counter()
    summary = Runner(recipe, out / f"{algorithm}-seed{seed}").run()
    summary["process_seconds"] = time.perf_counter() - start
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("examples/digits.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-algorithms"))
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()

    rows: dict[str, list[dict]] = {}
    for algorithm in args.algorithms:
        for seed in args.seeds:
            print(f"running {algorithm} seed {seed} ...", flush=True)
            rows.setdefault(algorithm, []).append(run_one(args.recipe, algorithm, seed, args.overrides, args.out))

    keys = [
        "client_accuracy_mean",
        "client_accuracy_min",
        "generator_cas_initial",
        "generator_cas",
        "generator_fid",
        "bytes_up_per_client_round",
        "bytes_down_per_client_round",
        "wall_seconds",
    ]
    table = {}
    for algorithm, summaries in rows.items():
        entry = {}
        for key in keys:
            values = [s[key] for s in summaries if key in s]
            if values:
                entry[key] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values,
                }
        table[algorithm] = entry
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"algorithms-{args.recipe.stem}{'-' + args.tag if args.tag else ''}.json"
    setting = {"recipe": str(args.recipe), "overrides": args.overrides, "seeds": args.seeds}
    previous = json.loads(path.read_text()) if path.exists() else {}
    if all(previous.get(k) == v for k, v in setting.items()):  # same setting: update only what was re-run
        table = {**previous.get("algorithms", {}), **table}
    result = {
        **setting,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": False},
        "algorithms": table,
    }
    atomic_write_json(path, result)
    header = f"{'algorithm':28} {'acc mean':>9} {'acc min':>8} {'CAS':>6} {'CAS0':>6} {'FID':>7} {'up B':>8} {'s':>6}"
    print(header)
    for algorithm, entry in table.items():

        def get(key: str, fmt: str = "{:.3f}", entry: dict = entry) -> str:
            return fmt.format(entry[key]["mean"]) if key in entry else "-"

        print(
            f"{algorithm:28} {get('client_accuracy_mean'):>9} {get('client_accuracy_min'):>8} "
            f"{get('generator_cas'):>6} {get('generator_cas_initial'):>6} {get('generator_fid', '{:.0f}'):>7} "
            f"{get('bytes_up_per_client_round', '{:.0f}'):>8} {get('wall_seconds', '{:.0f}'):>6}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
