"""A run killed with SIGKILL resumes to the same result; the same seed gives byte-identical metrics."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_fedmmkt import RECIPE

from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.runner import Runner

SMOKE = Path(__file__).resolve().parents[1] / "examples" / "smoke.yaml"
TIMING = re.compile(r'"seconds_[a-z_]+": [-0-9.e+]+(, )?')


def without_timing(metrics_file: Path) -> bytes:
    """metrics.jsonl as written, with only the timing fields cut out."""
    return TIMING.sub("", metrics_file.read_text(encoding="utf-8")).encode()


def fedmmkt(*args: str) -> subprocess.Popen:
    cli = Path(sys.executable).with_name("fedmmkt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [str(cli), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> None:
    try:
        _, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr.decode(errors="replace")


def test_sigkill_during_round_2_then_resume_gives_identical_final_metrics(tmp_path):
    rounds = ["--set", "federation.rounds=4"]
    finish(fedmmkt("run", str(SMOKE), *rounds, "--out", str(tmp_path / "full")))

    victim = fedmmkt("run", str(SMOKE), *rounds, "--out", str(tmp_path / "cut"))
    metrics = tmp_path / "cut" / "metrics.jsonl"
    state = tmp_path / "cut" / "checkpoints" / "state.json"
    try:
        deadline = time.monotonic() + 600
        # round 1's checkpoint is the last thing it writes: from then on the process is in round 2
        while not (state.exists() and '"rounds_completed": 1' in state.read_text()):
            assert victim.poll() is None, victim.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.05)
        assert victim.poll() is None
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert metrics.read_text().count("\n") == 1, "the kill landed after round 2 had finished"
    assert not (tmp_path / "cut" / "summary.json").exists()

    finish(fedmmkt("run", "--resume", str(tmp_path / "cut")))
    assert without_timing(metrics) == without_timing(tmp_path / "full" / "metrics.jsonl")
    assert metrics.read_text().count("\n") == 4


def test_same_seed_gives_byte_identical_metrics(tmp_path):
    for name in ("a", "b"):
        Runner(parse_recipe(RECIPE), tmp_path / name).run()
    first = without_timing(tmp_path / "a" / "metrics.jsonl")
    assert first == without_timing(tmp_path / "b" / "metrics.jsonl")
    assert b"seconds_" not in first and b"generator_cas" in first
