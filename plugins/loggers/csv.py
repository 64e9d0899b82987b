"""Writes the scalar metrics of every round to a CSV file in the run directory."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from pydantic import Field

from fedmmkt_core.interfaces import ComponentConfig, Logger
from fedmmkt_core.rundir import atomic_write_text


class CSVConfig(ComponentConfig):
    filename: str = Field("metrics.csv", description="file name inside the run directory")


class CSVLogger(Logger):
    """One row per round, one column per scalar metric (for spreadsheets and pandas)."""

    Config = CSVConfig
    config: CSVConfig

    def start(self, run_dir: Path, resolved_recipe: dict[str, Any]) -> None:
        self.path = Path(run_dir) / self.config.filename
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with self.path.open(newline="", encoding="utf-8") as handle:
                self.rows = list(csv.DictReader(handle))

    def log_round(self, round_index: int, metrics: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if str(r.get("round")) != str(round_index + 1)]
        self.rows.append({k: v for k, v in metrics.items() if isinstance(v, int | float | str)})
        columns: list[str] = []
        for row in self.rows:
            columns += [c for c in row if c not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())
