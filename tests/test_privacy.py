"""Differential privacy on the uploaded soft labels: clipping and noise by hand, the accountant's ε,
recipe checks, and a FedMMKT run that reports the ε spent every round."""

import json

import numpy as np
import pytest
from test_fedmmkt import RECIPE

from fedmmkt_core.errors import RecipeError
from fedmmkt_core.privacy import SoftLabelPrivacy
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.server.runner import Runner


def test_rows_are_clipped_to_the_norm_and_noise_has_the_stated_std():
    logits = np.array([[3.0, 4.0], [0.3, 0.4]], dtype=np.float32)  # norms 5 and 0.5
    tiny_noise = SoftLabelPrivacy(clip_norm=1.0, noise_multiplier=1e-9)
    clipped = tiny_noise.privatize(logits, np.random.default_rng(0))
    np.testing.assert_allclose(clipped, [[0.6, 0.8], [0.3, 0.4]], atol=1e-6)

    spec = SoftLabelPrivacy(clip_norm=2.0, noise_multiplier=0.5)
    assert spec.noise_std(100) == pytest.approx(0.5 * 2 * 2.0 * 10)  # z * 2C * sqrt(n)
    zeros = np.zeros((100, 400), dtype=np.float32)
    noise = spec.privatize(zeros, np.random.default_rng(3))
    assert noise.std() == pytest.approx(20.0, rel=0.02)
    np.testing.assert_array_equal(noise, spec.privatize(zeros, np.random.default_rng(3)))  # from the rng alone


def _runtime(secret, client_id=1):
    """A client runtime whose model predicts zeros, so its upload is exactly the noise."""
    from fedmmkt_core.client import ClientRuntime
    from fedmmkt_core.data import ImageSet, TaskSpec

    class Zeros:
        def predict_logits(self, images):
            return np.zeros((len(images), 3), np.float32)

    task = TaskSpec(("a", "b", "c"), image_size=8, channels=1)
    data = ImageSet(np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 2, 0]))
    privacy = SoftLabelPrivacy(noise_multiplier=1.0)
    return ClientRuntime(client_id, Zeros(), data, data, task, privacy=privacy, secret=secret)


def _upload(runtime, seed=17):
    from fedmmkt_core.wire import Message

    images = np.zeros((5, 8, 8, 1), np.uint8)
    reply = runtime.handle(Message("predict", {"seed": seed, "logits_dtype": "float32"}, {"images": images}))
    return reply


def test_dp_noise_comes_from_the_client_alone():
    """The server knows the recipe seed, the round's message seed and the client id; none of them,
    alone or in the derivation the toolkit used before, regenerates the noise."""
    from fedmmkt_core.seeding import derive_seed

    spec = SoftLabelPrivacy(noise_multiplier=1.0)
    reply = _upload(_runtime(secret=None))
    noise = reply.arrays["logits"]
    assert set(reply.arrays) == {"logits"}  # counts withheld
    # sample count withheld; ε and the noise the client ran under reported
    assert reply.config == {"privacy_epsilon": pytest.approx(spec.epsilon(1)), "privacy_noise_multiplier": 1.0}
    server_guesses = [derive_seed(17, "dp-noise", 1), 17, 1, derive_seed(0, "dp-noise", 1), 0]
    for guess in server_guesses:
        regenerated = spec.privatize(np.zeros((5, 3)), np.random.default_rng(guess))
        assert not np.allclose(regenerated, noise)
    assert not np.array_equal(noise, _upload(_runtime(secret=None)).arrays["logits"])  # OS entropy: never twice


def test_a_client_secret_makes_dp_noise_reproducible_for_that_client_only():
    """With a secret the noise is keyed to the client's own upload counter: a fresh client repeats its
    experiment exactly, whatever seed the server sends; its next upload gets new noise."""
    first = _upload(_runtime(secret="site-1-secret")).arrays["logits"]
    np.testing.assert_array_equal(first, _upload(_runtime(secret="site-1-secret")).arrays["logits"])
    np.testing.assert_array_equal(first, _upload(_runtime(secret="site-1-secret"), seed=18).arrays["logits"])
    assert not np.array_equal(first, _upload(_runtime(secret="another")).arrays["logits"])
    assert not np.array_equal(first, _upload(_runtime(secret="site-1-secret", client_id=2)).arrays["logits"])
    runtime = _runtime(secret="site-1-secret")
    _upload(runtime)
    assert not np.array_equal(first, _upload(runtime).arrays["logits"])  # the same request again: new noise


