"""A server that does not follow the protocol, against clients under local DP.

The client counts its own uploads (its privacy ledger), so a modified server can neither average the
noise away with repeated queries past the budget, nor get weights, nor pick the noise through the seed
it sends, nor hide uploads of rounds that failed or were re-run after a resume.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedmmkt_example_plugin.softmax_regression import SoftmaxRegressionClient
from test_fedmmkt import RECIPE

from fedmmkt_core.client import ClientRuntime
from fedmmkt_core.data import ImageSet, TaskSpec
from fedmmkt_core.faults import CRASH_ENV
from fedmmkt_core.hookspecs import hookimpl
from fedmmkt_core.plugins import PluginManager
from fedmmkt_core.privacy import PrivacyLedger, PrivacyRefused, SoftLabelPrivacy
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.server.runner import RunFailed, Runner
from fedmmkt_core.wire import Message

SPEC = SoftLabelPrivacy(noise_multiplier=1.0)
TASK = TaskSpec(("a", "b", "c"), image_size=8, channels=1)


class Linear:
    """A client model whose logits are a fixed function of the image (so clean differences are known)."""

    def __init__(self):
        self.fits = 0

    def predict_logits(self, images):
        x = images.reshape(len(images), -1).astype(np.float32) / 255.0
        return np.stack([x.mean(1), x[:, :8].mean(1), -x.mean(1)], axis=1)

    def fit(self, train, distill, seed):
        self.fits += 1
        return {"loss": 0.5}

    def get_weights(self):
        return {"w": np.ones(3, np.float32)}


def runtime(spec=SPEC, secret=None, ledger=None, client_id=1):
    data = ImageSet(np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 2, 0]))
    return ClientRuntime(client_id, Linear(), data, data, TASK, privacy=spec, secret=secret, ledger=ledger)


def predict(client, images=None, seed=17):
    images = np.zeros((50, 8, 8, 1), np.uint8) if images is None else images
    return client.handle(Message("predict", {"seed": seed, "logits_dtype": "float32"}, {"images": images}))


def test_repeated_predict_beyond_the_budget_is_refused(tmp_path):
    spec = SoftLabelPrivacy(noise_multiplier=1.0, max_epsilon=SPEC.epsilon(3) + 1e-9)
    path = tmp_path / "client_1.privacy.json"
    client = runtime(spec, ledger=PrivacyLedger(path))
    replies = [predict(client) for _ in range(3)]
    assert [r.config["privacy_epsilon"] for r in replies] == pytest.approx([SPEC.epsilon(t) for t in (1, 2, 3)])
    with pytest.raises(PrivacyRefused, match=r"client 1 refuses: privacy budget: this upload would bring ε to"):
        predict(client)
    restarted = runtime(spec, ledger=PrivacyLedger(path))  # a new process, a resumed run: the ledger persists
    with pytest.raises(PrivacyRefused, match="max_epsilon"):
        predict(restarted)
    assert len(PrivacyLedger(path).entries) == 3
    # What the server could average: 3 answers, so the noise left is still std/√3, not std/√400.
    mean = np.mean([r.arrays["logits"] for r in replies], axis=0)
    assert mean.std() > 0.8 * spec.noise_std(50) / np.sqrt(3)


def test_a_refused_upload_is_a_failure_the_server_records(tmp_path):
    """In a run, a budget that allows one round: every client refuses in round 2, the server records
    why and stops with that reason (fewer than min_clients answered), after round 1 was written."""
    recipe = parse_recipe(RECIPE + f"privacy: {{noise_multiplier: 1.0, max_epsilon: {SPEC.epsilon(1) + 0.5}}}\n")
    with pytest.raises(RunFailed, match=r"round 2, phase 'fit'.*client 0: PrivacyRefused: client 0 refuses: privacy"):
        Runner(recipe, tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [1] and rows[0]["privacy_epsilon"] == pytest.approx(SPEC.epsilon(1))


def test_return_weights_is_refused_under_dp_before_any_training():
    client = runtime()
    with pytest.raises(PrivacyRefused, match="does not send its weights"):
        client.handle(Message("fit", {"seed": 1, "return_weights": True}))
    assert client.model.fits == 0 and client.ledger.entries == []
    plain = runtime(spec=None)  # without DP the FedAvg baseline gets them, as labelled
    assert "weights/w" in plain.handle(Message("fit", {"seed": 1, "return_weights": True})).arrays


@pytest.mark.parametrize("secret", [None, "site-secret"])
def test_same_seed_requests_get_independent_noise(secret):
    """Two requests with the same seed and images differing in one image: the difference of the
    replies is the clean difference plus fresh noise of the full size, not the clean difference."""
    client = runtime(secret=secret)
    first = predict(client).arrays["logits"]
    again = predict(client).arrays["logits"]
    std = SPEC.noise_std(50)
    noise_a, noise_b = first - first.mean(), again - again.mean()
    assert abs(np.corrcoef(noise_a.ravel(), noise_b.ravel())[0, 1]) < 0.35  # independent draws (150 values)
    changed = np.zeros((50, 8, 8, 1), np.uint8)
    changed[0] = 255
    clean_difference = Linear().predict_logits(changed) - Linear().predict_logits(np.zeros_like(changed))
    difference = predict(client, changed).arrays["logits"] - predict(client).arrays["logits"]
    assert (difference - clean_difference).std() > 0.8 * std * np.sqrt(2)  # not 0: nothing cancels


def test_the_server_seed_does_not_choose_secret_keyed_noise():
    """With a client secret, noise follows the client's upload counter: fresh clients answering seeds
    1 and 999 draw the same noise (the seed is not an input), and no server seed repeats an upload's."""
    one = predict(runtime(secret="site-secret"), seed=1).arrays["logits"]
    np.testing.assert_array_equal(one, predict(runtime(secret="site-secret"), seed=999).arrays["logits"])
    client = runtime(secret="site-secret")
    uploads = [predict(client, seed=1).arrays["logits"] for _ in range(3)]
    assert not np.array_equal(uploads[0], uploads[1]) and not np.array_equal(uploads[1], uploads[2])


