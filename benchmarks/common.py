"""What every benchmark shares: the results folder, the machine description, atomic JSON, spreads."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def set_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads (float results depend on it) and return the count in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.is_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": git_commit(),
    }


def merged_machine(measured_at: set[str]) -> dict[str, Any]:
    """:func:`machine` for a results file that merges other workers' files: ``commit`` is the merging
    checkout's, ``measured_at`` the commits the merged runs were measured at (their files' ``machine.commit``,
    plus this checkout's when it ran cells itself)."""
    here = machine()
    return {**here, "measured_at": sorted(measured_at)} if measured_at else here


def earlier_commits(previous: dict[str, Any]) -> set[str]:
    """The commits a results file's runs were measured at, as far as it records them (see merged_machine)."""
    recorded = previous.get("machine", {})
    return set(recorded.get("measured_at") or ([recorded["commit"]] if recorded.get("commit") else []))


def atomic_write_json(path: Path, data: Any) -> None:
    """Every benchmark writes its results JSON through this (indented, then renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max (and mean, std) of repeated measurements."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "n": len(values),
    }


def paired_interval(differences: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of per-seed paired differences with its two-sided Student-t interval (every difference kept)."""
    from scipy import stats

    n = len(differences)
    mean = statistics.fmean(differences)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n, "per_seed": differences}
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(differences) / n**0.5
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "per_seed": differences}


def git_commit() -> str:
    """The commit the benchmark ran at (``-dirty`` when the work tree had changes), or ``unknown``."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def alternating_seconds(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call over ``repeats`` rounds, after one untimed warm-up each. The order flips
    every other round, so a slow drift of the machine weighs on every call alike."""
    for call in calls.values():
        call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(repeats):
        for name in list(calls) if repeat % 2 == 0 else list(reversed(calls)):
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def demo_generator(recipe_path: Path, overrides: list[str], cache: Path | None = None) -> tuple[Any, Any]:
    """``(generator, splits)``: the recipe's generator built as a run builds it (seed, cache, public split);
    ``cache`` replaces the run's cache folder (e.g. an empty one, to time a pre-training)."""
    from fedmmkt_core.cache import cache_dir
    from fedmmkt_core.loading import load_data
    from fedmmkt_core.recipe import load_recipe
    from fedmmkt_core.seeding import derive_seed

    recipe = load_recipe(recipe_path, ["loggers=[]", *overrides])
    splits, _ = load_data(recipe)
    generator = recipe.build("generator", recipe.generator)
    generator.build(
        splits.task, seed=derive_seed(recipe.seed, "generator"), cache_dir=cache or cache_dir(), public=splits.public
    )
    return generator, splits
