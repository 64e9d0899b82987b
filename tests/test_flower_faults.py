"""Flower faults and process handling: killed SuperNodes, an unreachable SuperLink, a missing flwr,
`federation up/stop` (split from tests/test_flower.py so that pytest-xdist runs the long Flower tests on
different workers)."""

import json
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the flower extra is not installed")

from fedmmkt_plugins.backends.flower import LocalFederation  # noqa: E402
from test_flower import (  # noqa: E402
    THREE_CLIENTS,
    _read,
    alive,
    federation,  # noqa: F401  (fixture)
    federation_up,
    flower_backend,
    run_cli,
    wait_for,
)


def is_client_app(pid: int) -> bool:
    try:
        return b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_node_during_fit(federation: LocalFederation, run_dir: Path, name: str = "supernode-2") -> None:
    """Once the ServerApp has mapped clients to nodes, wait for node 2's ClientApp process (its first
    fit) and SIGKILL the node's whole process group: the node dies mid-round."""
    # generous: on 2 loaded cores the ServerApp once took over 240 s to reach the mapping
    wait_for(lambda: "client -> node" in _read(run_dir / "log.txt"), 600, "the ServerApp to map the nodes")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not any(is_client_app(p) for p in federation.descendants(name)):
        time.sleep(0.05)
    federation.kill(name, signal.SIGKILL)


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
    from fedmmkt_plugins.backends.flower import free_port

    address = f"127.0.0.1:{free_port()}"
    result = run_cli([*THREE_CLIENTS, f'backend={{name: flower, params: {{superlink: "{address}"}}}}'], tmp_path / "r")
    assert result.exit_code == 2
    assert f"cannot reach SuperLink at {address}" in result.output


def test_missing_flwr_gives_the_install_hint(monkeypatch):
    import builtins

    from fedmmkt_plugins.backends.flower import require_flwr

    from fedmmkt_core.errors import MissingDependencyError

    real_import = builtins.__import__

    def no_flwr(name, *args, **kwargs):
        if name == "flwr" or name.startswith("flwr."):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flwr)
    with pytest.raises(MissingDependencyError, match=r"pip install 'fedmmkt\[flower\]'"):
        require_flwr()


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

    with federation_up(tmp_path, "--nodes", "2") as (proc, log):
        pids = [int(p) for p in re.findall(r"pid (\d+)", _read(log))]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert "stopping" in _read(log)
        assert not [p for p in pids if alive(p)]


def test_node_client_state_claims_discards_and_ignores_an_older_run(tmp_path):
    import numpy as np
    from fedmmkt_plugins.backends.flower.client_app import NodeClientState

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
    from fedmmkt_plugins.backends.flower import to_records
    from fedmmkt_plugins.backends.flower.codec import ROUND_RECORD, round_from_records
    from flwr.app import ConfigRecord, RecordDict

    from fedmmkt_core.wire import Message, MessageError

    assert round_from_records(to_records(Message("fit", {"seed": 1}), 3, 1)) == (3, 1)
    assert round_from_records(to_records(Message("fit", {}))) is None
    for bad in ({"round": -1, "start-round": 0}, {"round": 1, "start-round": 2}, {"round": "1", "start-round": 0}):
        with pytest.raises(MessageError):
            round_from_records(RecordDict({ROUND_RECORD: ConfigRecord(bad)}))
