"""Keep freed memory in the process, so torch's short-lived buffers do not fault their pages in again.

glibc hands an allocation above its mmap threshold (128 KiB, growing to at most 32 MiB) a fresh mapping,
and gives the top of the heap back to the system once more than twice that threshold lies free. A round
of the digits demo allocates and frees the same few-MiB activations thousands of times, so every reuse
faulted its pages in again and the kernel zeroed them: millions of minor page faults a round. With the
thresholds below freed memory is reused instead, for a few percent more peak memory. The allocator never
changes a computed value, so every metric stays the same bit for bit. ``python -m benchmarks allocator``
measures both (docs/results.md, "Memory reuse in the run's process").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest (64-bit): allocations up to 32 MiB come from the heap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top is returned only beyond 1 GiB
TOP_PAD = 64 << 20  # the heap grows by at least 64 MiB at a time
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
_done: list[bool] = []


def keep_freed_memory() -> bool:
    """Set glibc's malloc thresholds once per process; True if they were set.

    A no-op (False) off glibc, where ``FEDMMKT_MALLOC_TUNING=0``, or where the user chose malloc settings
    through the environment (``MALLOC_*_`` or ``GLIBC_TUNABLES``), which this never overrides."""
    if _done:
        return _done[0]
    _done.append(False)
    if os.environ.get("FEDMMKT_MALLOC_TUNING", "1") == "0" or any(name in os.environ for name in _ENVIRONMENT):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl and macOS lack it (and mallopt's meaning)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    ok = all(mallopt(param, value) == 1 for param, value in settings)
    _done[0] = ok
    return ok


def default_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without any malloc setting (``MALLOC_*``, ``GLIBC_TUNABLES``) or ``FEDMMKT_MALLOC_TUNING``:
    a process started with it has glibc's defaults until a run sets its own (what tests and benchmarks start)."""
    return {
        key: value
        for key, value in environ.items()
        if not key.startswith("MALLOC_") and key not in ("GLIBC_TUNABLES", "FEDMMKT_MALLOC_TUNING")
    }
