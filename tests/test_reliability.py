"""A run killed with SIGKILL (at five moments, one after another) resumes to the same result; the same
seed gives byte-identical metrics."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from test_fedmmkt import RECIPE
from test_hostile_inputs import local_recipe

from fedmmkt_core.faults import CRASH_ENV
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.server.runner import Runner

SMOKE = Path(__file__).resolve().parents[1] / "examples" / "smoke.yaml"
TIMING = re.compile(r'"seconds_[a-z_]+": [-0-9.e+]+(, )?')


def without_timing(metrics_file: Path) -> bytes:
    """metrics.jsonl as written, with only the timing fields cut out."""
    return TIMING.sub("", metrics_file.read_text(encoding="utf-8")).encode()


def fedmmkt(*args: str, crash_at: str | None = None) -> subprocess.Popen:
    cli = Path(sys.executable).with_name("fedmmkt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(CRASH_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
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


# Where each SIGKILL lands (the process kills itself at a crash point: no timing races), and the
# rounds the checkpoint holds afterwards. The kills follow each other: every run resumes the last.
KILLS = [
    ("round_start#2", 1),  # between rounds
    ("client_saved#2", 1),  # inside round 2, after the second client's weights were written
    ("metrics_written#1", 1),  # round 2's metrics written, its checkpoint not
    ("write:state.json#1", 1),  # round 2's checkpoint state being written (temporary file, not renamed)
    ("write:algorithm.r3.safetensors#1", 2),  # round 3's checkpoint being written
]


def test_sigkill_at_five_moments_then_resume_gives_identical_metrics(tmp_path):
    recipe = local_recipe(tmp_path)  # the smallest recipe: 2 CNN clients, local training
    recipe.write_text(
        recipe.read_text().replace("rounds: 2", "rounds: 3").replace("hidden: 16}", "hidden: 16, epochs: 1}")
    )
    Runner(parse_recipe(recipe.read_text()), tmp_path / "full").run()
    out = tmp_path / "cut"
    for number, (crash_at, completed) in enumerate(KILLS):
        args = ("run", str(recipe), "--out", str(out)) if number == 0 else ("run", "--resume", str(out))
        victim = fedmmkt(*args, crash_at=crash_at)
        try:
            _, stderr = victim.communicate(timeout=600)
        finally:
            if victim.poll() is None:
                os.killpg(victim.pid, signal.SIGKILL)
        assert victim.returncode == -signal.SIGKILL, (crash_at, stderr.decode(errors="replace"))
        state = json.loads((out / "checkpoints" / "state.json").read_text())
        assert state["rounds_completed"] == completed, crash_at
        assert (out / "run.lock").exists()  # left by the killed process
    finish(fedmmkt("run", "--resume", str(out)))
    assert without_timing(out / "metrics.jsonl") == without_timing(tmp_path / "full" / "metrics.jsonl")
    assert "which is no longer running: taking it over" in (out / "log.txt").read_text()
    assert not (out / "run.lock").exists()


def test_same_seed_gives_byte_identical_metrics(tmp_path):
    for name in ("a", "b"):
        Runner(parse_recipe(RECIPE), tmp_path / name).run()
    first = without_timing(tmp_path / "a" / "metrics.jsonl")
    assert first == without_timing(tmp_path / "b" / "metrics.jsonl")
    assert b"seconds_" not in first and b"generator_cas" in first