def test_epsilon_comes_from_the_rdp_accountant_and_grows_with_rounds():
    spec = SoftLabelPrivacy(noise_multiplier=1.0, delta=1e-5)
    assert spec.epsilon(0) == 0.0
    values = [spec.epsilon(t) for t in (1, 2, 4, 8)]
    assert values == sorted(values) and values[0] > 0
    assert values[-1] == pytest.approx(16.51, abs=0.05)  # Gaussian mechanism, z=1, 8 compositions, δ=1e-5
    assert SoftLabelPrivacy(noise_multiplier=2.0).epsilon(8) < values[-1]
    assert spec.epsilon_spent([3, 8, 1]) == pytest.approx(values[-1])


def test_privacy_needs_an_algorithm_that_uploads_soft_labels():
    fedmmkt = "algorithm: {name: fedmmkt, params: {samples_per_class: 4, eval_samples_per_class: 4}}"
    assert fedmmkt in RECIPE
    recipe = RECIPE.replace(fedmmkt, "algorithm: {name: local}\nprivacy: {noise_multiplier: 1.0}")
    with pytest.raises(RecipeError, match="privacy: privacy covers uploaded soft labels.*'local' uploads none"):
        parse_recipe(recipe)
    with pytest.raises(RecipeError, match="privacy.noise_multiplier"):
        parse_recipe(RECIPE + "privacy: {clip_norm: 1.0}\n")


@pytest.mark.parametrize("distill_on", ["previous-round", "this-round"])
def test_fedmmkt_run_with_privacy_reports_epsilon_per_round(tmp_path, distill_on):
    recipe = RECIPE.replace("rounds: 2", "rounds: 3") + "privacy: {noise_multiplier: 1.0, clip_norm: 5.0}\n"
    recipe = recipe.replace("name: fedmmkt, params: {", f"name: fedmmkt, params: {{distill_on: {distill_on}, ")
    summary = Runner(parse_recipe(recipe), tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    spec = SoftLabelPrivacy(noise_multiplier=1.0)
    assert [row["privacy_epsilon"] for row in rows] == pytest.approx([spec.epsilon(t) for t in (1, 2, 3)])
    assert summary["privacy_epsilon"] == pytest.approx(spec.epsilon(3))
    assert all(not row["failures"] for row in rows)  # noisy logits are still valid uploads
    assert all("train_loss" not in row for row in rows)  # losses are withheld under DP


def test_two_dp_runs_differ_unless_the_client_secret_fixes_the_noise(tmp_path, monkeypatch):
    recipe = parse_recipe(RECIPE.replace("rounds: 2", "rounds: 1") + "privacy: {noise_multiplier: 1.0}\n")

    def alignment(name):
        Runner(recipe, tmp_path / name).run()
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["alignment_mean"] for line in lines]

    monkeypatch.delenv("FEDMMKT_CLIENT_SECRET", raising=False)
    assert alignment("a") != alignment("b")
    monkeypatch.setenv("FEDMMKT_CLIENT_SECRET", "shared-by-the-experimenter")
    assert alignment("c") == alignment("d")


