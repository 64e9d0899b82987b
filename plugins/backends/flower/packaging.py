"""Submitting a run to Flower: the app folder ``flwr run`` uploads, its run config, and the launch of
a deployment run (an existing SuperLink) or a simulation run (a private ``--simulation`` SuperLink).

``fedmmkt run`` waits for the run; the ServerApp writes the run directory and its status file, which
:func:`result` turns into the run's summary or its error.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmmkt_plugins.backends.flower.codec import b64
from fedmmkt_plugins.backends.flower.processes import (
    SIM_TOKEN,
    check_reachable,
    child_env,
    flwr_exe,
    free_port,
    sigterm_as_interrupt,
    stop_all,
    wait_listening,
)
from fedmmkt_plugins.backends.flower.runlock import STATUS_FILE, run_lock

from fedmmkt_core.errors import MissingDependencyError, UserError
from fedmmkt_core.rundir import atomic_write_json

if TYPE_CHECKING:
    from fedmmkt_plugins.backends.flower.backend import FlowerConfig

    from fedmmkt_core.recipe import Recipe
    from fedmmkt_core.server.runner import Runner

RUN_FILE = "flower_run.json"  # the run's key: names the clients' state folders on their nodes, kept for --resume


def client_recipe_text(recipe: Recipe) -> str:
    """What a SuperNode needs to rebuild its client: seed, data, clients, federation (no server settings).

    The privacy section travels next to it (:func:`client_run_config`): a recipe with ``privacy`` must
    name an algorithm that uploads soft labels, and the node's recipe names none."""
    from fedmmkt_core.recipe import dump_yaml

    resolved = recipe.resolved()
    keep = {k: resolved[k] for k in ("fedmmkt", "name", "seed", "data", "clients", "federation")}
    keep["data"] = {k: v for k, v in keep["data"].items() if k != "server_folder"}  # the server's alone
    keep.update(algorithm={"name": "local", "params": {}}, loggers=[])
    return dump_yaml(keep)


def client_run_config(recipe: Recipe) -> dict[str, str]:
    """The run config keys every ClientApp reads: its recipe and the recipe's privacy section (JSON,
    empty without DP), from which the node builds its client (:mod:`.client_app`)."""
    privacy = recipe.privacy.model_dump(mode="json") if recipe.privacy is not None else None
    return {
        "client-recipe": b64(client_recipe_text(recipe)),
        "client-privacy": b64(json.dumps(privacy)) if privacy is not None else "",
    }


def app_pyproject(run_config: dict[str, Any]) -> str:
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedmmkt-run"',
        'version = "1.0.0"',
        'description = "A fedmmkt recipe as a Flower App (written by fedmmkt run)"',
        'license = "Apache-2.0"',
        "dependencies = []  # runs in the installed environment (fedmmkt[flower])",
        "",
        "[tool.flwr.app]",
        'publisher = "fedmmkt"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedmmkt_plugins.backends.flower.app:server_app"',
        'clientapp = "fedmmkt_plugins.backends.flower.app:client_app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in run_config.items()]
    return "\n".join(lines) + "\n"


def _run_key(runner: Runner) -> str:
    """A new run's key (written to ``RUN_FILE``), or, on --resume, the key the run was started with."""
    out = runner.run_dir.root.resolve()
    path = out / RUN_FILE
    if runner.resume:
        if not runner.run_dir.recipe_path.exists():
            raise UserError(f"cannot resume: {out} is not a run directory (no recipe.resolved.yaml)")
        if not path.exists():
            raise UserError(f"cannot resume {out} on Flower: it has no {RUN_FILE} (it was not run on Flower)")
        run_lock(out).close()  # refuse while a ServerApp still serves this directory
        key = str(json.loads(path.read_text(encoding="utf-8")).get("run_key", ""))
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", key):
            raise UserError(f"cannot resume {out}: {path} holds no valid run_key")
        return key
    if runner.run_dir.metrics_path.exists() or (runner.run_dir.checkpoint_dir / "state.json").exists():
        raise UserError(f"{out} already holds a run; pass --resume to continue it or --out for a new directory")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", runner.recipe.name)[:60]
    key = f"{name}-{uuid.uuid4().hex[:12]}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"run_key": key})
    return key


