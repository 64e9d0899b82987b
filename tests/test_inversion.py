"""Inversion feedback: the clients' changes to the synthetic images, how they travel, and what the server does."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fedmmkt_plugins.algorithms.inversion import DELTAS, check_inversion_deltas, nudged_images
from fedmmkt_plugins.clients.cnn import CNNClient, CNNConfig
from fedmmkt_plugins.clients.resnet import ResNetClient
from fedmmkt_plugins.generators.sd_lora import SDLoraGenerator
from test_fedmmkt import RECIPE

from fedmmkt_core.client import ClientRuntime
from fedmmkt_core.errors import RecipeError
from fedmmkt_core.privacy import SoftLabelPrivacy
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.server.runner import Runner
from fedmmkt_core.testing import digits_sample
from fedmmkt_core.wire import Message, MessageError


def _trained_resnet():
    data, task = digits_sample(300)
    model = ResNetClient(ResNetClient.Config(epochs=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    model.build(task, seed=0)
    model.fit(data.subset(range(250)), None, seed=0)
    return model, data, task


def _cross_entropy(model, images, labels) -> float:
    logits = model.predict_logits(images).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def _batchnorm_distance(model, images) -> float:
    """DeepInversion's feature-statistics distance of ``images`` at every BatchNorm input, computed here from
    the module's own running statistics (the quantity the deltas descend)."""
    import torch

    norms = [m for m in model.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    inputs = []
    hooks = [m.register_forward_hook(lambda m, args, _out: inputs.append((m, args[0]))) for m in norms]
    model.predict_logits(images)
    for hook in hooks:
        hook.remove()
    return float(
        sum(
            torch.linalg.vector_norm(h.mean(dim=(0, 2, 3)) - m.running_mean)
            + torch.linalg.vector_norm(h.var(dim=(0, 2, 3), unbiased=False) - m.running_var)
            for m, h in inputs
        )
    )


def _apply(images: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    reply = Message("fit_reply", {}, {DELTAS: deltas.astype(np.float16)})
    return nudged_images(images, {0: reply})[0]


def test_a_resnet_s_deltas_move_images_toward_their_class_and_its_data_statistics_without_changing_it():
    model, data, task = _trained_resnet()
    weights = model.get_weights()
    images, labels = data.images[250:], data.labels[250:]
    # ask for the class each image does NOT show: the deltas must make the model see that class more
    wanted = (labels + 1) % task.num_classes
    deltas = model.inversion_deltas(images, wanted, steps=4, step_size=0.4, seed=3)
    assert deltas.shape == images.shape and deltas.dtype == np.float32
    assert np.abs(deltas).max() <= 2.0
    rms = np.sqrt(np.mean(deltas.astype(np.float64) ** 2, axis=(1, 2, 3)))
    assert rms.max() <= 0.4 + 1e-4 and rms.mean() > 0.2  # at most the step size, clipping aside
    for key, value in model.get_weights().items():  # weights and BatchNorm running statistics untouched
        np.testing.assert_array_equal(value, weights[key], err_msg=key)
    np.testing.assert_array_equal(deltas, model.inversion_deltas(images, wanted, steps=4, step_size=0.4, seed=3))
    moved = _apply(images, deltas)
    assert _cross_entropy(model, moved, wanted) < _cross_entropy(model, images, wanted) - 0.1
    # inverted digits are far from the private data's statistics; the deltas bring them nearer
    inverted = 255 - images
    back = _apply(inverted, model.inversion_deltas(inverted, labels, steps=4, step_size=0.4, seed=3))
    assert _batchnorm_distance(model, back) < _batchnorm_distance(model, inverted)


def test_nudged_images_average_the_clients_deltas_in_grey_levels():
    images = np.array([[[[127]], [[250]]]], np.uint8)  # one 2x1 image
    first = np.array([[[[0.5]], [[0.5]]]], np.float16)
    second = np.array([[[[0.3]], [[-0.5]]]], np.float16)
    replies = {0: Message("fit_reply", {}, {DELTAS: first}), 1: Message("fit_reply", {}, {DELTAS: second})}
    replies[2] = Message("fit_reply", {}, {})  # withheld (DP, or a model without deltas): not averaged in
    moved, metrics = nudged_images(images, replies)
    # 127 -> 127/127.5 - 1 + 0.4 = 0.3961 -> 178.0; 250 -> 0.9608 + 0.0 -> 250
    assert moved.ravel().tolist() == [178, 250]
    assert metrics == {"inversion_clients": 2.0, "inversion_rms_grey_levels": pytest.approx(np.sqrt(51**2 / 2))}
    clipped, _ = nudged_images(images, {0: Message("fit_reply", {}, {DELTAS: np.full((1, 2, 1, 1), 2, np.float16)})})
    assert clipped.ravel().tolist() == [255, 255]
    unchanged, metrics = nudged_images(images, {0: Message("fit_reply", {}, {})})
    assert unchanged is images and metrics == {"inversion_clients": 0.0}


@pytest.mark.parametrize(
    ("deltas", "match"),
    [
        (np.zeros((2, 8, 8, 1), np.float32), "dtype"),
        (np.zeros((2, 8, 8), np.float16), "shape"),
        (np.full((2, 8, 8, 1), np.nan, np.float16), "NaN"),
        (np.full((2, 8, 8, 1), 3, np.float16), r"\[-2, 2\]"),
    ],
)
def test_broken_deltas_are_refused(deltas, match):
    with pytest.raises(MessageError, match=match):
        check_inversion_deltas(Message("fit_reply", {}, {DELTAS: deltas}), (2, 8, 8, 1))
    check_inversion_deltas(Message("fit_reply", {}, {}), (2, 8, 8, 1))  # none sent: nothing to check


def _fit_request(images: np.ndarray, steps: int = 2) -> Message:
    config = {"seed": 0, "logits_dtype": "float16", "inversion_steps": steps, "inversion_step_size": 0.2}
    arrays = {"predict_images": images, "image_class_ids": np.arange(len(images), dtype=np.int64) % 10}
    return Message("fit", config, arrays)


def test_a_client_returns_deltas_when_asked_and_never_under_dp():
    data, task = digits_sample(120)
    images = data.images[:12]

    def runtime(privacy=None):
        model = CNNClient(CNNConfig(epochs=1, channels=(8, 16), hidden=16))
        model.build(task, seed=0)
        return ClientRuntime(0, model, data.subset(range(100)), data.subset(range(100, 120)), task, privacy=privacy)

    reply = runtime().handle(_fit_request(images))
    deltas = reply.array(DELTAS, np.float16, images.shape, finite=True)
    assert np.abs(deltas).max() > 0
    assert DELTAS not in runtime().handle(_fit_request(images, steps=0)).arrays
    predict = Message(
        "predict", {**_fit_request(images).config}, {"images": images, "image_class_ids": np.zeros(12, np.int64)}
    )
    assert runtime().handle(predict).array(DELTAS, np.float16, images.shape).shape == images.shape
    private = runtime(SoftLabelPrivacy(noise_multiplier=1.0)).handle(_fit_request(images))
    assert set(private.arrays) == {"logits"}  # under DP only the noised, accounted logits go up
    with pytest.raises(MessageError, match="image_class_ids"):
        bad = _fit_request(images)
        bad.arrays["image_class_ids"] = np.full(12, 10, np.int64)
        runtime().handle(bad)


def test_a_recipe_with_dp_refuses_inversion_feedback():
    with pytest.raises(RecipeError, match="algorithm.params.inversion_steps"):
        parse_recipe(
            RECIPE,
            overrides=["algorithm.params.inversion_steps=2", "privacy.noise_multiplier=1.0"],
        )


def spy_on_the_generator(monkeypatch) -> tuple[list, list]:
    """Record every batch of images the generator draws and every batch it is fine-tuned on (a copy)."""
    generated, trained = [], []
    generate, fine_tune = SDLoraGenerator.generate, SDLoraGenerator.fine_tune

    def spy_generate(self, prompts, seeds):
        images = generate(self, prompts, seeds)
        generated.append(images)
        return images

    def spy_fine_tune(self, batch, losses, seed):
        trained.append(batch.subset(np.arange(len(batch))))
        return fine_tune(self, batch, losses, seed)

    monkeypatch.setattr(SDLoraGenerator, "generate", spy_generate)
    monkeypatch.setattr(SDLoraGenerator, "fine_tune", spy_fine_tune)
    return generated, trained


def test_fedmmkt_fine_tunes_on_the_images_as_the_clients_would_change_them(tmp_path, monkeypatch):
    generated, batches = spy_on_the_generator(monkeypatch)
    overrides = ["algorithm.params.inversion_steps=2", "algorithm.params.replay_buffer=0"]
    Runner(parse_recipe(RECIPE, overrides=overrides), tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["inversion_clients"] for row in rows] == [3.0, 3.0]
    assert all(row["inversion_rms_grey_levels"] > 1 for row in rows)
    drawn = generated[1]  # round 1's transfer set (generated[0] is the initial evaluation set)
    trained = [batch.images for batch in batches]
    assert len(trained) == 2 and trained[0].shape == drawn.shape
    change = trained[0].astype(np.float64) - drawn
    assert 1 < np.abs(change).mean() < 30  # the moved images, a nudge of the drawn ones
    rms = np.mean(np.sqrt(np.mean(change**2, axis=(1, 2, 3))))
    assert rms == pytest.approx(rows[0]["inversion_rms_grey_levels"], rel=1e-5)
    # deltas of 40 images of 8x8 in float16 ride on the same upload
    assert rows[0]["bytes_up_per_client"] > 40 * 64 * 2


def test_the_frozen_arm_never_asks_for_deltas(tmp_path):
    overrides = ["algorithm.name=fedmmkt-frozen-generator", "algorithm.params.inversion_steps=2"]
    Runner(parse_recipe(RECIPE, overrides=overrides), tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("inversion_clients" not in row for row in rows)
    assert rows[0]["bytes_up_per_client"] < 40 * 10 * 2 + 2000  # logits and counts only
