"""Scale: per-round time and peak memory against the number of clients and the synthetic set's size.

    python -m benchmarks scale [--clients 5 20 100] [--samples-per-class 10 50 200] [--threads N]

Every point is a FedMMKT run of the digits recipe in its own process (so its peak resident memory is
its own), in-process backend, homogeneous ResNet clients on an IID split (100 clients leave ~8 private
images each; a Dirichlet split would leave some clients empty). The client sweep runs twice: clients
materialised one at a time (``resident_clients: 0``, the default) and every client kept built
(``resident_clients: N``), to show what the default saves. Slopes are least-squares fits. Writes
``benchmarks/results/scale-digits.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import RESULTS, atomic_write_json, machine, set_threads

RECIPE = Path("examples/digits.yaml")
RESULT_FILE = RESULTS / "scale-digits.json"
CLIENT_PHASES = ("fit", "evaluate", "aggregate")
RESNET = {
    "name": "resnet",
    "params": {"epochs": 20, "batch_size": 32, "lr": 0.003, "embedding_size": 32, "hidden_sizes": [32, 64]},
}
# The generator's work is kept the same at every point (every pair in the fine-tuning pool: threshold 0;
# otherwise weak clients that agree on nothing would skip it) and trimmed so the sweep is quick.
COMMON = [
    "federation.rounds=3",
    "alignment_losses=[{name: weighted-denoising, params: {threshold: 0.0}}]",
    "loggers=[]",
    "data.partitioner={name: iid}",
    "algorithm.params.evaluate_generator=false",
    "generator.params.fine_tune_steps=50",
]


def point_overrides(clients: int, samples_per_class: int, resident: int) -> list[str]:
    return [
        *COMMON,
        f"clients=[{json.dumps({**RESNET, 'count': clients})}]",
        f"algorithm.params.samples_per_class={samples_per_class}",
        f"backend={json.dumps({'name': 'inprocess', 'params': {'resident_clients': resident}})}",
    ]


def run_point(overrides: list[str], out: Path) -> dict[str, Any]:
    """Inside the child process: one run; per-round wall time and this process's peak memory."""
    import shutil

    from fedmmkt_core.recipe import load_recipe
    from fedmmkt_core.server.runner import Runner

    shutil.rmtree(out, ignore_errors=True)
    recipe = load_recipe(RECIPE, overrides)
    started: dict[int, float] = {}
    rounds: list[dict[str, Any]] = []

    def events(kind: str, **data: Any) -> None:
        if kind == "round_start":
            started[data["round"]] = time.perf_counter()
        elif kind == "round_end":
            row = data["metrics"]
            rounds.append(
                {
                    "wall_seconds": time.perf_counter() - started[data["round"]],
                    "phase_seconds": {k[8:]: v for k, v in row.items() if k.startswith("seconds_")},
                    "synthetic_images": row.get("synthetic_images"),
                    "rss_mib": resident_mib(),
                    # trimming changes later rounds' memory: only after the last one
                    "rss_trimmed_mib": trimmed_resident_mib() if data["round"] == recipe.federation.rounds else None,
                }
            )

    Runner(recipe, out, events=events).run()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"rounds": rounds, "peak_rss_mib": peak_kib / 1024}


def resident_mib() -> float:
    """This process's resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def trimmed_resident_mib() -> float:
    """Resident memory after garbage collection and glibc's ``malloc_trim``: live memory, without the
    freed-but-kept pages a process accumulates when it builds and drops many models."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return resident_mib()


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    den = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def child(point: dict[str, Any], threads: int | None, out: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.scale", "--point", json.dumps(point), "--out", str(out)]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"scale point {point} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sweep(name: str, key: str, points: list[dict[str, Any]], threads: int | None, out: Path) -> dict[str, Any]:
    results = []
    for point in points:
        print(f"  {name}: {point} ...", flush=True)
        measured = child(point, threads, out / f"{name}-{'-'.join(f'{k}{v}' for k, v in point.items())}")
        later = measured["rounds"][1:]  # round 1 has no distillation set yet
        summary = {
            "round_seconds": sum(r["wall_seconds"] for r in later) / len(later),
            "client_phase_seconds": sum(sum(r["phase_seconds"].get(p, 0.0) for p in CLIENT_PHASES) for r in later)
            / len(later),
            "rss_after_round_mib": max(r["rss_mib"] for r in measured["rounds"]),
            "live_after_last_round_mib": measured["rounds"][-1]["rss_trimmed_mib"],
        }
        print(
            f"    round {summary['round_seconds']:.1f} s (clients' phases {summary['client_phase_seconds']:.1f} s), "
            f"memory after a round {summary['rss_after_round_mib']:.0f} MiB "
            f"(live {summary['live_after_last_round_mib']:.0f} MiB), peak {measured['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
        results.append({**point, **measured, **summary})
    xs = [float(r[key]) for r in results]
    return {
        "points": results,
        "unit": key,
        "slopes": {
            field: slope(xs, [r[field] for r in results])
            for field in (
                "round_seconds",
                "client_phase_seconds",
                "rss_after_round_mib",
                "live_after_last_round_mib",
                "peak_rss_mib",
            )
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 20, 100])
    parser.add_argument("--samples-per-class", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point in this process
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    if args.point:
        point = json.loads(args.point)
        overrides = point_overrides(point["clients"], point["samples_per_class"], point["resident_clients"])
        print(json.dumps(run_point(overrides, args.out)))
        return

    print("clients, materialised one at a time:", flush=True)
    lazy = sweep("clients", "clients", [
        {"clients": n, "samples_per_class": 50, "resident_clients": 0} for n in args.clients
    ], args.threads, args.out)  # fmt: skip
    print("clients, all kept built:", flush=True)
    resident = sweep("clients-resident", "clients", [
        {"clients": n, "samples_per_class": 50, "resident_clients": n} for n in args.clients
    ], args.threads, args.out)  # fmt: skip
    print("synthetic set size (5 clients):", flush=True)
    synthetic = sweep("synthetic", "samples_per_class", [
        {"clients": 5, "samples_per_class": s, "resident_clients": 0} for s in args.samples_per_class
    ], args.threads, args.out)  # fmt: skip
    command = "python -m benchmarks scale --clients " + " ".join(map(str, args.clients))
    command += " --samples-per-class " + " ".join(map(str, args.samples_per_class))
    command += f" --threads {args.threads}" if args.threads else ""
    result = {
        "command": command,
        "recipe": str(RECIPE),
        "common_overrides": COMMON,
        "torch_threads": threads,
        "machine": machine(),
        "clients": lazy,
        "clients_all_resident": resident,
        "synthetic_set": synthetic,
    }
    atomic_write_json(RESULT_FILE, result)
    for label, data in (("clients (one at a time)", lazy), ("clients (all resident)", resident)):
        slopes = data["slopes"]
        print(
            f"{label}: per extra client {slopes['round_seconds']:.3f} s a round "
            f"({slopes['client_phase_seconds']:.3f} s in the clients' phases), "
            f"{slopes['rss_after_round_mib']:.2f} MiB after a round (live {slopes['live_after_last_round_mib']:.2f}), "
            f"{slopes['peak_rss_mib']:.2f} MiB peak"
        )
    slopes = synthetic["slopes"]  # per sample per class = 10 images
    print(
        f"synthetic set: per 1000 extra images {slopes['round_seconds'] * 100:.1f} s a round, "
        f"{slopes['rss_after_round_mib'] * 100:.0f} MiB after a round, {slopes['peak_rss_mib'] * 100:.0f} MiB peak"
    )
    print(f"wrote {RESULT_FILE}")


if __name__ == "__main__":
    main()
