"""Differential privacy on Flower: the privacy section reaches every node, and what a node actually
sends under DP is noised logits only, with the ε the client computed from its own ledger.

Read through the real ClientApp handler with the run config a node receives (cheap), and on a real
local deployment (a SuperLink and 2 SuperNodes on 127.0.0.1) whose replies the ServerApp records as
they arrive (``record_replies``).
"""

import base64
import json

import numpy as np
import pytest
from test_fedmmkt import RECIPE

from fedmmkt_core.privacy import PrivacyLedger, SoftLabelPrivacy
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.wire import Message

pytest.importorskip("flwr", reason="the flower extra is not installed")

from fedmmkt_plugins.backends.flower import LocalFederation  # noqa: E402
from fedmmkt_plugins.backends.flower.backend import REPLIES_FOLDER, WIRE_FILE  # noqa: E402
from fedmmkt_plugins.backends.flower.client_app import handle_client  # noqa: E402
from fedmmkt_plugins.backends.flower.codec import from_records, to_records  # noqa: E402
from fedmmkt_plugins.backends.flower.packaging import client_run_config  # noqa: E402

DP = "privacy: {noise_multiplier: 1.0, clip_norm: 5.0}\n"
SPEC = SoftLabelPrivacy(noise_multiplier=1.0, clip_norm=5.0)