def run_config(config: FlowerConfig, runner: Runner) -> dict[str, Any]:
    """The run config the ServerApp and ClientApps read (both modes); refuses a directory holding a run
    unless resuming it."""
    from fedmmkt_core.recipe import dump_yaml

    recipe = runner.recipe
    out = runner.run_dir.root.resolve()
    key = _run_key(runner)
    (out / STATUS_FILE).unlink(missing_ok=True)
    values: dict[str, Any] = {
        "recipe": b64(dump_yaml(recipe.resolved())),
        **client_run_config(recipe),
        "base-dir": str(recipe.base_dir.resolve()),
        "out-dir": str(out),
        "max-message-bytes": config.max_message_bytes,
        "run-key": key,
        "resume": bool(runner.resume),
    }
    if config.mode == "simulation":  # every virtual SuperNode is on this machine: client state in the run dir
        values["client-state-dir"] = str(runner.run_dir.client_state_dir.resolve())
    return values


def write_app(tmp: Path, values: dict[str, Any]) -> Path:
    app_dir = tmp / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(app_pyproject(values), encoding="utf-8")
    return app_dir


def connection_lines(address: str, insecure: bool, root_certificates: Path | str | None = None) -> list[str]:
    """A SuperLink connection's entries in a Flower config (``[superlink.NAME]`` of ``config.toml``)."""
    lines = [f'address = "{address}"', f"insecure = {'true' if insecure else 'false'}"]
    if root_certificates is not None:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates))}")
    return lines


def write_flwr_home(flwr_home: Path, connection: str, conn: list[str]) -> None:
    """A Flower config folder whose default connection, named ``connection``, has the entries ``conn``
    (see :func:`connection_lines`)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    text = f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n' + "\n".join(conn) + "\n"
    (flwr_home / "config.toml").write_text(text, encoding="utf-8")


def launch_deployment(config: FlowerConfig, runner: Runner) -> dict[str, Any]:
    if config.connection is None:
        check_reachable(config.superlink)
    if config.server_dir is not None and not config.server_dir.startswith("/"):
        raise UserError(
            f"backend.params.server_dir must be an absolute path on the SuperLink's machine, got '{config.server_dir}'"
        )
    values = run_config(config, runner)
    receiver = None
    if config.server_dir is not None:  # the ServerApp writes on its machine; the files come back in the stream
        from fedmmkt_core.recipe import dump_yaml
        from fedmmkt_core.rundir import atomic_write_text

        values["out-dir"] = f"{config.server_dir.rstrip('/')}/{values['run-key']}"
        values["stream-results"] = True
        if not runner.resume:  # what --resume needs to find the run again: its recipe, its key
            atomic_write_text(runner.run_dir.recipe_path, dump_yaml(runner.recipe.resolved()))
        from fedmmkt_plugins.backends.flower.results import RunFileReceiver

        receiver = RunFileReceiver(runner.run_dir.root.resolve())
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="fedmmkt-flwr-") as tmp:
        app_dir = write_app(Path(tmp), values)
        if config.connection is not None:
            flwr_home, connection = None, config.connection
        else:
            flwr_home, connection = Path(tmp) / "flwr-home", "fedmmkt"
            conn = connection_lines(config.superlink, config.insecure, config.root_certificates)
            write_flwr_home(flwr_home, connection, conn)
        env = child_env(flwr_home)
        command = [flwr_exe(), "run", str(app_dir), connection, "--stream"]
        run_id, tail = stream(command, env, receiver)
    where = config.connection or config.superlink
    return result(runner, run_id, tail, f"flwr run could not start the run on {where}", "see `flwr log RUN_ID`")


def result(runner: Runner, run_id: int | None, tail: list[str], not_started: str, hint: str) -> dict[str, Any]:
    """Read the ServerApp's status file: the run's summary, or the failure as UserError / RunFailed."""
    from fedmmkt_core.server.runner import RunFailed

    status_path = runner.run_dir.root.resolve() / STATUS_FILE
    if not status_path.exists():
        detail = "\n".join(tail[-15:])
        if run_id is None:
            raise UserError(f"{not_started}:\n{detail}")
        hint = hint.replace("RUN_ID", str(run_id))
        raise RunFailed(f"Flower run {run_id} ended without a result ({hint}):\n{detail}")
    status = json.loads(status_path.read_text(encoding="utf-8"))
    if status["status"] != "finished":
        if status.get("error") in ("UserError", "RecipeError", "MissingDependencyError", "DataError", "PluginError"):
            raise UserError(status["message"])
        raise RunFailed(status["message"])
    return json.loads(runner.run_dir.summary_path.read_text(encoding="utf-8"))


def stream(command: list[str], env: dict[str, str], receiver: Any = None) -> tuple[int | None, list[str]]:
    """Run ``flwr run --stream``, echo its output, return the run id and the last lines. With a
    :class:`~.results.RunFileReceiver`, the run files' marker lines go to it instead."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    run_id: int | None = None
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if receiver is not None and receiver.feed(line):
                continue
            sys.stderr.write(line)
            tail = (tail + [line.rstrip()])[-40:]
            match = re.search(r"Successfully started run (\d+)", line)
            if match:
                run_id = int(match.group(1))
        proc.wait()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (sigterm_as_interrupt): stop the run on the SuperLink too
        if run_id is not None:
            try:
                stop = [command[0], "stop", str(run_id), command[3]]  # flwr stop RUN_ID CONNECTION
                subprocess.run(stop, env=env, timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired):
                pass
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if receiver is not None:
            receiver.close()
    return run_id, tail


