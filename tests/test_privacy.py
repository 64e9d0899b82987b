"""Differential privacy on the uploaded soft labels: clipping and noise by hand, the accountant's ε,
recipe checks, and a FedMMKT run that reports the ε spent every round."""

import json

import numpy as np
import pytest
from test_fedmmkt import RECIPE

from fedmmkt_core.errors import RecipeError
from fedmmkt_core.privacy import SoftLabelPrivacy
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.runner import Runner


def test_rows_are_clipped_to_the_norm_and_noise_has_the_stated_std():
    logits = np.array([[3.0, 4.0], [0.3, 0.4]], dtype=np.float32)  # norms 5 and 0.5
    tiny_noise = SoftLabelPrivacy(clip_norm=1.0, noise_multiplier=1e-9)
    clipped = tiny_noise.privatize(logits, seed=0, client_id=0)
    np.testing.assert_allclose(clipped, [[0.6, 0.8], [0.3, 0.4]], atol=1e-6)

    spec = SoftLabelPrivacy(clip_norm=2.0, noise_multiplier=0.5)
    assert spec.noise_std(100) == pytest.approx(0.5 * 2 * 2.0 * 10)  # z * 2C * sqrt(n)
    zeros = np.zeros((100, 400), dtype=np.float32)
    noise = spec.privatize(zeros, seed=3, client_id=1)
    assert noise.std() == pytest.approx(20.0, rel=0.02)
    np.testing.assert_array_equal(noise, spec.privatize(zeros, seed=3, client_id=1))  # seeded
    assert not np.array_equal(noise, spec.privatize(zeros, seed=3, client_id=2))  # per client


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


def test_fedmmkt_run_with_privacy_reports_epsilon_per_round(tmp_path):
    recipe = RECIPE.replace("rounds: 2", "rounds: 3") + "privacy: {noise_multiplier: 1.0, clip_norm: 5.0}\n"
    summary = Runner(parse_recipe(recipe), tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    spec = SoftLabelPrivacy(noise_multiplier=1.0)
    assert [row["privacy_epsilon"] for row in rows] == pytest.approx([spec.epsilon(t) for t in (1, 2, 3)])
    assert summary["privacy_epsilon"] == pytest.approx(spec.epsilon(3))
    assert all(not row["failures"] for row in rows)  # noisy logits are still valid uploads