@pytest.fixture
def flower_task(monkeypatch):
    """Flower's message constructor reads the identity of the task running in this process."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def node_reply(context, message: Message, round_index: int = 0) -> Message:
    from flwr.app import Message as FlowerMessage

    sent = FlowerMessage(to_records(message, round_index, 0), 1, "train")
    return from_records(handle_client(sent, context).content)


# A fit reply under DP: the ε and noise of its noised logits, and the evaluation it carries (the accuracy on
# the shared evaluation split, as an evaluate reply reports it: a measurement, not training data).
NOISED_FIT_REPLY = {"privacy_epsilon", "privacy_noise_multiplier", "accuracy", "num_test"}


def node_context(recipe_text: str, node_config: dict):
    from flwr.app import Context, RecordDict

    return Context(
        run_id=7,
        node_id=1,
        node_config={"partition-id": 1, "num-partitions": 3, **node_config},
        state=RecordDict(),
        run_config=client_run_config(parse_recipe(recipe_text)),
    )


def fit(images: np.ndarray) -> Message:
    return Message("fit", {"seed": 3, "logits_dtype": "float32"}, {"predict_images": images})


def test_a_node_under_dp_sends_only_noised_logits_and_its_own_epsilon(tmp_path, flower_task):
    """The node's run config carries the privacy section: the reply of the real ClientApp handler
    holds noised logits and the ε from the node's ledger, nothing else; the control without DP sends
    clean logits, class counts, the sample count and the loss."""
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    clean = node_reply(node_context(RECIPE, {"state-dir": str(tmp_path / "clean")}), fit(images))
    assert {"class_counts", "logits"} <= set(clean.arrays) and {"num_samples", "loss"} <= set(clean.config)
    assert np.abs(clean.arrays["logits"]).max() < 50

    context = node_context(RECIPE + DP, {"state-dir": str(tmp_path / "dp")})
    assert json.loads(base64.b64decode(context.run_config["client-privacy"]))["noise_multiplier"] == 1.0
    noised = node_reply(context, fit(images))
    assert set(noised.arrays) == {"logits"} and set(noised.config) == {"privacy_epsilon", "privacy_noise_multiplier"}
    assert noised.arrays["logits"].astype(np.float64).std() > 0.5 * SPEC.noise_std(
        len(images)
    )  # noise of the stated size
    assert noised.config["privacy_epsilon"] == pytest.approx(SPEC.epsilon(1))
    ledger_path = tmp_path / "dp" / "default" / "client_1" / "client_1.privacy.json"
    assert [e["rows"] for e in PrivacyLedger(ledger_path).entries] == [40]  # kept with the node's weights
    again = node_reply(context, fit(images), round_index=1)  # a new ClientApp for every message: the ledger persists
    assert again.config["privacy_epsilon"] == pytest.approx(SPEC.epsilon(2))
    evaluated = node_reply(context, Message("evaluate", {}), round_index=1)
    assert evaluated.config["privacy_epsilon"] == pytest.approx(SPEC.epsilon(2))

    refused = node_reply(context, Message("fit", {"seed": 3, "return_weights": True}), round_index=1)
    assert refused.type == "error" and "does not send its weights" in refused.config["reason"]

    memory = node_context(RECIPE + DP, {})  # a node without a state folder: the ledger in the run's state
    node_reply(memory, fit(images))
    assert node_reply(memory, fit(images)).config["privacy_epsilon"] == pytest.approx(SPEC.epsilon(2))


@pytest.fixture
def federation(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fed = LocalFederation(2, tmp_path / "federation")
    try:
        fed.start()
        yield fed
    finally:
        fed.stop()


def test_flower_deployment_under_dp_nodes_send_only_noised_logits(tmp_path, federation):
    """A run on a real deployment under DP: every reply the ServerApp received, as it arrived, holds
    only noised logits (no class counts, sample count or loss), and the run's ε is the one the
    clients computed from their ledgers on their nodes."""
    from fedmmkt_cli.main import app
    from typer.testing import CliRunner

    params = f'superlink: "{federation.address}", insecure: true, record_replies: true'
    backend = f"backend: {{name: flower, params: {{{params}}}}}\n"
    recipe = tmp_path / "dp.yaml"
    two_clients = RECIPE.replace("count: 3", "count: 2").replace("rounds: 2", "rounds: 1")
    assert two_clients.count("count: 2") == 1
    recipe.write_text(two_clients + DP + backend)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output

    replies = {path.name: Message.decode(path.read_bytes()) for path in (out / REPLIES_FOLDER).glob("*.msg")}
    fits = {name: reply for name, reply in replies.items() if reply.type == "fit_reply"}
    assert sorted(name.split("-")[1] for name in fits) == ["client0", "client1"]
    for reply in fits.values():
        assert set(reply.arrays) == {"logits"} and set(reply.config) == NOISED_FIT_REPLY
        logits = reply.arrays["logits"].astype(np.float64)
        assert logits.std() > 0.5 * SPEC.noise_std(len(logits))  # the clean logits are within ±20
    for reply in replies.values():
        assert "class_counts" not in reply.arrays and not {"num_samples", "loss"} & set(reply.config)
    assert not any("failure" in json.loads(line) for line in (out / WIRE_FILE).read_text().splitlines())

    run_key = json.loads((out / "flower_run.json").read_text())["run_key"]
    computed = []
    for k in range(2):
        ledger = PrivacyLedger(federation.workdir / f"state-{k}" / run_key / f"client_{k}" / f"client_{k}.privacy.json")
        assert len(ledger.entries) == 1
        computed.append(ledger.epsilon(SPEC.delta))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy_epsilon"] == pytest.approx(max(computed)) == pytest.approx(SPEC.epsilon(1))
    assert [reply.config["privacy_epsilon"] for reply in fits.values()] == pytest.approx([SPEC.epsilon(1)] * 2)


def test_a_nodes_own_privacy_settings_and_budget_win_when_stricter(tmp_path, flower_task):
    """The site sets more noise and a budget of one upload in its node config: its client noises with
    the site's multiplier, reports that ε and refuses the second upload, whatever the recipe says."""
    images = np.zeros((40, 8, 8, 1), np.uint8)
    site = SoftLabelPrivacy(noise_multiplier=4.0, clip_norm=5.0)
    config = {"state-dir": str(tmp_path), "dp-noise-multiplier": 4.0, "dp-max-epsilon": site.epsilon(1) + 1e-6}
    context = node_context(RECIPE + DP, config)
    first = node_reply(context, fit(images))
    assert first.config["privacy_epsilon"] == pytest.approx(site.epsilon(1))
    ledger = PrivacyLedger(tmp_path / "default" / "client_1" / "client_1.privacy.json")
    assert [e["noise_multiplier"] for e in ledger.entries] == [4.0]
    refused = node_reply(context, fit(images), round_index=1)
    assert refused.type == "error" and "refuses: privacy budget" in refused.config["reason"]
    # A recipe without privacy, a site that wants DP: the node noises anyway.
    wants_dp = node_context(RECIPE, {"state-dir": str(tmp_path / "own"), "dp-noise-multiplier": 4.0})
    own = node_reply(wants_dp, fit(images))
    assert set(own.arrays) == {"logits"} and set(own.config) == {"privacy_epsilon", "privacy_noise_multiplier"}


