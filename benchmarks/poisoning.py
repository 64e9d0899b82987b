"""Robust KD aggregation against a poisoning client, measured: clean vs attacked, plain mean vs robust.

    python -m benchmarks.poisoning [--recipe examples/digits.yaml] [--honest 2 2] [--seeds 0] [--set K=V ...]

The recipe's client groups are cut to ``--honest`` clients each and one more client, a copy of the
first group, uploads poisoned soft labels (``fault: {type: poison}``: confident wrong labels and
class counts inflated 10,000x). A recipe that already has a faulty group (examples/poisoning.yaml)
is used as it is. Per seed and aggregator (plain class-aware mean, class-aware median, screen) a
clean and an attacked run; client accuracy is the honest clients' mean. Writes (merging with earlier
runs) ``benchmarks/results/poisoning-<recipe>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import yaml

from fedmmkt_core.recipe import load_recipe
from fedmmkt_core.server.runner import Runner

from .common import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
AGGREGATORS = {"mean": "none", "median": "median", "screen": "screen"}  # variant name -> kd `robust`


def attacked_recipe(source: Path, honest: list[int] | None, fault: str) -> tuple[dict, int]:
    """The recipe as data with one faulty group, and that group's index."""
    data = yaml.safe_load(source.read_text(encoding="utf-8"))
    for index, group in enumerate(data["clients"]):
        if group.get("fault"):
            return data, index
    if honest:
        if len(honest) != len(data["clients"]):
            raise SystemExit(f"--honest needs one count per client group ({len(data['clients'])})")
        for group, count in zip(data["clients"], honest, strict=True):
            group["count"] = count
    attacker = copy.deepcopy(data["clients"][0])
    attacker.update(count=1, fault={"type": fault})
    data["clients"].append(attacker)
    return data, len(data["clients"]) - 1


def honest_accuracy(row: dict, attackers: set[str]) -> tuple[float, float]:
    values = [v for k, v in row["client_accuracy"].items() if k not in attackers]
    return sum(values) / len(values), min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("examples/digits.yaml"))
    parser.add_argument("--honest", type=int, nargs="+", help="honest clients per group (default: as the recipe)")
    parser.add_argument("--fault", default="poison")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--aggregators", nargs="+", choices=sorted(AGGREGATORS), default=list(AGGREGATORS))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-poisoning"))
    args = parser.parse_args()

    data, faulty = attacked_recipe(args.recipe, args.honest, args.fault)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe_file = args.out / f"{args.recipe.stem}-attacked.yaml"
    recipe_file.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    before = sum(group.get("count", 1) for group in data["clients"][:faulty])
    attackers = {str(before + i) for i in range(data["clients"][faulty].get("count", 1))}

    target = RESULTS / f"poisoning-{args.recipe.stem}.json"
    earlier = json.loads(target.read_text()) if target.exists() else {}
    results: dict[str, list[dict]] = earlier.get("results", {})
    for variant in [f"{a}-{c}" for a in args.aggregators for c in ("clean", "attacked")]:
        results[variant] = [r for r in results.get(variant, []) if r["seed"] not in args.seeds]
    for seed in args.seeds:
        for aggregator in args.aggregators:
            for attacked in (False, True):
                variant = f"{aggregator}-{'attacked' if attacked else 'clean'}"
                settings = [*args.overrides, f"seed={seed}", f"aggregator.params.robust={AGGREGATORS[aggregator]}"]
                if not attacked:
                    settings.append(f"clients.{faulty}.fault=null")
                recipe = load_recipe(recipe_file, settings)
                print(f"running {variant} seed {seed} ...", flush=True)
                start = time.perf_counter()
                out = args.out / f"{variant}-seed{seed}"
                summary = Runner(recipe, out).run()
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                mean, low = honest_accuracy(rows[-1], attackers)
                results.setdefault(variant, []).append(
                    {
                        "seed": seed,
                        "honest_accuracy_mean": mean,
                        "honest_accuracy_min": low,
                        "generator_cas_initial": summary.get("generator_cas_initial"),
                        "generator_cas": summary.get("generator_cas"),
                        "generator_fid": summary.get("generator_fid"),
                        "alignment_rate": summary.get("alignment_rate"),
                        "wall_seconds": time.perf_counter() - start,
                    }
                )

    def average(variant: str, key: str) -> float:
        values = [r[key] for r in results[variant] if r[key] is not None]
        return sum(values) / len(values) if values else float("nan")

    print(f"\n{'variant':16} {'acc mean':>9} {'acc min':>8} {'CAS':>6}")
    for variant in sorted(v for v in results if results[v]):
        print(
            f"{variant:16} {average(variant, 'honest_accuracy_mean'):9.3f} "
            f"{average(variant, 'honest_accuracy_min'):8.3f} {average(variant, 'generator_cas'):6.3f}"
        )
    effect = {
        aggregator: {
            key: average(f"{aggregator}-attacked", key) - average(f"{aggregator}-clean", key)
            for key in ("honest_accuracy_mean", "generator_cas")
        }
        for aggregator in AGGREGATORS
        if results.get(f"{aggregator}-attacked") and results.get(f"{aggregator}-clean")
    }
    print("attacked - clean:", json.dumps(effect, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = (
        "python -m benchmarks.poisoning "
        + " ".join([f"--recipe {args.recipe}", *(["--honest", *map(str, args.honest)] if args.honest else [])])
        + f" --seeds {' '.join(map(str, args.seeds))} --aggregators {' '.join(args.aggregators)}"
        + "".join(f" --set {o}" for o in args.overrides)
    )
    payload = {
        "commands": [*earlier.get("commands", []), command],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": False},
        "fault": data["clients"][faulty]["fault"],
        "attackers": sorted(attackers),
        "results": results,
        "attacked_minus_clean": effect,
    }
    atomic_write_json(target, payload)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
