"""The Flower backend on a real local federation: a SuperLink and 3 SuperNodes on 127.0.0.1.

Every process is started in its own session and stopped by process group in a ``finally``.
"""

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
from fedmmkt_cli.main import app
from typer.testing import CliRunner

from fedmmkt_core.recipe import load_recipe
from fedmmkt_core.runner import Runner

pytest.importorskip("flwr", reason="the flower extra is not installed")

from fedmmkt_plugins.flower import WIRE_FILE, LocalFederation  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "examples" / "smoke.yaml"
THREE_CLIENTS = ["clients.0.count=2", "clients.1.count=1", "federation.rounds=2"]
cli = CliRunner()


def rows_without_timing(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in rows]


def flower_backend(federation: LocalFederation) -> str:
    return f'backend={{name: flower, params: {{superlink: "{federation.address}", insecure: true}}}}'


def run_cli(overrides, out: Path):
    args = ["run", str(SMOKE), *sum((["--set", o] for o in overrides), []), "--out", str(out)]
    return cli.invoke(app, args)


@pytest.fixture(scope="module")
def inprocess_reference(tmp_path_factory):
    """The in-process run of the 3-client smoke recipe (2 rounds) at one torch thread, shared by the
    tests that compare a Flower run with it."""
    import torch

    out = tmp_path_factory.mktemp("reference") / "inprocess"
    with pytest.MonkeyPatch.context() as patch:  # the cache the autouse fixture would give (not ~/.cache)
        patch.setenv("FEDMMKT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the federation's processes (OMP_NUM_THREADS=1)
        try:
            Runner(load_recipe(SMOKE, THREE_CLIENTS), out).run()
        finally:
            torch.set_num_threads(threads)
    return out


@contextlib.contextmanager
def start_federation(tmp_path, monkeypatch, **kwargs):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    # One torch thread per process: 3 ClientApps + the ServerApp on 2 cores otherwise spin-wait on each
    # other (rounds 20-40x slower under load). The thread count changes float results, so the
    # in-process run it is compared with uses one thread too.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fed = LocalFederation(3, tmp_path / "federation", **kwargs)
    try:
        fed.start()
        yield fed
    finally:
        started = {name: proc.pid for name, proc in fed.processes.items()}
        fed.stop()
        for name, pid in started.items():
            assert fed.processes[name].poll() is not None, f"{name} (pid {pid}) still running"


@pytest.fixture
def federation(tmp_path, monkeypatch):
    with start_federation(tmp_path, monkeypatch) as fed:
        yield fed


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_flower_deployment_reproduces_the_inprocess_run(tmp_path, federation, inprocess_reference):
    result = run_cli([*THREE_CLIENTS, flower_backend(federation)], tmp_path / "flower")
    assert result.exit_code == 0, result.output
    assert rows_without_timing(tmp_path / "flower") == rows_without_timing(inprocess_reference)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["client_failures"] == 0
    # Bytes as Flower serializes the messages vs the toolkit's own count: within 10 % per message.
    wire = [json.loads(line) for line in (tmp_path / "flower" / WIRE_FILE).read_text().splitlines()]
    assert {row["round"] for row in wire} == {1, 2} and {row["client"] for row in wire} == {0, 1, 2}
    for row in wire:
        for direction in ("down", "up"):
            toolkit, flower = row[f"{direction}_toolkit_bytes"], row[f"{direction}_flower_bytes"]
            if toolkit > 10_000:  # small messages carry a fixed Flower envelope
                assert abs(flower - toolkit) <= 0.1 * toolkit, row


def test_every_node_trains_on_its_own_data_folder(tmp_path, monkeypatch, inprocess_reference):
    """Each SuperNode gets only its own folder (written by `fedmmkt partition`) as data-root; the run's
    metrics equal the in-process run's, and each node's client state lands under its own folder."""
    parts = tmp_path / "parts"
    written = cli.invoke(app, ["partition", str(SMOKE), str(parts), *sum((["--set", o] for o in THREE_CLIENTS), [])])
    assert written.exit_code == 0, written.output
    with start_federation(tmp_path, monkeypatch, data=parts) as federation:
        for k in range(3):
            assert f"data-root={json.dumps(str(parts.resolve() / f'client_{k}'))}" in federation.node_config(k)
        result = run_cli([*THREE_CLIENTS, flower_backend(federation)], tmp_path / "flower")
    assert result.exit_code == 0, result.output
    assert rows_without_timing(tmp_path / "flower") == rows_without_timing(inprocess_reference)
    run_key = json.loads((tmp_path / "flower" / "flower_run.json").read_text())["run_key"]
    for k in range(3):
        state = parts / f"client_{k}" / ".fedmmkt-state" / run_key
        assert [p.name for p in state.iterdir()] == [f"client_{k}"]  # node k held client k only
        assert sorted(p.name for p in state.glob("*/*.safetensors")) == [f"client_{k}.r{r}.safetensors" for r in (0, 1)]


def server_app_pids(federation: LocalFederation) -> list[int]:
    found = []
    for pid in federation.descendants("superlink"):
        try:
            if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def lock_free(run_dir: Path) -> bool:
    import fcntl

    with open(run_dir / "flower.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def rounds_checkpointed(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "state.json").read_text())["rounds_completed"]
    except (OSError, ValueError, KeyError):
        return 0


def test_resume_after_the_server_side_is_killed_mid_run(tmp_path, federation, inprocess_reference):
    """SIGKILL `fedmmkt run` after round 1's checkpoint: the run goes on in its ServerApp, so --resume
    is refused while that holds the run directory; SIGKILL the ServerApp too once a node has saved its
    round-2 weights (the whole server side is gone mid round 2), resume against the same federation:
    the nodes drop the stale round-2 files and the metrics equal an uninterrupted run's."""
    import subprocess
    import sys

    out = tmp_path / "flower"
    exe = Path(sys.executable).parent / "fedmmkt"
    overrides = [*THREE_CLIENTS, flower_backend(federation)]
    command = [str(exe), "run", str(SMOKE), *sum((["--set", o] for o in overrides), []), "--out", str(out)]
    with open(tmp_path / "first.log", "wb") as handle:
        first = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: rounds_checkpointed(out) >= 1 or first.poll() is not None, 300, "round 1's checkpoint")
        assert first.poll() is None and rounds_checkpointed(out) == 1, _read(tmp_path / "first.log")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        servers = server_app_pids(federation)
        assert servers, "no ServerApp process found"
        refused = cli.invoke(app, ["run", "--resume", str(out)])
        assert refused.exit_code == 2 and "still serving" in " ".join(refused.output.split()), refused.output
        # Kill once a node has written round 2's weights: the resumed run must not start from them.
        wait_for(
            lambda: any(True for _ in federation.workdir.glob("state-*/*/client_*/client_*.r1.safetensors")),
            240,
            "a node to finish round 2's fit",
        )
        for pid in servers:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not [p for p in servers if alive(p)], 30, "the ServerApp to die")
        wait_for(lambda: lock_free(out), 30, "the kernel to release the dead ServerApp's lock")
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert rounds_checkpointed(out) == 1
    resumed = cli.invoke(app, ["run", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert rows_without_timing(out) == rows_without_timing(inprocess_reference)
    wire = [json.loads(line)["round"] for line in (out / WIRE_FILE).read_text().splitlines()]
    assert wire.count(2) == wire.count(1) > 0  # round 2's rows once, although it started twice


def is_client_app(pid: int) -> bool:
    try:
        return b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_node_during_fit(federation: LocalFederation, run_dir: Path, name: str = "supernode-2") -> None:
    """Once the ServerApp has mapped clients to nodes, wait for node 2's ClientApp process (its first
    fit) and SIGKILL the node's whole process group: the node dies mid-round."""
    wait_for(lambda: "client -> node" in _read(run_dir / "log.txt"), 240, "the ServerApp to map the nodes")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any(is_client_app(p) for p in federation.descendants(name)):
        time.sleep(0.05)
    federation.kill(name, signal.SIGKILL)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def run_with_a_killed_node(tmp_path, federation, min_clients: int):
    import threading

    out = tmp_path / "flower"
    overrides = [*THREE_CLIENTS, "federation.rounds=1", f"federation.min_clients={min_clients}"]
    killer = threading.Thread(target=kill_node_during_fit, args=(federation, out), daemon=True)
    killer.start()
    result = run_cli([*overrides, flower_backend(federation)], out)
    killer.join(timeout=30)
    return result, out


def test_killed_supernode_the_round_goes_on_when_min_clients_allows(tmp_path, federation):
    result, out = run_with_a_killed_node(tmp_path, federation, min_clients=2)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    failures = rows[0]["failures"]
    assert {(f["client"], f["phase"]) for f in failures} >= {(2, "fit")}, failures
    assert all(f["client"] == 2 and "SuperNode" in f["reason"] for f in failures), failures
    assert set(rows[0]["client_accuracy"]) == {"0", "1"}  # evaluation goes on with the others


def test_killed_supernode_fails_the_run_clearly_below_min_clients(tmp_path, federation):
    result, _ = run_with_a_killed_node(tmp_path, federation, min_clients=3)
    assert result.exit_code == 1, result.output
    assert "run failed: round 1, phase 'fit': only 2 of 3 clients" in " ".join(result.output.split())
    assert "client 2:" in result.output


def test_unreachable_superlink_is_a_clear_error(tmp_path):
    from fedmmkt_plugins.flower import free_port

    address = f"127.0.0.1:{free_port()}"
    result = run_cli([*THREE_CLIENTS, f'backend={{name: flower, params: {{superlink: "{address}"}}}}'], tmp_path / "r")
    assert result.exit_code == 2
    assert f"cannot reach SuperLink at {address}" in result.output


def test_missing_flwr_gives_the_install_hint(monkeypatch):
    import builtins

    from fedmmkt_plugins.flower import require_flwr

    from fedmmkt_core.errors import MissingDependencyError

    real_import = builtins.__import__

    def no_flwr(name, *args, **kwargs):
        if name == "flwr" or name.startswith("flwr."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flwr)
    with pytest.raises(MissingDependencyError, match=r"pip install 'fedmmkt\[flower\]'"):
        require_flwr()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stop_ends_every_process_it_started(tmp_path):
    fed = LocalFederation(1, tmp_path / "f")
    try:
        fed.start()
        wait_for(lambda: fed.descendants("superlink"), 30, "the SuperLink's SuperExec")
        pids = [p.pid for p in fed.processes.values()] + fed.descendants("superlink") + fed.descendants("supernode-0")
    finally:
        fed.stop()
    assert len(pids) >= 3
    assert not [pid for pid in pids if alive(pid)]


def test_federation_up_command_starts_and_stops_its_processes(tmp_path):
    import re
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "fedmmkt"
    command = [str(exe), "federation", "up", "--nodes", "2", "--port", "0", "--workdir", str(tmp_path / "fed")]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home")}
    log = tmp_path / "up.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: "SuperLink at" in _read(log), 60, "the federation to start")
        pids = [int(p) for p in re.findall(r"pid (\d+)", _read(log))]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert "stopping" in _read(log)
        assert not [p for p in pids if alive(p)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_federation_up_with_data_gives_every_node_its_own_folder(tmp_path):
    import re
    import subprocess
    import sys

    parts = tmp_path / "parts"
    written = cli.invoke(app, ["partition", str(SMOKE), str(parts), "--set", "clients.0.count=1"])
    assert written.exit_code == 0, written.output
    exe = Path(sys.executable).parent / "fedmmkt"
    command = [str(exe), "federation", "up", "--data", str(parts), "--port", "0", "--workdir", str(tmp_path / "fed")]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home")}
    log = tmp_path / "up.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: "SuperLink at" in _read(log), 60, "the federation to start")
        nodes = {int(k): int(pid) for k, pid in re.findall(r"supernode-(\d+): pid (\d+)", _read(log))}
        assert sorted(nodes) == [0, 1, 2]  # one node per client folder
        for k, pid in nodes.items():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert f"data-root={json.dumps(str(parts.resolve() / f'client_{k}'))}" in cmdline, cmdline
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert not [p for p in nodes.values() if alive(p)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_node_client_state_claims_discards_and_ignores_an_older_run(tmp_path):
    import numpy as np
    from fedmmkt_plugins.flower.client_app import NodeClientState

    from fedmmkt_core.errors import UserError

    def weights(value: float):
        return {"w": np.full(2, value, np.float32)}

    state = NodeClientState(tmp_path, "smoke-0123", 2)
    state.claim("run-a", 0)
    state.save("run-a", 0, weights(0))
    state.save("run-a", 1, weights(1))  # round 2's weights; run a dies before its checkpoint
    state.claim("run-b", 1)  # the resumed run starts at round index 1: round 2's file goes
    assert state.load(1)["w"][0] == 0
    state.save("run-a", 1, weights(-1))  # a ClientApp of run a still working: ignored
    assert state.load(1)["w"][0] == 0
    state.save("run-b", 1, weights(2))
    state.claim("run-b", 1)  # the node restarted within run b: nothing dropped
    assert state.load(1)["w"][0] == 2
    assert [p.parent.name for p in tmp_path.glob("smoke-0123/*/*.safetensors")] == ["client_2", "client_2"]
    with pytest.raises(UserError, match="not a plain name"):
        NodeClientState(tmp_path, "../elsewhere", 2)


def test_the_round_record_is_validated():
    from fedmmkt_plugins.flower import to_records
    from fedmmkt_plugins.flower.codec import ROUND_RECORD, round_from_records
    from flwr.app import ConfigRecord, RecordDict

    from fedmmkt_core.wire import Message, MessageError

    assert round_from_records(to_records(Message("fit", {"seed": 1}), 3, 1)) == (3, 1)
    assert round_from_records(to_records(Message("fit", {}))) is None
    for bad in ({"round": -1, "start-round": 0}, {"round": 1, "start-round": 2}, {"round": "1", "start-round": 0}):
        with pytest.raises(MessageError):
            round_from_records(RecordDict({ROUND_RECORD: ConfigRecord(bad)}))
