"""A run's summary (``summary.json``): totals over its rounds and the last round's headline metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedmmkt_core.recipe import Recipe

SUMMARY_FROM_LAST_ROUND = (
    "client_accuracy_mean",
    "client_accuracy_min",
    "generator_cas_initial",
    "generator_cas",
    "generator_fid_initial",
    "generator_fid",
    "alignment_rate",
    "privacy_epsilon",
)


def run_summary(recipe: Recipe, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of a run whose ``metrics.jsonl`` rows are ``rows``."""
    last = rows[-1] if rows else {}
    summary: dict[str, Any] = {
        "name": recipe.name,
        "algorithm": recipe.algorithm.name,
        "seed": recipe.seed,
        "rounds_completed": len(rows),
        "bytes_up_per_client_round": float(np.mean([r["bytes_up_per_client"] for r in rows])) if rows else 0.0,
        "bytes_down_per_client_round": float(np.mean([r["bytes_down_per_client"] for r in rows])) if rows else 0.0,
        "wall_seconds": float(sum(r.get("seconds_round", 0.0) for r in rows)),
        "client_failures": int(sum(len(r.get("failures", [])) for r in rows)),
    }
    for key in SUMMARY_FROM_LAST_ROUND:
        if key in last:
            summary[key] = last[key]
    if rows and "client_accuracy_mean" in rows[0]:
        summary["client_accuracy_mean_first_round"] = rows[0]["client_accuracy_mean"]
    return summary
