"""The ServerApp's main: the recipe's round loop, run by a :class:`~fedmmkt_core.runner.Runner` whose
backend is a :class:`~.backend.FlowerBackend` bound to this ServerApp's grid."""

from __future__ import annotations

import fcntl
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fedmmkt_core.errors import UserError

from .backend import FlowerBackend
from .codec import unb64

log = logging.getLogger("fedmmkt")

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
            "with `flwr stop RUN_ID`, then resume"
        ) from None


def serve(grid: Any, context: Any) -> None:
    """Run the recipe's round loop with this grid; write the status file."""
    from fedmmkt_core.recipe import parse_recipe
    from fedmmkt_core.runner import RunFailed, Runner

    config = context.run_config
    out = Path(str(config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s fedmmkt: %(message)s"))
    log.addHandler(handler)
    status: dict[str, Any] = {"status": "failed", "error": "unknown", "message": "the ServerApp stopped early"}
    lock = None
    try:
        lock = run_lock(out)
        recipe = parse_recipe(unb64(str(config["recipe"])), base_dir=str(config.get("base-dir", ".")))
        backend = recipe.build("backend", recipe.backend)
        if not isinstance(backend, FlowerBackend):
            raise UserError(f"the recipe's backend is '{recipe.backend.name}', not flower")
        Runner(recipe, out, resume=bool(config.get("resume", False)), backend=backend.bind(grid)).run()
        status = {"status": "finished"}
    except (RunFailed, UserError) as exc:
        status = {"status": "failed", "error": type(exc).__name__, "message": str(exc)}
        raise
    except Exception as exc:
        status = {"status": "failed", "error": type(exc).__name__, "message": f"{type(exc).__name__}: {exc}"}
        raise
    finally:
        log.removeHandler(handler)
        (out / STATUS_FILE).write_text(json.dumps(status), encoding="utf-8")
        if lock is not None:
            lock.close()
