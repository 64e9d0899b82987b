"""The same recipe in-process, on a Flower deployment and on Flower's simulation engine.

    python -m benchmarks flower [--rounds 2] [--repeats 1]

The smoke recipe with 3 clients, run through the ``fedmmkt`` CLI three ways, every process with one
torch thread (several torch processes share 2 cores): the in-process backend; a local Flower
deployment (a SuperLink and 3 SuperNodes on 127.0.0.1, started before the clock starts); Flower's
simulation engine (its start-up is part of the run). Reports the whole command's wall time, each
round's wall time, bytes per client per round (the toolkit's count and as Flower serialises them),
and whether the metrics equal the in-process run's. Writes ``benchmarks/results/flower-digits.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import RESULTS, atomic_write_json, machine, spread

RECIPE = Path("examples/smoke.yaml")
RESULT_FILE = RESULTS / "flower-digits.json"
SIMULATION = "backend={name: flower, params: {mode: simulation, num_cpus_per_client: 1, ray_num_cpus: 2}}"


def fedmmkt_run(overrides: list[str], out: Path, env: dict[str, str]) -> float:
    command = [sys.executable, "-c", "from fedmmkt_cli.main import main; main()", "run", str(RECIPE), "--out", str(out)]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fedmmkt run failed ({' '.join(overrides)}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def read_run(out: Path) -> dict[str, Any]:
    from fedmmkt_core.rundir import RunDirectory

    rows = RunDirectory(out).read_metrics()
    result: dict[str, Any] = {
        "round_seconds": [row["seconds_round"] for row in rows],
        "phase_seconds": {
            k[8:]: [row[k] for row in rows] for k in rows[0] if k.startswith("seconds_") and k != "seconds_round"
        },
        "bytes_up_per_client": [row["bytes_up_per_client"] for row in rows],
        "bytes_down_per_client": [row["bytes_down_per_client"] for row in rows],
        "metrics": [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in rows],
    }
    wire = out / "flower_wire.jsonl"
    if wire.exists():
        messages = [json.loads(line) for line in wire.read_text().splitlines() if line.strip()]
        toolkit = sum(m["down_toolkit_bytes"] + m["up_toolkit_bytes"] for m in messages)
        flower = sum(m["down_flower_bytes"] + m["up_flower_bytes"] for m in messages)
        result["flower_bytes_over_toolkit_bytes"] = flower / toolkit
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks flower", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-flower"))
    args = parser.parse_args(argv)
    # a terminated benchmark still stops the SuperLink and SuperNodes it started (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from fedmmkt_plugins.backends.flower import LocalFederation

    overrides = ["clients.0.count=2", "clients.1.count=1", f"federation.rounds={args.rounds}", "loggers=[]"]
    work = Path(tempfile.mkdtemp(prefix="fedmmkt-bench-flower-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_HOME": str(work / "flwr-home"), "HF_HUB_OFFLINE": "1"}
    os.environ.update({k: env[k] for k in ("OMP_NUM_THREADS", "FLWR_HOME")})  # for the SuperNodes we start
    runs: dict[str, list[dict[str, Any]]] = {"inprocess": [], "deployment": [], "simulation": []}
    print("  warm-up (caches the smoke recipe's generator and oracle; not timed) ...", flush=True)
    fedmmkt_run([*overrides[:-2], "federation.rounds=1", "loggers=[]"], work / "warm-up", env)
    federation = LocalFederation(3, work / "federation")
    federation.start()
    try:
        deployment = f'backend={{name: flower, params: {{superlink: "{federation.address}", insecure: true}}}}'
        for repeat in range(args.repeats):
            for mode, extra in (("inprocess", []), ("deployment", [deployment]), ("simulation", [SIMULATION])):
                out = args.out / f"{mode}-{repeat}"
                shutil.rmtree(out, ignore_errors=True)
                print(f"  {mode} (repeat {repeat + 1}) ...", flush=True)
                seconds = fedmmkt_run([*overrides, *extra], out, env)
                run = {"command_seconds": seconds, **read_run(out)}
                print(f"    {seconds:.1f} s, rounds {[round(s, 1) for s in run['round_seconds']]}", flush=True)
                runs[mode].append(run)
    finally:
        federation.stop()
    reference = runs["inprocess"][0]["metrics"]
    summary = {}
    for mode, repeats in runs.items():
        summary[mode] = {
            "command_seconds": spread([r["command_seconds"] for r in repeats]),
            "round_seconds": spread([s for r in repeats for s in r["round_seconds"]]),
            "bytes_up_per_client_round": spread([b for r in repeats for b in r["bytes_up_per_client"]]),
            "bytes_down_per_client_round": spread([b for r in repeats for b in r["bytes_down_per_client"]]),
            "metrics_equal_inprocess": all(r["metrics"] == reference for r in repeats),
            "phase_seconds": {
                phase: spread([v for r in repeats for v in r["phase_seconds"].get(phase, [])])
                for phase in repeats[0]["phase_seconds"]
            },
        }
        ratios = [r["flower_bytes_over_toolkit_bytes"] for r in repeats if "flower_bytes_over_toolkit_bytes" in r]
        if ratios:
            summary[mode]["flower_bytes_over_toolkit_bytes"] = spread(ratios)
    command = f"python -m benchmarks flower --rounds {args.rounds} --repeats {args.repeats}"
    atomic_write_json(RESULT_FILE, {
        "command": command, "recipe": str(RECIPE), "overrides": overrides, "torch_threads": 1,
        "machine": machine(), "summary": summary,
    })  # fmt: skip
    for mode, data in summary.items():
        print(
            f"{mode:11} command {data['command_seconds']['median']:6.1f} s  "
            f"round {data['round_seconds']['median']:5.1f} s  metrics equal: {data['metrics_equal_inprocess']}"
        )
    print(f"wrote {RESULT_FILE}")


if __name__ == "__main__":
    main()
