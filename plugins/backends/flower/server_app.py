"""The ServerApp's main: the recipe's round loop, run by a :class:`~fedmmkt_core.server.runner.Runner` whose
backend is a :class:`~.backend.FlowerBackend` bound to this ServerApp's grid."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from fedmmkt_plugins.backends.flower.backend import FlowerBackend
from fedmmkt_plugins.backends.flower.codec import unb64
from fedmmkt_plugins.backends.flower.packaging import RUN_FILE
from fedmmkt_plugins.backends.flower.runlock import STATUS_FILE, run_lock

from fedmmkt_core.errors import UserError
from fedmmkt_core.rundir import atomic_write_json

log = logging.getLogger("fedmmkt")


def serve(grid: Any, context: Any) -> None:
    """Run the recipe's round loop with this grid; write the status file."""
    from fedmmkt_core.recipe import parse_recipe
    from fedmmkt_core.server.runner import RunFailed, Runner

    config = context.run_config
    out = Path(str(config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    if config.get("stream-results", False) and not (out / RUN_FILE).exists():
        # the submitter keeps its own copy of the run key; this marks the server's copy as a run directory
        atomic_write_json(out / RUN_FILE, {"run_key": str(config["run-key"])})
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
        try:  # the run is complete: the nodes' state for it is needed no more
            backend.release_nodes()
        except Exception as exc:
            log.warning("the nodes keep this run's client state: %s: %s", type(exc).__name__, exc)
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
        if config.get("stream-results", False):  # a submitter without our filesystem: send the files
            from fedmmkt_plugins.backends.flower.results import emit_run_files

            emit_run_files(out, write=lambda line: print(line, flush=True))