class FlakyClient(SoftmaxRegressionClient):
    """Crashes in every fit after the first one while ``broken`` holds (round 2 fails; the fault is
    gone before the resume)."""

    broken = True
    fits = 0

    def fit(self, train, distill, seed):
        FlakyClient.fits += 1
        if FlakyClient.broken and FlakyClient.fits > 1:
            raise RuntimeError("client disk full")
        return super().fit(train, distill, seed)


class FlakyPlugin:
    @hookimpl
    def register_client_models(self, register):
        register("flaky", FlakyClient)


def ledgers(run_dir: Path, clients: int) -> list[int]:
    folder = run_dir / "checkpoints" / "clients"
    return [len(PrivacyLedger(folder / f"client_{k}.privacy.json").entries) for k in range(clients)]


def test_a_failed_round_and_its_rerun_after_resume_are_both_counted(tmp_path, monkeypatch):
    """Round 2 fails (a client crashes, min_clients=3) after the others uploaded; the run resumes and
    re-runs round 2. Every client counted every upload: the run reports ε of 3 uploads after 2 rounds
    (the server's count of rounds would say 2)."""
    registry = PluginManager().add_plugin(FlakyPlugin(), package="test-flaky")
    text = RECIPE.replace(
        "  - {name: cnn, count: 3, params: {channels: [8, 16], hidden: 32, lr: 0.003}}",
        "  - {name: softmax-regression, count: 2}\n  - {name: flaky}",
    ).replace("federation: {rounds: 2}", "federation: {rounds: 2, min_clients: 3}")
    recipe = parse_recipe(text + "privacy: {noise_multiplier: 1.0}\n", registry=registry)
    out = tmp_path / "run"
    monkeypatch.setattr(FlakyClient, "broken", True)
    monkeypatch.setattr(FlakyClient, "fits", 0)
    with pytest.raises(RunFailed, match="round 2, phase 'fit': only 2 of 3 clients.*client disk full"):
        Runner(recipe, out).run()
    assert ledgers(out, 3) == [2, 2, 2]  # charged before the work: the crashed client's upload too
    monkeypatch.setattr(FlakyClient, "broken", False)
    summary = Runner(recipe, out, resume=True).run()
    assert ledgers(out, 3) == [3, 3, 3]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["privacy_epsilon"] for row in rows] == pytest.approx([SPEC.epsilon(1), SPEC.epsilon(3)])
    assert summary["rounds_completed"] == 2 and summary["privacy_epsilon"] == pytest.approx(SPEC.epsilon(3))


def test_uploads_of_a_round_killed_mid_way_count_after_resume(tmp_path):
    """SIGKILL the run after two clients saved their round-1 work (their uploads had left), resume:
    round 1 runs again, and the run reports the ε of those clients' two uploads."""
    recipe = tmp_path / "dp.yaml"
    recipe.write_text(RECIPE.replace("rounds: 2", "rounds: 1") + "privacy: {noise_multiplier: 1.0}\n")
    out = tmp_path / "run"
    cli = Path(sys.executable).with_name("fedmmkt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", CRASH_ENV: "client_saved#2"}
    killed = subprocess.run(
        [str(cli), "run", str(recipe), "--out", str(out)], env=env, capture_output=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode(errors="replace")
    assert ledgers(out, 3) == [1, 1, 0]
    env.pop(CRASH_ENV)
    resumed = subprocess.run([str(cli), "run", "--resume", str(out)], env=env, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode(errors="replace")
    assert ledgers(out, 3) == [2, 2, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy_epsilon"] == pytest.approx(SPEC.epsilon(2))
