"""`kill PID` (SIGTERM) on `fedmmkt run` with the Flower backend ends as Ctrl-C does: `flwr run --stream`
is ended with its process group, the run is stopped on the SuperLink (`flwr stop RUN_ID CONNECTION`) and
the temporary folder holding the app (and so the recipe) is removed. A fake `flwr` stands in for Flower's:
it announces a run and then waits, as `flwr run --stream` does while the ServerApp works."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the flower extra is not installed")

SMOKE = Path(__file__).resolve().parents[1] / "examples" / "smoke.yaml"

FAKE_FLWR = """\
import os, sys, time
with open(os.environ["FAKE_FLWR_LOG"], "a") as log:
    log.write(" ".join([sys.argv[1], str(os.getpid()), *sys.argv[2:]]) + "\\n")
if sys.argv[1] == "run":
    print("Successfully started run 42", flush=True)
    time.sleep(600)
"""

CLI = """\
import sys
import fedmmkt_plugins.backends.flower.packaging as packaging
packaging.flwr_exe = lambda name="flwr": sys.argv[1]
from fedmmkt_cli.main import app
app(sys.argv[2:])
"""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_on_fedmmkt_run_ends_flwr_run_and_removes_the_temporary_folder(tmp_path):
    fake = tmp_path / "flwr"
    fake.write_text(f"#!{sys.executable}\n{FAKE_FLWR}")
    fake.chmod(0o755)
    log, temp = tmp_path / "flwr.log", tmp_path / "tmp"
    temp.mkdir()
    backend = "backend={name: flower, params: {connection: fedmmkt-test}}"
    out = tmp_path / "run"
    command = [sys.executable, "-c", CLI, str(fake), "run", str(SMOKE), "--set", backend, "--out", str(out)]
    env = {**os.environ, "FAKE_FLWR_LOG": str(log), "TMPDIR": str(temp)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    flwr_pid = None
    try:
        deadline = time.monotonic() + 120
        while flwr_pid is None and time.monotonic() < deadline and proc.poll() is None:
            started = [line.split() for line in (log.read_text() if log.exists() else "").splitlines()]
            flwr_pid = next((int(words[1]) for words in started if words[0] == "run"), None)
            time.sleep(0.2)
        assert flwr_pid is not None, proc.communicate()[0]
        app_dir = Path(next(words[2] for words in started if words[0] == "run"))
        assert app_dir.is_relative_to(temp) and (app_dir / "pyproject.toml").exists()  # the app holds the recipe
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 130, output
        assert "interrupted" in output
        assert not alive(flwr_pid)  # `flwr run --stream` ended with its process group
        assert not list(temp.iterdir())  # the temporary folder went, with the recipe in it
        assert "stop" in log.read_text() and log.read_text().splitlines()[-1].split()[2:] == ["42", "fedmmkt-test"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if flwr_pid is not None and alive(flwr_pid):
            os.kill(flwr_pid, signal.SIGKILL)
