"""Flower partition workflow: every SuperNode gets only its own data folder (split from tests/test_flower.py
so that pytest-xdist runs the long Flower tests on different workers)."""

import json
import signal
from pathlib import Path

import pytest
from fedmmkt_cli.main import app

pytest.importorskip("flwr", reason="the flower extra is not installed")

from fedmmkt_plugins.backends.flower import LocalFederation  # noqa: E402,F401
from test_flower import (  # noqa: E402
    SMOKE,
    THREE_CLIENTS,
    _read,
    alive,
    cli,
    federation_up,
    flower_backend,
    inprocess_reference,  # noqa: F401  (a module-scoped fixture: this module's own instance)
    rows_without_timing,
    run_cli,
    start_federation,
)
from test_flower_privacy import flower_task  # noqa: E402,F401  (a fixture)


def test_every_node_trains_on_its_own_data_folder(tmp_path, monkeypatch, inprocess_reference):
    """Each SuperNode gets only its own folder (written by `fedmmkt partition`) as data-root; the run's
    metrics equal the in-process run's; each node's client state went under its own folder and, the run
    having finished, is gone."""
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
        state = parts / f"client_{k}" / ".fedmmkt-state"
        assert state.is_dir() and not (state / run_key).exists()  # released after the run finished


def test_federation_up_with_data_gives_every_node_its_own_folder(tmp_path):
    import re

    parts = tmp_path / "parts"
    written = cli.invoke(app, ["partition", str(SMOKE), str(parts), "--set", "clients.0.count=1"])
    assert written.exit_code == 0, written.output
    with federation_up(tmp_path, "--data", str(parts)) as (proc, log):
        nodes = {int(k): int(pid) for k, pid in re.findall(r"supernode-(\d+): pid (\d+)", _read(log))}
        assert sorted(nodes) == [0, 1, 2]  # one node per client folder
        for k, pid in nodes.items():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert f"data-root={json.dumps(str(parts.resolve() / f'client_{k}'))}" in cmdline, cmdline
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert not [p for p in nodes.values() if alive(p)]


def test_a_node_with_a_data_root_reads_only_its_folder(tmp_path, monkeypatch, flower_task):
    """The real ClientApp handler on a node given data-root: it never calls the dataset plugin, checks
    its folder against the task in the server's hello, and answers as a node that cut its partition."""
    import numpy as np
    from fedmmkt_plugins.datasets.digits import DIGIT_NAMES, DigitsDataset
    from test_flower_privacy import node_context, node_reply

    from fedmmkt_core.recipe import dump_yaml, load_recipe
    from fedmmkt_core.wire import Message

    recipe = load_recipe(SMOKE, THREE_CLIENTS)
    text = dump_yaml(recipe.resolved())
    parts = tmp_path / "parts"
    written = cli.invoke(app, ["partition", str(SMOKE), str(parts), *sum((["--set", o] for o in THREE_CLIENTS), [])])
    assert written.exit_code == 0, written.output
    names = list(DIGIT_NAMES)
    task = {"class_names": names, "image_size": 8, "channels": 1}
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    messages = [
        Message("hello", {"task": task}),
        Message("fit", {"seed": 3, "logits_dtype": "float32"}, {"predict_images": images}),
        Message("evaluate", {}),
    ]
    cut = node_context(text, {"state-dir": str(tmp_path / "cut")})
    expected = [node_reply(cut, message) for message in messages]

    def refuse(self, seed):
        raise AssertionError("the node loaded the recipe's dataset")

    monkeypatch.setattr(DigitsDataset, "load", refuse)
    own = node_context(text, {"data-root": str(parts / "client_1")})
    got = [node_reply(own, message) for message in messages]
    for want, have in zip(expected, got, strict=True):
        assert (have.type, have.config) == (want.type, want.config), have.config
        assert set(have.arrays) == set(want.arrays)
        for name, array in want.arrays.items():
            np.testing.assert_array_equal(have.arrays[name], array)
    wrong = node_reply(own, Message("hello", {"task": {**task, "class_names": names[::-1]}}))
    assert wrong.type == "error" and "differ from the recipe's" in wrong.config["reason"]
