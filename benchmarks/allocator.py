"""The demo's rounds with and without the run's malloc tuning (``fedmmkt_core.allocator``).

    python -m benchmarks allocator [--rounds 3] [--repeats 2]

Runs ``fedmmkt run examples/digits.yaml`` for a few rounds in fresh processes, alternating the tuned
allocator with ``FEDMMKT_MALLOC_TUNING=0`` (the pre-trained generator and oracle come from the cache; a
first untimed run fills it). Per process: the rounds' wall time and phase times, minor page faults,
system CPU time, peak memory; and whether the two settings' metrics agree bit for bit (they must: the
allocator never changes a computed value). Writes ``benchmarks/results/allocator-digits.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .common import RESULTS, atomic_write_json, machine, spread

RECIPE = Path("examples/digits.yaml")
RESULT_FILE = RESULTS / "allocator-digits.json"
SETTINGS = {"tuned": {}, "untuned": {"FEDMMKT_MALLOC_TUNING": "0"}}


def run_once(rounds: int, out: Path, extra_env: dict[str, str]) -> dict[str, Any]:
    """One ``fedmmkt run`` in a fresh process: its rows (metrics.jsonl) and its resource usage."""
    shutil.rmtree(out, ignore_errors=True)
    from fedmmkt_core.allocator import default_environment

    env = default_environment(os.environ)
    env.update(extra_env, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "fedmmkt_cli.main", "run", str(RECIPE), "--out", str(out),
               "--set", f"federation.rounds={rounds}", "--set", "loggers=[]"]  # fmt: skip
    log = out.parent / f"{out.name}.stderr"
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fedmmkt run failed ({os.waitstatus_to_exitcode(status)}):\n{log.read_text()[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "usage": usage}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks allocator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-allocator"))
    args = parser.parse_args(argv)
    print("filling the cache (one untimed round) ...", flush=True)
    run_once(1, args.out / "warm-up", {})
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    metrics: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for name, env in SETTINGS.items() if repeat % 2 == 0 else reversed(SETTINGS.items()):
            result = run_once(args.rounds, args.out / f"{name}-{repeat}", env)
            rows, usage = result["rows"], result["usage"]
            phases: dict[str, float] = {}
            for row in rows:
                for key, value in row.items():
                    if key.startswith("seconds_") and key != "seconds_round":
                        phases[key[8:]] = phases.get(key[8:], 0.0) + value
            measured[name].append({
                "rounds_seconds": sum(row["seconds_round"] for row in rows),
                "phase_seconds": phases,
                "minor_page_faults": usage.ru_minflt,
                "system_seconds": usage.ru_stime,
                "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
            })  # fmt: skip
            metrics.setdefault(name, [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in rows])
            last = measured[name][-1]
            print(f"  {name:8} rounds {last['rounds_seconds']:6.1f} s, {last['minor_page_faults']:>9} minor faults, "
                  f"system {last['system_seconds']:5.1f} s", flush=True)  # fmt: skip
    same = metrics["tuned"] == metrics["untuned"]
    summary = {
        name: {
            "rounds_seconds": spread([m["rounds_seconds"] for m in runs]),
            "minor_page_faults": spread([float(m["minor_page_faults"]) for m in runs]),
            "system_seconds": spread([m["system_seconds"] for m in runs]),
            "peak_rss_mib": spread([m["peak_rss_mib"] for m in runs]),
            "phase_seconds_median": {
                phase: spread([m["phase_seconds"][phase] for m in runs])["median"] for phase in runs[0]["phase_seconds"]
            },
        }
        for name, runs in measured.items()
    }
    saved = summary["untuned"]["rounds_seconds"]["median"] - summary["tuned"]["rounds_seconds"]["median"]
    print(f"{args.rounds} rounds: tuned saves {saved:.1f} s (median); metrics identical: {same}")
    atomic_write_json(RESULT_FILE, {
        "command": f"python -m benchmarks allocator --rounds {args.rounds} --repeats {args.repeats}",
        "recipe": str(RECIPE), "rounds": args.rounds, "machine": machine(), "metrics_identical": same,
        "summary": summary, "runs": measured,
    })  # fmt: skip
    print(f"wrote {RESULT_FILE}")
    if not same:
        raise SystemExit("the tuned and untuned runs' metrics differ: the allocator must never change a value")


if __name__ == "__main__":
    main()
