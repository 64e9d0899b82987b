"""FedMMKT's pieces on real data: the domain gap, what clients return, what the generator is taught."""

import json

import numpy as np
import pytest
from fedmmkt_plugins.clients.cnn import CNNClient, CNNConfig
from fedmmkt_plugins.datasets.digits import DigitsDataset
from fedmmkt_plugins.generators.sd_lora import SDLoraGenerator

from fedmmkt_core.client import ClientRuntime
from fedmmkt_core.errors import RecipeError
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.server.runner import Runner
from fedmmkt_core.testing import digits_sample
from fedmmkt_core.wire import Message

RECIPE = """\
fedmmkt: 1
name: tiny-fedmmkt
seed: 1
data:
  dataset: {name: digits, params: {public_fraction: 0.2, public_style: inverted}}
  partitioner: {name: dirichlet, params: {alpha: 1.0}}
clients:
  - {name: cnn, count: 3, params: {channels: [8, 16], hidden: 32, lr: 0.003}}
federation: {rounds: 2}
algorithm: {name: fedmmkt, params: {samples_per_class: 4, eval_samples_per_class: 4}}
generator:
  name: sd-lora
  params:
    pretrain: {vae_steps: 20, steps: 30}
    fine_tune_steps: 3
    batch_size: 16
    num_inference_steps: 4
alignment_losses:
  - {name: weighted-denoising, params: {threshold: 0.0}}
loggers: []
"""


def test_public_split_has_the_inverted_share_in_every_class():
    plain = DigitsDataset(DigitsDataset.Config(public_fraction=0.25)).load(0)
    shifted = DigitsDataset(DigitsDataset.Config(public_fraction=0.25, public_style="inverted")).load(0)
    np.testing.assert_array_equal(plain.train.images, shifted.train.images)  # clients' data untouched
    np.testing.assert_array_equal(plain.oracle.images, shifted.oracle.images)
    inverted = np.all(shifted.public.images == 255 - plain.public.images, axis=(1, 2, 3))
    unchanged = np.all(shifted.public.images == plain.public.images, axis=(1, 2, 3))
    assert np.all(inverted | unchanged)
    for label in range(10):
        in_class = shifted.public.labels == label
        assert inverted[in_class].mean() == pytest.approx(0.7, abs=0.1)
    assert shifted.task.prompt(3) == "a photo of the digit three"


def test_fit_returns_logits_on_the_synthetic_images():
    data, task = digits_sample(200)
    model = CNNClient(CNNConfig(epochs=1, channels=(8, 16), hidden=16))
    model.build(task, seed=0)
    runtime = ClientRuntime(0, model, data.subset(range(150)), data.subset(range(150, 200)), task)
    synthetic = data.images[:12]
    soft = np.full((12, 10), 0.1, dtype=np.float32)
    reply = runtime.handle(
        Message(
            "fit",
            {"seed": 0, "logits_dtype": "float16"},
            {"predict_images": synthetic, "distill_images": synthetic, "distill_soft_labels": soft},
        )
    )
    logits = reply.array("logits", np.float16, (12, 10), finite=True)
    np.testing.assert_allclose(logits, model.predict_logits(synthetic), atol=1e-2, rtol=1e-2)
    assert reply.array("class_counts", np.int64, (10,)).sum() == 150


def test_fedmmkt_needs_alignment_losses_and_a_generator():
    without_losses = RECIPE.replace("alignment_losses:\n  - {name: weighted-denoising, params: {threshold: 0.0}}\n", "")
    with pytest.raises(RecipeError, match="alignment_losses"):
        parse_recipe(without_losses)
    parse_recipe(without_losses, overrides=["algorithm.name=fedmmkt-frozen-generator"])  # needs none
    without_generator = RECIPE.split("generator:")[0] + "loggers: []\n"
    with pytest.raises(RecipeError, match="generator"):
        parse_recipe(without_generator, overrides=["algorithm.name=feddf"])


def record_fine_tuning(monkeypatch) -> list:
    batches = []
    original = SDLoraGenerator.fine_tune

    def spy(self, batch, losses, seed):
        batches.append(batch)
        return original(self, batch, losses, seed)

    monkeypatch.setattr(SDLoraGenerator, "fine_tune", spy)
    return batches


def test_fedmmkt_teaches_the_generator_with_the_clients_soft_labels(tmp_path, monkeypatch):
    batches = record_fine_tuning(monkeypatch)
    summary = Runner(parse_recipe(RECIPE), tmp_path / "run").run()
    assert len(batches) == 2
    soft = batches[0].soft_labels
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-5)
    assert not np.all(np.isin(soft, (0.0, 1.0))), "soft labels should come from the clients, not be one-hot"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("generator_cas", "generator_fid", "alignment_rate", "generator_cas_initial", "seconds_synthesize"):
        assert key in rows[-1], key
    for key in ("generator_cas_initial", "generator_cas", "client_accuracy_mean", "bytes_up_per_client_round"):
        assert key in summary, key
    for name in ("round_000.png", "round_001.png", "round_002.png"):
        assert (tmp_path / "run" / "samples" / name).is_file()
    assert (tmp_path / "run" / "checkpoints" / "generator.r2.safetensors").is_file()
    # logits of 40 images x 10 classes in float16 (+ class counts) are all a client uploads
    assert rows[0]["bytes_up_per_client"] < 40 * 10 * 2 + 2000


