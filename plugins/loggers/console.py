"""Prints one line per round to the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmmkt_core.interfaces import Logger


def _kb(value: float) -> str:
    return f"{value / 1024:.1f} KiB"


class ConsoleLogger(Logger):
    """A compact per-round line: accuracy, generator score, bytes, time."""

    def start(self, run_dir: Path, resolved_recipe: dict[str, Any]) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.rounds = resolved_recipe["federation"]["rounds"]

    def log_round(self, round_index: int, metrics: dict[str, Any]) -> None:
        parts = [f"round {round_index + 1}/{self.rounds}"]
        if "client_accuracy_mean" in metrics:
            parts.append(f"acc mean {metrics['client_accuracy_mean']:.3f} min {metrics['client_accuracy_min']:.3f}")
        if "generator_cas" in metrics:
            parts.append(f"CAS {metrics['generator_cas']:.3f}")
        parts.append(f"up {_kb(metrics['bytes_up_per_client'])} down {_kb(metrics['bytes_down_per_client'])}/client")
        if metrics.get("failures"):
            parts.append(f"[red]{len(metrics['failures'])} client failure(s)[/red]")
        parts.append(f"{metrics.get('seconds_round', 0.0):.1f} s")
        self.console.print(" | ".join(parts))

    def finish(self, summary: dict[str, Any]) -> None:
        self.console.print(
            f"[bold]done[/bold]: {summary['rounds_completed']} rounds in {summary['wall_seconds']:.1f} s"
        )
