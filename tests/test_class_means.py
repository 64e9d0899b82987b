"""Class-mean feedback: each client's mean image per class, what it withholds, how it travels, what the server does."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fedmmkt_plugins.algorithms.class_means import (
    COUNTS,
    MEANS,
    check_class_means,
    federation_class_means,
    shifted_to_class_means,
)
from fedmmkt_plugins.clients.cnn import CNNClient, CNNConfig
from test_fedmmkt import RECIPE
from test_inversion import spy_on_the_generator

from fedmmkt_core.client import ClientRuntime
from fedmmkt_core.data import ImageSet
from fedmmkt_core.errors import RecipeError
from fedmmkt_core.privacy import SoftLabelPrivacy
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.server.runner import Runner
from fedmmkt_core.testing import digits_sample
from fedmmkt_core.wire import Message, MessageError


def test_class_means_are_each_class_s_mean_image_and_withhold_small_classes():
    images = np.array([0, 255, 51, 255, 0], np.uint8).reshape(5, 1, 1, 1)
    labels = np.array([0, 0, 1, 2, 2])
    means, counts = ImageSet(images, labels).class_means(num_classes=4, min_count=2)
    # class 0: (0 + 255) / 2 = 127.5 -> 0.0; class 2: the same; class 1 has one image (< 2); class 3 none
    assert counts.tolist() == [2, 0, 2, 0]
    assert means.ravel().tolist() == [0.0, 0.0, 0.0, 0.0]
    means, counts = ImageSet(images, labels).class_means(num_classes=4, min_count=1)
    assert counts.tolist() == [2, 1, 2, 0]
    assert means.ravel()[1] == pytest.approx(51 / 127.5 - 1)


def _reply(means, counts) -> Message:
    return Message("fit_reply", {}, {MEANS: np.asarray(means, np.float16), COUNTS: np.asarray(counts, np.int64)})


def test_the_federation_s_class_means_are_pooled_by_count_and_the_images_move_towards_them():
    first = _reply(np.array([0.5, -1.0]).reshape(2, 1, 1, 1), [30, 0])
    second = _reply(np.array([-0.5, 0.0]).reshape(2, 1, 1, 1), [10, 0])
    withheld = Message("fit_reply", {}, {})  # DP, or not asked: not pooled in
    means, held = federation_class_means({0: first, 1: second, 2: withheld})
    assert held.tolist() == [True, False]
    assert means.ravel()[0] == pytest.approx((30 * 0.5 + 10 * -0.5) / 40)  # 0.25
    assert federation_class_means({0: withheld}) is None
    # two images of class 0 at -1 and 0 (mean -0.5); class 1 has no mean and stays as it is
    images = np.array([0, 127.5, 200], np.float64).round().astype(np.uint8).reshape(3, 1, 1, 1)
    class_ids = np.array([0, 0, 1])
    moved, metrics = shifted_to_class_means(images, class_ids, means, held, strength=1.0)
    # class 0's images on the [-1, 1] scale: -1 and 0.0039 (mean -0.498); moved by 0.25 + 0.498 = 0.748
    scaled = images[:2].astype(np.float64).ravel() / 127.5 - 1 + (0.25 - (images[:2].ravel() / 127.5 - 1).mean())
    assert moved.ravel()[:2].tolist() == np.rint((scaled + 1) * 127.5).astype(int).tolist()
    assert moved.ravel()[2] == 200
    assert (moved[:2].astype(np.float64) / 127.5 - 1).mean() == pytest.approx(0.25, abs=1 / 127.5)
    assert metrics["class_mean_classes"] == 1.0
    half, _ = shifted_to_class_means(images, class_ids, means, held, strength=0.5)
    assert abs(int(half.ravel()[0]) - int(images.ravel()[0])) < abs(int(moved.ravel()[0]) - int(images.ravel()[0]))


@pytest.mark.parametrize(
    ("means", "counts", "match"),
    [
        (np.zeros((2, 8, 8, 1), np.float32), [0, 0], "dtype"),
        (np.zeros((3, 8, 8, 1), np.float16), [0, 0], "shape"),
        (np.full((2, 8, 8, 1), 1.5, np.float16), [30, 30], r"\[-1, 1\]"),
        (np.zeros((2, 8, 8, 1), np.float16), [3, 30], "at least 20"),
        (np.full((2, 8, 8, 1), 0.5, np.float16), [0, 30], "withheld"),
    ],
)
def test_broken_class_means_are_refused(means, counts, match):
    with pytest.raises(MessageError, match=match):
        check_class_means(_raw(means, counts), (2, 8, 8, 1), 20)
    check_class_means(Message("fit_reply", {}, {}), (2, 8, 8, 1), 20)  # none sent: nothing to check


def _raw(means, counts) -> Message:
    return Message("fit_reply", {}, {MEANS: means, COUNTS: np.asarray(counts, np.int64)})


def test_a_client_returns_its_class_means_when_asked_and_never_under_dp():
    data, task = digits_sample(120)
    images = data.images[:12]

    def runtime(privacy=None):
        model = CNNClient(CNNConfig(epochs=1, channels=(8, 16), hidden=16))
        model.build(task, seed=0)
        return ClientRuntime(0, model, data.subset(range(100)), data.subset(range(100, 120)), task, privacy=privacy)

    def fit(min_count):
        config = {"seed": 0, "logits_dtype": "float16", "class_means_min_count": min_count}
        return Message("fit", config, {"predict_images": images})

    reply = runtime().handle(fit(12))
    counts = reply.array(COUNTS, np.int64, (10,))
    train = data.subset(range(100))
    expected = np.bincount(train.labels, minlength=10)
    assert counts.tolist() == [n if n >= 12 else 0 for n in expected]
    shown = int(np.argmax(counts))
    mean = train.images[train.labels == shown].astype(np.float64).mean(axis=0) / 127.5 - 1
    assert np.allclose(reply.arrays[MEANS][shown], mean, atol=2e-3)  # float16 on the wire
    assert MEANS not in runtime().handle(Message("fit", {"seed": 0}, {"predict_images": images})).arrays
    private = runtime(SoftLabelPrivacy(noise_multiplier=1.0)).handle(fit(12))
    assert set(private.arrays) == {"logits"}  # under DP only the noised, accounted logits go up
    with pytest.raises(MessageError, match="at least 10"):  # whatever a server asks
        runtime().handle(fit(9))


def test_a_recipe_with_dp_refuses_class_mean_feedback():
    with pytest.raises(RecipeError, match="algorithm.params.class_mean_shift"):
        parse_recipe(RECIPE, overrides=["algorithm.params.class_mean_shift=0.5", "privacy.noise_multiplier=1.0"])


def test_fedmmkt_fine_tunes_on_its_images_moved_towards_the_clients_class_means(tmp_path, monkeypatch):
    generated, trained = spy_on_the_generator(monkeypatch)
    overrides = [
        "algorithm.params.class_mean_shift=1.0",
        "algorithm.params.class_mean_min_count=10",
        "algorithm.params.replay_buffer=0",
    ]
    Runner(parse_recipe(RECIPE, overrides=overrides), tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["class_mean_classes"] >= 1 and row["class_mean_rms_grey_levels"] > 1 for row in rows)
    drawn = generated[1]  # round 1's transfer set (generated[0] is the initial evaluation set)
    images = trained[0].images
    assert images.shape == drawn.shape and not np.array_equal(images, drawn)
    frozen = tmp_path / "frozen"
    Runner(parse_recipe(RECIPE, overrides=["algorithm.name=fedmmkt-frozen-generator", *overrides]), frozen).run()
    rows = [json.loads(line) for line in (frozen / "metrics.jsonl").read_text().splitlines()]
    assert all("class_mean_classes" not in row for row in rows)  # the frozen arm never asks for them


def test_a_site_s_own_floor_withholds_classes_whatever_the_server_asks(monkeypatch):
    from fedmmkt_core.client import ClientFactory
    from fedmmkt_core.errors import UserError
    from fedmmkt_core.privacy import SitePrivacy

    site = SitePrivacy.read({"class-mean-min-images": 30}, environ={"FEDMMKT_CLASS_MEAN_MIN_IMAGES": "25"})
    assert site.class_mean_min_images == 30  # the stricter (larger) of node config and environment
    with pytest.raises(UserError, match="FEDMMKT_CLASS_MEAN_MIN_IMAGES"):
        SitePrivacy.read({}, environ={"FEDMMKT_CLASS_MEAN_MIN_IMAGES": "12.5"})

    recipe = parse_recipe(RECIPE, overrides=["algorithm.params.class_mean_shift=1.0"])
    ask = Message("fit", {"seed": 0, "class_means_min_count": 20}, {})
    sizes = {}
    for floor in (None, 30, 10_000):
        client = ClientFactory(recipe, site=SitePrivacy(class_mean_min_images=floor)).build(0)
        counts = client.handle(ask).array(COUNTS, np.int64, (10,))
        held = np.bincount(client.train.labels, minlength=10)
        least = max(20, floor or 0)
        assert counts.tolist() == [n if n >= least else 0 for n in held]
        sizes[floor] = int((counts > 0).sum())
    assert sizes[None] > sizes[30] and sizes[10_000] == 0  # a floor above every class withholds them all
