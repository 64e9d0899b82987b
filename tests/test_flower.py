"""The Flower backend on a real local federation: a SuperLink and 3 SuperNodes on 127.0.0.1.

Every process is started in its own session and stopped by process group in a ``finally``.
"""

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import session_cache
from fedmmkt_cli.main import app
from typer.testing import CliRunner

from fedmmkt_core.recipe import load_recipe
from fedmmkt_core.server.runner import Runner

pytest.importorskip("flwr", reason="the flower extra is not installed")

from fedmmkt_plugins.backends.flower import WIRE_FILE, LocalFederation  # noqa: E402

SMOKE = Path(__file__).resolve().parents[1] / "examples" / "smoke.yaml"
# The Flower tests check transport, identity and recovery, not quality: a light server side (few images,
# short sampling and fine-tuning) keeps each round cheap; the same pre-trained generator is loaded.
LIGHT_SERVER = [
    "algorithm.params.samples_per_class=6",
    "algorithm.params.eval_samples_per_class=4",
    "generator.params.num_inference_steps=3",
    "generator.params.fine_tune_steps=6",
]
THREE_CLIENTS = ["clients.0.count=2", "clients.1.count=1", "federation.rounds=2", *LIGHT_SERVER]
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
        patch.setenv("FEDMMKT_CACHE", session_cache(tmp_path_factory))
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


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def federation_up(tmp_path: Path, *args: str):
    """`fedmmkt federation up ARGS` in its own session (log in tmp_path/up.log), started: yields the
    process and its log; killed by process group if it is still running afterwards."""
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "fedmmkt"
    command = [str(exe), "federation", "up", *args, "--port", "0", "--workdir", str(tmp_path / "fed")]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home")}
    log = tmp_path / "up.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: "SuperLink at" in _read(log), 60, "the federation to start")
        yield proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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


def test_this_round_distillation_labels_through_flower_as_in_process(tmp_path, federation):
    import torch

    overrides = [*THREE_CLIENTS, "algorithm.params.distill_on=this-round"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the federation's processes
    try:
        Runner(load_recipe(SMOKE, overrides), tmp_path / "inprocess").run()
    finally:
        torch.set_num_threads(threads)
    result = run_cli([*overrides, flower_backend(federation)], tmp_path / "flower")
    assert result.exit_code == 0, result.output
    assert rows_without_timing(tmp_path / "flower") == rows_without_timing(tmp_path / "inprocess")
    wire = [json.loads(line) for line in (tmp_path / "flower" / WIRE_FILE).read_text().splitlines()]
    by_round = {r: sorted(row["type"] for row in wire if row["round"] == r and row["client"] == 0) for r in (1, 2)}
    assert by_round == {1: ["fit"], 2: ["fit", "predict"]}  # round 2 labels its own set, then distils on it


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


def test_a_submitter_sharing_no_filesystem_gets_the_run_back_through_flower(tmp_path, federation, inprocess_reference):
    server_side = tmp_path / "superlink-machine"
    params = f'{{superlink: "{federation.address}", insecure: true, server_dir: "{server_side}"}}'
    submitter = tmp_path / "submitter"
    result = run_cli([*THREE_CLIENTS, f"backend={{name: flower, params: {params}}}"], submitter)
    assert result.exit_code == 0, result.output
    assert "@@fedmmkt" not in result.output  # the files' marker lines are taken out of the stream
    key = json.loads((submitter / "flower_run.json").read_text())["run_key"]
    served = server_side / key
    assert (served / "checkpoints" / "state.json").exists()  # the run itself lives on the server's machine
    assert not (submitter / "checkpoints").exists()
    assert rows_without_timing(submitter) == rows_without_timing(inprocess_reference)
    for name in ("metrics.jsonl", "summary.json", "flower_status.json", "flower_wire.jsonl", "run.json"):
        assert (submitter / name).read_bytes() == (served / name).read_bytes(), name
    # --resume from the submitter's folder alone (its recipe and run key): the server's copy is continued.
    assert (submitter / "samples").is_dir()  # the sample grids came back too
    for path in submitter.iterdir():
        if path.name not in ("flower_run.json", "recipe.resolved.yaml"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = cli.invoke(app, ["run", "--resume", str(submitter)])
    assert resumed.exit_code == 0, resumed.output
    assert rows_without_timing(submitter) == rows_without_timing(inprocess_reference)
    assert json.loads((submitter / "summary.json").read_text())["rounds_completed"] == 2
