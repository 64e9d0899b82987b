"""A node's client state for a Flower run (``<state-dir>/<run key>/client_K``): deleted when the run
finishes (the ServerApp's ``release`` message), kept when it fails or is interrupted (``--resume``)."""

import types

import numpy as np
import pytest
from test_fedmmkt import RECIPE

from fedmmkt_core.wire import Message

pytest.importorskip("flwr", reason="the flower extra is not installed")

from test_flower_privacy import DP, flower_task, node_context, node_reply  # noqa: E402,F401  (a fixture)


def fit() -> Message:
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    return Message("fit", {"seed": 3, "logits_dtype": "float32"}, {"predict_images": images})


def test_a_node_deletes_a_finished_runs_state_and_keeps_its_privacy_ledger(tmp_path, flower_task):
    context = node_context(RECIPE, {"state-dir": str(tmp_path / "state")})
    assert node_reply(context, fit()).type == "fit_reply"
    folder = tmp_path / "state" / "default" / "client_1"
    assert [p.name for p in folder.glob("*.safetensors")] == ["client_1.r0.safetensors"]

    other_run = node_context(RECIPE, {"state-dir": str(tmp_path / "state")})
    other_run.run_id = 8  # a release from another Flower run: the folder belongs to run 7
    assert node_reply(other_run, Message("release", {})).type == "release_reply"
    assert (folder / "client_1.r0.safetensors").exists()

    assert node_reply(context, Message("release", {})).type == "release_reply"
    assert not (tmp_path / "state" / "default").exists()  # the run key's folder went with its last client
    assert node_reply(context, Message("release", {})).type == "release_reply"  # twice: nothing left, no error

    private = node_context(RECIPE + DP, {"state-dir": str(tmp_path / "dp")})
    node_reply(private, fit())
    node_reply(private, Message("release", {}))
    kept = tmp_path / "dp" / "default" / "client_1"
    assert sorted(p.name for p in kept.iterdir()) == [".lock", "client_1.privacy.json"]  # the site's record


@pytest.mark.parametrize("fails", [False, True])
def test_the_serverapp_releases_the_nodes_only_after_a_finished_run(tmp_path, monkeypatch, fails):
    from fedmmkt_plugins.backends.flower import server_app
    from fedmmkt_plugins.backends.flower.backend import FlowerBackend
    from fedmmkt_plugins.backends.flower.codec import b64

    import fedmmkt_core.server.runner as runner_module
    from fedmmkt_core.recipe import dump_yaml, parse_recipe

    released = []
    monkeypatch.setattr(FlowerBackend, "release_nodes", lambda self: released.append(self.grid))

    class Runner:
        def __init__(self, *args, **kwargs):
            pass

        def run(self):
            if fails:
                raise RuntimeError("round 2 failed")
            return {}

    monkeypatch.setattr(runner_module, "Runner", Runner)
    recipe = dump_yaml(parse_recipe(RECIPE + "backend: {name: flower}\n").resolved())
    context = types.SimpleNamespace(run_config={"out-dir": str(tmp_path / "out"), "recipe": b64(recipe)})
    if fails:
        with pytest.raises(RuntimeError, match="round 2 failed"):
            server_app.serve("the grid", context)
    else:
        server_app.serve("the grid", context)
    assert released == ([] if fails else ["the grid"])
