"""The run keeps freed memory in the process (glibc's malloc thresholds), and never overrides the user's."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmmkt_core.allocator import default_environment

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process: optionally tune, then hold and free one 16 MiB block and report what glibc did with it.
PROBE = """
import ctypes, json, sys
from fedmmkt_core.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
tuned = keep_freed_memory() if sys.argv[1] == "tune" else None
before = libc.mallinfo2()
block = libc.malloc(16 << 20)
held = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"tuned": tuned, "mapped_while_held": held.hblkhd - before.hblkhd,
                  "kept_after_free": after.fordblks - before.fordblks}))
"""


def _has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    try:
        return name is not None and hasattr(ctypes.CDLL(name), "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="glibc >= 2.33 only (mallinfo2)"
)


def _probe(mode: str, **environment: str) -> dict:
    env = default_environment(os.environ)
    env.update(environment, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_untuned_glibc_maps_a_16_mib_block_and_returns_it_on_free():
    result = _probe("plain")
    assert result["mapped_while_held"] >= 16 << 20
    assert result["kept_after_free"] < 16 << 20


def test_tuned_process_serves_a_16_mib_block_from_the_heap_and_keeps_it_after_free():
    result = _probe("tune")
    assert result["tuned"] is True
    assert result["mapped_while_held"] == 0
    assert result["kept_after_free"] >= 16 << 20


@pytest.mark.parametrize(
    "environment",
    [
        {"FEDMMKT_MALLOC_TUNING": "0"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
    ],
)
def test_the_users_choice_wins(environment):
    result = _probe("tune", **environment)
    assert result["tuned"] is False
    assert result["mapped_while_held"] >= 16 << 20


def test_a_run_tunes_its_process(tmp_path):
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from fedmmkt_core import allocator\n"
        "from fedmmkt_core.testing.runs import run_tiny_recipe\n"
        "assert not allocator._done\n"
        "run_tiny_recipe(Path(sys.argv[1]), {'federation.rounds': 1})\n"
        "print(json.dumps(allocator._done))\n"
    )
    env = default_environment(os.environ)
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [True]