def test_a_recipe_without_privacy_takes_a_dp_sites_upload_and_weighs_every_client_alike(tmp_path, flower_task):
    """The site of a recipe without DP that runs under its own sends noised logits, no class counts: the
    server bounds them by the noise the site reports (not by the clean bound) and does not ask for counts,
    and the class-aware KD weighting falls back to uniform for the round, as under the recipe's DP."""
    from fedmmkt_plugins.aggregators.kd import KDAggregator
    from fedmmkt_plugins.algorithms.fedmmkt import MAX_ABS_LOGIT, FedMMKT

    from fedmmkt_core.interfaces import ClientReply
    from fedmmkt_core.wire import MessageError

    images = np.random.default_rng(0).integers(0, 255, (400, 8, 8, 1), dtype=np.uint8)
    wants_dp = {"state-dir": str(tmp_path / "dp"), "dp-noise-multiplier": 4.0}
    site = node_reply(node_context(RECIPE, wants_dp), fit(images))
    clean = node_reply(node_context(RECIPE, {"state-dir": str(tmp_path / "clean")}), fit(images))
    algorithm = FedMMKT(FedMMKT.Config(logits_dtype="float32"))
    algorithm.class_prompts = [f"class {c}" for c in range(10)]
    algorithm.privacy = None  # the recipe's
    assert np.abs(site.arrays["logits"]).max() > MAX_ABS_LOGIT  # beyond the clean bound: 4 x 2 x 5 x sqrt(400)
    algorithm._check_logits(site, len(images))  # taken, without class counts
    algorithm._check_logits(clean, len(images))
    unreported = Message("fit_reply", {}, {"logits": site.arrays["logits"]})
    with pytest.raises(MessageError, match="beyond the plausible"):
        algorithm._check_logits(unreported, len(images))  # no noise reported: the clean bound
    replies = [
        ClientReply(k, r.arrays["logits"], int(r.config.get("num_samples", 0)), r.arrays.get("class_counts"))
        for k, r in enumerate((clean, site))
    ]
    aggregator = KDAggregator(KDAggregator.Config(weighting="class_aware"))
    q = aggregator.aggregate(0, replies)
    assert aggregator.weighting == "uniform" and np.allclose(q.sum(axis=1), 1.0)


def test_flower_simulation_under_dp_nodes_send_only_noised_logits(tmp_path, monkeypatch):
    """The same on Flower's simulation engine (one virtual SuperNode per client, Ray)."""
    pytest.importorskip("ray", reason="the flower-simulation extra is not installed")
    from fedmmkt_cli.main import app
    from typer.testing import CliRunner

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    params = "mode: simulation, num_cpus_per_client: 1, ray_num_cpus: 2, record_replies: true"
    recipe = tmp_path / "dp.yaml"
    two_clients = RECIPE.replace("count: 3", "count: 2").replace("rounds: 2", "rounds: 1")
    recipe.write_text(two_clients + DP + f"backend: {{name: flower, params: {{{params}}}}}\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output

    replies = [Message.decode(path.read_bytes()) for path in sorted((out / REPLIES_FOLDER).glob("*-fit_reply.msg"))]
    assert len(replies) == 2
    for reply in replies:
        assert set(reply.arrays) == {"logits"} and set(reply.config) == NOISED_FIT_REPLY
        logits = reply.arrays["logits"].astype(np.float64)
        assert logits.std() > 0.5 * SPEC.noise_std(len(logits))
    run_key = json.loads((out / "flower_run.json").read_text())["run_key"]
    state = out / "checkpoints" / "clients" / run_key
    computed = [PrivacyLedger(state / f"client_{k}" / f"client_{k}.privacy.json").epsilon(SPEC.delta) for k in range(2)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy_epsilon"] == pytest.approx(max(computed)) == pytest.approx(SPEC.epsilon(1))


def test_a_node_under_dp_charges_a_predict_exchange_and_not_the_fit_that_distils_on_it(tmp_path, flower_task):
    """`distill_on: this-round` on a node under DP: the round's predict exchange is one charged upload of
    noised logits only; the fit that then distils on those images uploads nothing and charges nothing."""
    images = np.random.default_rng(1).integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)
    context = node_context(RECIPE + DP, {"state-dir": str(tmp_path)})
    predicted = node_reply(context, Message("predict", {"seed": 5, "logits_dtype": "float32"}, {"images": images}))
    assert predicted.type == "predict_reply"
    assert set(predicted.arrays) == {"logits"}
    assert set(predicted.config) == {"privacy_epsilon", "privacy_noise_multiplier"}
    assert predicted.arrays["logits"].astype(np.float64).std() > 0.5 * SPEC.noise_std(len(images))
    assert predicted.config["privacy_epsilon"] == pytest.approx(SPEC.epsilon(1))

    soft = np.full((len(images), 10), 0.1, np.float32)
    distil = Message("fit", {"seed": 5}, {"distill_images": images, "distill_soft_labels": soft})
    fitted = node_reply(context, distil)
    assert fitted.type == "fit_reply" and set(fitted.arrays) == set()
    assert fitted.config == {"privacy_epsilon": pytest.approx(SPEC.epsilon(1)), "privacy_noise_multiplier": 1.0}
    ledger = PrivacyLedger(tmp_path / "default" / "client_1" / "client_1.privacy.json")
    assert [(e["type"], e["rows"]) for e in ledger.entries] == [("predict", 30)]
