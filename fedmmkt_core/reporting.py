"""Tables and plots from run directories (``fedmmkt report`` / ``fedmmkt compare``)."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from .errors import UserError
from .lazy import lazy_import
from .paths import check_output_folder, file_kind, read_regular
from .rundir import RunDirectory

plt = lazy_import("matplotlib.pyplot", "Install it with: pip install matplotlib")

CURVES = (
    ("client_accuracy_mean", "client accuracy (mean)"),
    ("client_accuracy_min", "client accuracy (min)"),
    ("generator_cas", "generator CAS"),
    ("alignment_rate", "alignment rate"),
    ("bytes_up_per_client", "bytes up per client"),
)


MAX_METRICS_BYTES = 256 * 1024 * 1024  # metrics.jsonl: one line per round
MAX_SUMMARY_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 32  # a metrics row or summary nests a few levels; deeper is not a fedmmkt file
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def load_run(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, metric rows) of a run directory, with a clear error when it is not one: a fedmmkt run
    holds ``recipe.resolved.yaml``, metric rows are JSON objects with a whole-number ``round``, and every
    file read is a regular file of bounded size."""
    run = RunDirectory(Path(path))
    try:
        mode = os.stat(run.root).st_mode
    except FileNotFoundError:
        raise UserError(f"run directory not found: {run.root}") from None
    except OSError as exc:
        raise UserError(f"cannot read the run directory {run.root}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(mode):
        raise UserError(f"{run.root} is {file_kind(mode)}, not a fedmmkt run directory")
    if not os.path.lexists(run.recipe_path):
        raise UserError(
            f"{run.root} is not a fedmmkt run directory: it holds no {run.recipe_path.name} (written by `fedmmkt run`)"
        )
    rows = _read_metrics(run.metrics_path) if os.path.lexists(run.metrics_path) else []
    if os.path.lexists(run.summary_path):
        summary = _read_json(run.summary_path, MAX_SUMMARY_BYTES)
        if not isinstance(summary, dict):
            raise UserError(f"{run.summary_path} is not a fedmmkt summary: a JSON object, not {type(summary).__name__}")
    elif rows:
        summary = {"rounds_completed": len(rows), "unfinished": True}
    else:
        raise UserError(f"{run.root} has neither summary.json nor metrics.jsonl: not a fedmmkt run directory")
    return summary, rows


def _decode(path: Path, max_bytes: int) -> str:
    raw = read_regular(path, "file", max_bytes)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}): not a file fedmmkt wrote") from None


def _parse(text: str, where: str) -> Any:
    try:
        value = json.loads(text)
    except RecursionError:
        raise UserError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, and integers over Python's 4300 digits
        raise UserError(f"{where}: not valid JSON ({exc})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise UserError(f"{where}: nested more than {MAX_JSON_DEPTH} levels deep: not a file fedmmkt wrote")
    return value


def _read_json(path: Path, max_bytes: int) -> Any:
    return _parse(_decode(path, max_bytes), str(path))


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(_decode(path, MAX_METRICS_BYTES).splitlines(), 1):
        if not line.strip():
            continue
        row = _parse(line, f"{path}:{number}")
        round_index = row.get("round") if isinstance(row, dict) else None
        if not isinstance(round_index, int) or isinstance(round_index, bool) or round_index < 1:
            raise UserError(
                f"{path}:{number}: not a fedmmkt metrics row (a JSON object with a whole-number 'round' from 1): "
                "not a fedmmkt run directory"
            )
        rows.append(row)
    return rows


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        if isinstance(item, dict):
            stack += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, depth + 1) for v in item]
    return deepest


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def numeric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every metric that is a finite number in some row (a plugin's own metrics included), first seen first."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update((key, None) for key, value in row.items() if _number(value))
    return list(columns)


def other_last_round_metrics(rows: list[dict[str, Any]], shown: list[str]) -> dict[str, float]:
    """The last round's numeric metrics not in ``shown`` (what `fedmmkt report` lists below its table)."""
    last = rows[-1] if rows else {}
    return {key: value for key, value in last.items() if _number(value) and key not in shown}


def check_plot_path(path: Path) -> None:
    """Refuse, before any work, a plot path matplotlib cannot write or that names another kind of file."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UserError(f"plot {path}: name it {', '.join(PLOT_SUFFIXES[:-1])} or {PLOT_SUFFIXES[-1]} (an image file)")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError(f"plot {path} is {file_kind(mode)}, not a file")
    check_output_folder(path.parent, "the plot's folder", probe=True)


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """One panel per metric present in the rows, one line per run; returns the PNG path or None."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.ticker import MaxNLocator

    present = [
        (key, title) for key, title in CURVES if any(_number(r.get(key)) for rows in runs.values() for r in rows)
    ]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
    for axis, (key, title) in zip(axes[0], present, strict=True):
        for label, rows in runs.items():
            points = [(r["round"], r[key]) for r in rows if _number(r.get(key))]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=label)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(title)
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise UserError(f"cannot write the plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path
