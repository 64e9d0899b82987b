import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# pytest-xdist runs one worker per core (make test): one torch thread each, so the workers do not
# oversubscribe the cores, and one cache shared by the workers (entries are written atomically), so a
# pre-trained generator or oracle is built once per session, not once per worker.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _XDIST_WORKER:
    # the processes the tests start (fedmmkt, Flower nodes) too: results compared with an in-process run
    # must come from the same thread count
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.set_num_threads(1)


def session_cache(tmp_path_factory) -> str:
    """The test session's FEDMMKT_CACHE (shared by the xdist workers), never ~/.cache."""
    base = tmp_path_factory.getbasetemp()
    return str((base.parent if _XDIST_WORKER else base) / "cache")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FEDMMKT_CACHE", session_cache(tmp_path_factory))
