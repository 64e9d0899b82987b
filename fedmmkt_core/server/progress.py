"""Progress of long phases (pre-training, fine-tuning): progress-bar events and log lines."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fedmmkt")


def progress_events(events: Callable[..., Any]) -> Callable[[str, int, int], None]:
    """A ``progress(task, completed, total)`` callback that sends the phase events progress bars follow and
    logs each phase's start and every quarter of it (``log.txt``), so work away from a terminal (a batch
    job, a GPU machine) shows where its time goes."""
    seen: dict[str, tuple[int, int, float]] = {}  # task -> (steps done, quarters logged, start time)

    def progress(task: str, completed: int, total: int) -> None:
        if task not in seen:
            seen[task] = (0, 0, time.perf_counter())
            log.info("%s: started (%d steps)", task, total)
            events("phase_start", name=task, total=total)
        done, quarters, start = seen[task]
        if total > 0 and 4 * completed // total > quarters:
            quarters = 4 * completed // total
            log.info("%s: %d/%d after %.0f s", task, completed, total, time.perf_counter() - start)
        if completed > done:
            events("phase_advance", name=task, advance=completed - done)
        seen[task] = (max(done, completed), quarters, start)

    return progress
