"""Tables and plots from run directories (``fedmmkt report`` / ``fedmmkt compare``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError
from .lazy import lazy_import
from .rundir import RunDirectory

plt = lazy_import("matplotlib.pyplot", "Install it with: pip install matplotlib")

CURVES = (
    ("client_accuracy_mean", "client accuracy (mean)"),
    ("client_accuracy_min", "client accuracy (min)"),
    ("generator_cas", "generator CAS"),
    ("alignment_rate", "alignment rate"),
    ("bytes_up_per_client", "bytes up per client"),
)


def load_run(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, metric rows) of a run directory, with a clear error when it is not one."""
    run = RunDirectory(Path(path))
    if not run.root.is_dir():
        raise UserError(f"run directory not found: {run.root}")
    rows = run.read_metrics()
    if run.summary_path.exists():
        try:
            summary = json.loads(run.summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{run.summary_path} is not valid JSON ({exc})") from None
    elif rows:
        summary = {"rounds_completed": len(rows), "unfinished": True}
    else:
        raise UserError(f"{run.root} has neither summary.json nor metrics.jsonl: not a fedmmkt run directory")
    return summary, rows


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """One panel per metric present in the rows, one line per run; returns the PNG path or None."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.ticker import MaxNLocator

    present = [(key, title) for key, title in CURVES if any(key in r for rows in runs.values() for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
    for axis, (key, title) in zip(axes[0], present, strict=True):
        for label, rows in runs.items():
            points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=label)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(title)
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
