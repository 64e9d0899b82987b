"""A node's warm client worker (``warm=true``): the same replies as a ClientApp that builds its client
itself, one worker per node across messages, gone when its SuperNode is."""

import os
import subprocess
import time

import numpy as np
import pytest
from test_fedmmkt import RECIPE

from fedmmkt_core.wire import Message

pytest.importorskip("flwr", reason="the flower extra is not installed")

from fedmmkt_plugins.backends.flower import node_worker  # noqa: E402
from test_flower_node_state import fit  # noqa: E402
from test_flower_privacy import flower_task, node_context, node_reply  # noqa: E402,F401  (a fixture)


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_warm_node_answers_as_a_cold_one_and_its_worker_ends_with_its_supernode(tmp_path, monkeypatch, flower_task):
    supernode = subprocess.Popen(["sleep", "600"])  # stands in for the SuperNode the worker outlives not
    monkeypatch.setattr(node_worker, "_supernode_pid", lambda: supernode.pid)
    deep = tmp_path / ("a-long-folder-name-" * 8)  # beyond the 107 bytes of a Unix socket path
    warm = node_context(RECIPE, {"state-dir": str(deep / "warm"), "warm": "true"})
    cold = node_context(RECIPE, {"state-dir": str(tmp_path / "cold")})
    worker_pid = None
    try:
        first = node_reply(warm, fit())
        assert first.type == "fit_reply", first.config
        worker_pid = int((deep / "warm" / "worker.pid").read_text())
        assert worker_pid != os.getpid() and alive(worker_pid)
        expected = node_reply(cold, fit())
        np.testing.assert_array_equal(first.arrays["logits"], expected.arrays["logits"])
        assert (deep / "warm" / "default" / "client_1" / "client_1.r0.safetensors").exists()

        evaluated = node_reply(warm, Message("evaluate", {}), round_index=1)
        assert evaluated.type == "evaluate_reply"
        assert evaluated.config == node_reply(cold, Message("evaluate", {}), round_index=1).config
        assert int((deep / "warm" / "worker.pid").read_text()) == worker_pid  # the same worker, warm

        wrong = np.zeros((2, 5, 5, 3), np.uint8)  # not the task's geometry: the worker reports it, lives on
        broken = node_reply(warm, Message("fit", {"seed": 3}, {"predict_images": wrong}))
        assert broken.type == "error" and alive(worker_pid)
    finally:
        supernode.kill()
        supernode.wait()
    assert worker_pid is not None
    assert wait_until(lambda: not alive(worker_pid), 15), "the worker outlived its SuperNode"
    assert not node_worker.socket_path(deep / "warm").exists()


def test_a_frame_over_the_limit_is_refused_before_it_is_read(tmp_path):
    import socket

    left, right = socket.socketpair()
    with left, right:
        left.sendall(node_worker._LENGTH.pack(1 << 40))
        with pytest.raises(Exception, match="exceeds the limit"):
            node_worker.recv_frame(right, 1 << 20)


def test_a_worker_running_older_code_steps_down_and_a_fresh_one_answers(tmp_path, monkeypatch):
    """After `pip install -U` (or an edit) the node's worker runs other code than its ClientApps: it answers
    `worker_stale` and stops, and the ClientApp starts a fresh worker for the same message."""
    import threading
    from types import SimpleNamespace

    from fedmmkt_core.errors import UserError

    root = tmp_path / "node"
    root.mkdir()
    workers: list[tuple[node_worker.Worker, threading.Thread]] = []

    def serve(code: str, name: str) -> None:  # a worker in a thread whose code has the fingerprint `code`
        def answer(request, round_index, start_round, context, factory):
            return Message("fit_reply", {"by": name, "asked": request.type})

        worker = node_worker.Worker(root, None, answer, lambda recipe, context: None, fingerprint=code)
        thread = threading.Thread(target=worker.serve, daemon=True)
        thread.start()
        workers.append((worker, thread))
        assert wait_until(lambda: (root / "worker.pid").is_file() and node_worker.socket_path(root).exists(), 10)
        time.sleep(0.1)  # from bind to listen

    def start_fresh(code: str, name: str):
        def start(root_, path, entry, watch_pid):
            (root / "worker.pid").unlink(missing_ok=True)
            started.append(name)
            serve(code, name)
            return node_worker._connect(path)

        return start

    def ask():
        context = SimpleNamespace(node_config={}, run_config={}, run_id=1)
        return node_worker.worker_reply(root, Message("fit", {}), 0, 0, context, 1 << 20, ["-"], os.getpid())

    started: list[str] = []
    monkeypatch.setattr(node_worker, "code_fingerprint", lambda: "old-code")
    try:
        serve("old-code", "old")
        assert ask().config == {"by": "old", "asked": "fit"}  # the same code: no restart

        monkeypatch.setattr(node_worker, "code_fingerprint", lambda: "new-code")  # the toolkit was upgraded
        monkeypatch.setattr(node_worker, "_start_worker", start_fresh("new-code", "new"))
        assert ask().config == {"by": "new", "asked": "fit"}
        old, old_thread = workers[0]
        old_thread.join(10)
        assert old.stale and not old_thread.is_alive() and started == ["new"]
        assert ask().config == {"by": "new", "asked": "fit"} and started == ["new"]  # the fresh one stays

        monkeypatch.setattr(node_worker, "code_fingerprint", lambda: "newer-code")
        monkeypatch.setattr(node_worker, "_start_worker", start_fresh("new-code", "still-new"))
        with pytest.raises(UserError, match="runs other code than this ClientApp even after a restart"):
            ask()  # a restart that does not help is a clear error, not a loop
    finally:
        for worker, thread in workers:
            worker.stale = True
            thread.join(10)