def test_no_feedback_control_fine_tunes_without_client_knowledge(tmp_path, monkeypatch):
    batches = record_fine_tuning(monkeypatch)
    Runner(parse_recipe(RECIPE, overrides=["algorithm.name=fedmmkt-no-feedback"]), tmp_path / "run").run()
    assert len(batches) == 2
    for batch in batches:
        np.testing.assert_array_equal(batch.soft_labels, np.eye(10, dtype=np.float32)[batch.class_ids])


@pytest.mark.parametrize("algorithm", ["fedmmkt-frozen-generator", "feddf"])
def test_baselines_never_touch_the_generator(tmp_path, monkeypatch, algorithm):
    batches = record_fine_tuning(monkeypatch)
    adapters = []  # the LoRA weights once built, then at every round's checkpoint
    original_build, original_save = SDLoraGenerator.build, SDLoraGenerator.save_adapter

    def digest(generator):
        return {k: v.detach().float().numpy().tobytes() for k, v in generator.adapter_state().items()}

    def build(self, *args, **kwargs):
        original_build(self, *args, **kwargs)
        adapters.append(digest(self))

    def save(self, path):
        adapters.append(digest(self))
        original_save(self, path)

    monkeypatch.setattr(SDLoraGenerator, "build", build)
    monkeypatch.setattr(SDLoraGenerator, "save_adapter", save)
    Runner(parse_recipe(RECIPE, overrides=[f"algorithm.name={algorithm}"]), tmp_path / "run").run()
    assert batches == []
    assert len(adapters) == 3 and adapters[0] == adapters[1] == adapters[2]


def test_example_recipes_validate(tmp_path):
    from pathlib import Path

    from fedmmkt_core.recipe import load_recipe

    examples = Path(__file__).resolve().parents[1] / "examples"
    digits = load_recipe(examples / "digits.yaml")
    assert {group.name for group in digits.clients} == {"resnet", "vit"} and digits.num_clients >= 5
    assert digits.algorithm.name == "fedmmkt"
    (tmp_path / "cifar10" / "airplane").mkdir(parents=True)
    cifar = load_recipe(examples / "cifar10-sd15.yaml", [f"data.dataset.params.root={tmp_path / 'cifar10'}"])
    assert cifar.generator.params["dtype"] == "float16"
    with pytest.raises(RecipeError, match="data.dataset.params.root"):
        load_recipe(examples / "cifar10-sd15.yaml")  # data/cifar10 is not shipped


def test_interrupted_fedmmkt_run_resumes_to_the_same_result(tmp_path):
    recipe = RECIPE.replace("rounds: 2", "rounds: 3")
    Runner(parse_recipe(recipe), tmp_path / "full").run()

    def stop_in_round_2(event, **data):
        if event == "round_start":
            stop_in_round_2.round = data["round"]
        if event == "phase_end" and data["name"] == "generator_update" and stop_in_round_2.round == 2:
            raise KeyboardInterrupt

    stop_in_round_2.round = 0
    with pytest.raises(KeyboardInterrupt):
        Runner(parse_recipe(recipe), tmp_path / "cut", events=stop_in_round_2).run()
    Runner(parse_recipe(recipe), tmp_path / "cut", resume=True).run()

    def rows(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("seconds_")} for line in lines]

    assert rows("cut") == rows("full")


class NaNLogitsClient(CNNClient):
    def predict_logits(self, images):
        logits = super().predict_logits(images)
        if len(images) == 40:  # the recipe's synthetic set (4 per class); test-split predictions stay clean
            logits[0, 0] = np.nan
        return logits


class WrongShapeClient(CNNClient):
    def predict_logits(self, images):
        logits = super().predict_logits(images)
        return logits[:, :5] if len(images) == 40 else logits


def test_bad_logits_are_rejected_with_a_reason_and_the_round_goes_on(tmp_path):
    from fedmmkt_core.hookspecs import hookimpl
    from fedmmkt_core.plugins import PluginManager

    class FaultyClients:
        @hookimpl
        def register_client_models(self, register):
            register("nan-logits", NaNLogitsClient)
            register("wrong-shape", WrongShapeClient)

    registry = PluginManager().add_plugin(FaultyClients(), package="test-faults")
    recipe = RECIPE.replace(
        "  - {name: cnn, count: 3, params: {channels: [8, 16], hidden: 32, lr: 0.003}}",
        "  - {name: cnn, count: 2, params: {channels: [8, 16], hidden: 32, lr: 0.003}}\n"
        "  - {name: nan-logits, params: {channels: [8, 16], hidden: 32}}\n"
        "  - {name: wrong-shape, params: {channels: [8, 16], hidden: 32}}",
    )
    summary = Runner(parse_recipe(recipe, registry=registry), tmp_path / "run").run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds_completed"] == 2
    fit_failures = {f["client"]: f["reason"] for f in rows[0]["failures"] if f["phase"] == "fit"}
    assert set(fit_failures) == {2, 3}
    assert "finite" in fit_failures[2] or "NaN" in fit_failures[2]
    assert "shape" in fit_failures[3]