def test_a_site_runs_under_the_stricter_of_its_own_privacy_settings_and_the_recipes(monkeypatch):
    from fedmmkt_core.client import ClientFactory
    from fedmmkt_core.errors import UserError
    from fedmmkt_core.privacy import PrivacyRefused, SitePrivacy

    recipe = SoftLabelPrivacy(noise_multiplier=1.0, delta=1e-5, max_epsilon=20.0)
    site = SitePrivacy.read({"dp-noise-multiplier": 2.0, "dp-max-epsilon": "50"}, environ={"FEDMMKT_DP_DELTA": "1e-6"})
    assert site.apply(recipe).model_dump() == {
        "clip_norm": 5.0,
        "noise_multiplier": 2.0,  # the site's: more noise
        "delta": 1e-6,  # the site's (environment): smaller
        "max_epsilon": 20.0,  # the recipe's: smaller
    }
    both = SitePrivacy.read({"dp-max-epsilon": 8}, environ={"FEDMMKT_DP_MAX_EPSILON": "3"})
    assert both.max_epsilon == 3  # environment and node config: the stricter too
    assert SitePrivacy().apply(recipe) == recipe and SitePrivacy().apply(None) is None
    assert SitePrivacy(noise_multiplier=0.5).apply(None).noise_multiplier == 0.5  # the site asks for DP itself
    with pytest.raises(PrivacyRefused, match="budget max_epsilon=3 needs DP"):
        SitePrivacy(max_epsilon=3).apply(None)
    with pytest.raises(UserError, match="FEDMMKT_DP_NOISE_MULTIPLIER='lots' is not a number"):
        SitePrivacy.read({}, environ={"FEDMMKT_DP_NOISE_MULTIPLIER": "lots"})
    with pytest.raises(UserError, match="site privacy settings"):
        SitePrivacy.read({"dp-delta": 2.0}, environ={})

    monkeypatch.setenv("FEDMMKT_DP_MAX_EPSILON", "2.5")  # in-process: the clients' environment
    client = ClientFactory(parse_recipe(RECIPE + "privacy: {noise_multiplier: 1.0}\n")).build(0)
    assert client.privacy.max_epsilon == 2.5 and client.privacy.noise_multiplier == 1.0


def test_the_server_bounds_a_stricter_sites_logits_by_the_noise_it_reports():
    """A site noisier than the recipe is not rejected as implausible: the bound follows its reported noise
    multiplier, up to MAX_SITE_NOISE_FACTOR times the recipe's; a lesser claim changes nothing."""
    from fedmmkt_plugins.algorithms.fedmmkt import MAX_ABS_LOGIT, MAX_SITE_NOISE_FACTOR, FedMMKT

    from fedmmkt_core.wire import Message, MessageError

    algorithm = FedMMKT()
    algorithm.class_prompts = [f"class {c}" for c in range(3)]
    algorithm.privacy = SoftLabelPrivacy(noise_multiplier=1.0)
    rows = 50
    recipe_bound = MAX_ABS_LOGIT + 8 * algorithm.privacy.noise_std(rows)
    site = SoftLabelPrivacy(noise_multiplier=4.0)  # what a site with dp-noise-multiplier=4 uploads
    logits = site.privatize(np.zeros((rows, 3)), np.random.default_rng(0)).astype(np.float16)  # the wire dtype
    logits[0, 0] = recipe_bound * 1.5  # a draw the recipe's noise makes implausible, the site's does not

    def reply(**config):
        return Message("fit_reply", {"privacy_epsilon": 1.0, **config}, {"logits": logits})

    with pytest.raises(MessageError, match="beyond the plausible"):
        algorithm._check_logits(reply(), rows)  # without the report: the recipe's bound
    with pytest.raises(MessageError, match="beyond the plausible"):
        algorithm._check_logits(reply(privacy_noise_multiplier=0.1), rows)  # less noise: the recipe's bound
    algorithm._check_logits(reply(privacy_noise_multiplier=4.0), rows)  # accepted
    huge = reply(privacy_noise_multiplier=1e5)  # capped at MAX_SITE_NOISE_FACTOR x the recipe's
    huge.arrays["logits"] = logits.copy()
    huge.arrays["logits"][0, 0] = MAX_ABS_LOGIT + 8 * (MAX_SITE_NOISE_FACTOR + 1) * algorithm.privacy.noise_std(rows)
    with pytest.raises(MessageError, match="beyond the plausible"):
        algorithm._check_logits(huge, rows)
    with pytest.raises(MessageError, match="positive and finite"):
        algorithm._check_logits(reply(privacy_noise_multiplier=-1.0), rows)
