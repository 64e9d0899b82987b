"""The Flower backend on Flower's simulation engine (Ray): one virtual SuperNode per client.

The launcher starts a private SuperLink; every process it starts carries a token in its environment,
so the test can check that none is left afterwards.
"""

import json
import threading
import uuid
from pathlib import Path

import pytest
from fedmmkt_cli.main import app
from typer.testing import CliRunner

from fedmmkt_core.recipe import load_recipe
from fedmmkt_core.server.runner import Runner

pytest.importorskip("flwr", reason="the flower extra is not installed")

from fedmmkt_plugins.backends.flower import SIM_TOKEN, processes_with_token  # noqa: E402
from test_flower import LIGHT_SERVER  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "examples" / "smoke.yaml"
THREE_CLIENTS = ["clients.0.count=2", "clients.1.count=1", "federation.rounds=2", *LIGHT_SERVER]
SIMULATION = "backend={name: flower, params: {mode: simulation, num_cpus_per_client: 1, ray_num_cpus: 2}}"
cli = CliRunner()


def rows_without_timing(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in rows]


def run_cli(overrides, out: Path):
    args = ["run", str(SMOKE), *sum((["--set", o] for o in overrides), []), "--out", str(out)]
    return cli.invoke(app, args)


@pytest.mark.parametrize("distill_on", ["previous-round", "this-round"])
def test_flower_simulation_reproduces_the_inprocess_run(tmp_path, monkeypatch, distill_on):
    """this-round adds a predict exchange before each fit from round 2: both message types through Ray."""
    pytest.importorskip("ray", reason="the flower-simulation extra is not installed")
    import torch

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one torch thread per process, as the in-process reference
    token = uuid.uuid4().hex
    monkeypatch.setenv(SIM_TOKEN, token)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    overrides = [*THREE_CLIENTS, f"algorithm.params.distill_on={distill_on}"]
    try:
        Runner(load_recipe(SMOKE, overrides), tmp_path / "inprocess").run()
    finally:
        torch.set_num_threads(threads)

    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:  # every process the simulation starts, while it runs
        while not done.is_set():
            seen.update(processes_with_token(token))
            done.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run_cli([*overrides, SIMULATION], tmp_path / "simulation")
    finally:
        done.set()
        watcher.join(timeout=10)
    assert result.exit_code == 0, result.output
    assert rows_without_timing(tmp_path / "simulation") == rows_without_timing(tmp_path / "inprocess")
    summary = json.loads((tmp_path / "simulation" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["client_failures"] == 0
    assert len(seen) >= 3, seen  # the SuperLink, flwr-simulation, Ray's processes
    assert processes_with_token(token) == []


def test_a_failed_simulation_run_exits_1_with_the_reason_and_leaves_nothing_running(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="the flower-simulation extra is not installed")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    token = uuid.uuid4().hex
    monkeypatch.setenv(SIM_TOKEN, token)
    overrides = [*THREE_CLIENTS, "federation.rounds=1", "federation.min_clients=3", "clients.1.fault={type: nan}"]
    result = run_cli([*overrides, SIMULATION], tmp_path / "simulation")
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "run failed: round 1, phase 'fit': only 2 of 3 clients" in text
    assert "client 2: MessageError: array 'logits' has NaN or infinite values" in text
    assert processes_with_token(token) == []


def test_simulation_without_ray_gives_the_install_hint(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    result = run_cli([*THREE_CLIENTS, "backend={name: flower, params: {mode: simulation}}"], tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert "pip install 'fedmmkt[flower-simulation]'" in " ".join(result.output.split())
