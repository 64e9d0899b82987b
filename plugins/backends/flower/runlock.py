"""The run directory's status file and lock, shared by the ServerApp and the launcher."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path
from typing import Any

from fedmmkt_core.errors import UserError

STATUS_FILE = "flower_status.json"  # written by the ServerApp: finished / failed, and why
LOCK_FILE = "flower.lock"  # held (flock) by the ServerApp serving a run directory while it runs


def run_lock(out: Path, wait_seconds: float = 2.0) -> Any:
    """Take the run directory's lock, or raise UserError when another ServerApp holds it. The lock
    goes with the process (also when it is killed: the kernel releases it shortly after the process
    died, hence ``wait_seconds``); keep the returned file open while running."""
    handle = open(out / LOCK_FILE, "a")  # noqa: SIM115 - held for the run
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except OSError:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
        handle.close()
        raise UserError(
            f"a Flower run is still serving {out} (its ServerApp holds {LOCK_FILE}): wait for it or stop it "
            "with `flwr stop RUN_ID CONNECTION` (CONNECTION: a [superlink.NAME] entry of your Flower config "
            "naming this SuperLink; see docs/flower.md), then resume"
        ) from None