def launch_simulation(config: FlowerConfig, runner: Runner) -> dict[str, Any]:
    """Run the recipe on Flower's simulation engine: a private SuperLink started with ``--simulation``
    on a free loopback port, ``flwr run`` with one virtual SuperNode per client, every process
    (SuperLink, flwr-simulation, Ray) ended when the run is over, whatever happened."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise MissingDependencyError(
            "ray", "Flower's simulation engine needs Ray: pip install 'fedmmkt[flower-simulation]'"
        )
    values = run_config(config, runner)
    federation_config = {
        "num-supernodes": runner.recipe.num_clients,
        "client-resources-num-cpus": config.num_cpus_per_client,
        "client-resources-num-gpus": 0.0,
        "backend": "ray",
    }
    if config.ray_num_cpus is not None:
        federation_config["init-args-num-cpus"] = config.ray_num_cpus
    token = os.environ.get(SIM_TOKEN) or uuid.uuid4().hex  # a test may set it to find the processes
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="fedmmkt-flwr-sim-") as tmp:
        app_dir = write_app(Path(tmp), values)
        flwr_home, connection, port = Path(tmp) / "flwr-home", "fedmmkt-simulation", free_port()
        write_flwr_home(flwr_home, connection, connection_lines(f"127.0.0.1:{port}", insecure=True))
        env = child_env(flwr_home)
        env[SIM_TOKEN] = token
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        env.setdefault("RAY_TMPDIR", tmp)  # Ray's session files go with the temporary directory
        env.setdefault("RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION", str(config.ray_object_store_fraction))
        log_path = Path(tmp) / "superlink.log"
        superlink_command = [
            flwr_exe("flower-superlink"),
            "--insecure",
            "--simulation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ]
        with open(log_path, "ab") as log_file:
            superlink = subprocess.Popen(
                superlink_command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            wait_listening(superlink, "flower-superlink", "127.0.0.1", port, 60.0, log_path)
            federation = " ".join(f"{key}={json.dumps(value)}" for key, value in federation_config.items())
            command = [flwr_exe(), "run", str(app_dir), connection, "--stream", "--federation-config", federation]
            run_id, tail = stream(command, env)
        finally:
            stop_all(superlink, token)
        if run_id is None or not (runner.run_dir.root / STATUS_FILE).exists():
            tail = tail + log_path.read_text(errors="replace").splitlines()[-15:]
    return result(runner, run_id, tail, "Flower's simulation engine could not start the run", "see the log above")
