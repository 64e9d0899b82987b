"""The accuracy cost of differential privacy on the uploaded soft labels, against the ε it buys.

    python -m benchmarks.privacy [--recipe examples/digits.yaml] [--noise 0.25 1 4] [--seeds 0] [--set K=V ...]

One run without privacy (unless --skip-baseline), then one per noise multiplier (``privacy: {noise_multiplier: z}``, the
recipe's clip norm or 5.0). Reports client accuracy, generator CAS and the ε spent at δ=1e-5.
Writes (merging with earlier runs) ``benchmarks/results/privacy-<recipe>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from fedmmkt_core.recipe import load_recipe
from fedmmkt_core.server.runner import Runner

from .common import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("examples/digits.yaml"))
    parser.add_argument("--noise", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    parser.add_argument("--clip", type=float, default=5.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-privacy"))
    parser.add_argument("--skip-baseline", action="store_true", help="keep the stored run without privacy")
    args = parser.parse_args()

    target = RESULTS / f"privacy-{args.recipe.stem}.json"
    earlier = json.loads(target.read_text()) if target.exists() else {}
    baseline = [] if args.skip_baseline else [None]
    runs = [(seed, noise) for seed in args.seeds for noise in [*baseline, *args.noise]]
    rows = [r for r in earlier.get("results", []) if (r["seed"], r["noise_multiplier"]) not in runs]
    for seed, noise in runs:
        settings = [*args.overrides, f"seed={seed}"]
        if noise is not None:
            settings.append(f"privacy={{noise_multiplier: {noise}, clip_norm: {args.clip}}}")
        label = "none" if noise is None else f"z={noise:g}"
        print(f"running privacy {label} seed {seed} ...", flush=True)
        start = time.perf_counter()
        summary = Runner(load_recipe(args.recipe, settings), args.out / f"{label}-seed{seed}").run()
        rows.append(
            {
                "seed": seed,
                "noise_multiplier": noise,
                "clip_norm": args.clip if noise is not None else None,
                "epsilon": summary.get("privacy_epsilon"),
                "client_accuracy_mean": summary["client_accuracy_mean"],
                "client_accuracy_min": summary["client_accuracy_min"],
                "generator_cas": summary.get("generator_cas"),
                "rounds": summary["rounds_completed"],
                "wall_seconds": time.perf_counter() - start,
            }
        )

    print(f"\n{'noise':>6} {'epsilon':>9} {'acc mean':>9} {'acc min':>8} {'CAS':>6}")
    for row in rows:
        noise = "none" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:g}"
        epsilon = "inf" if row["epsilon"] is None else f"{row['epsilon']:.1f}"
        cas = row["generator_cas"]
        print(
            f"{noise:>6} {epsilon:>9} {row['client_accuracy_mean']:9.3f} {row['client_accuracy_min']:8.3f} "
            f"{cas if cas is None else f'{cas:.3f}':>6}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: (r["seed"], -1.0 if r["noise_multiplier"] is None else r["noise_multiplier"]))
    command = (
        f"python -m benchmarks.privacy --recipe {args.recipe} --noise {' '.join(f'{z:g}' for z in args.noise)} "
        f"--clip {args.clip:g} --seeds {' '.join(map(str, args.seeds))}"
        + (" --skip-baseline" if args.skip_baseline else "")
    ) + "".join(f" --set {o}" for o in args.overrides)
    payload = {
        "commands": [*earlier.get("commands", []), command],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": False},
        "delta": 1e-5,
        "results": rows,
    }
    atomic_write_json(target, payload)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
