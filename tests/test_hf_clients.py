"""transformers client models: pre-trained checkpoints from a local folder, mixed architectures."""

import json
from pathlib import Path

import numpy as np
from fedmmkt_plugins.clients.resnet import ResNetClient, ResNetClientConfig
from fedmmkt_plugins.clients.vit import ViTClient, ViTClientConfig

from fedmmkt_core.recipe import load_recipe
from fedmmkt_core.server.runner import Runner
from fedmmkt_core.testing import digits_sample

SMOKE = Path(__file__).resolve().parents[1] / "examples" / "smoke.yaml"


def test_resnet_from_a_local_pretrained_checkpoint(tmp_path):
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    source = ResNetForImageClassification(
        ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4)
    )
    source.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    data, task = digits_sample(60)
    client = ResNetClient(ResNetClientConfig.model_validate({"pretrained": str(tmp_path / "ckpt")}))
    client.build(task, seed=0)
    assert client.predict_logits(data.images[:5]).shape == (5, 10)  # head replaced: 4 -> 10 classes
    stem = "model.resnet.embedder.embedder.convolution.weight"
    np.testing.assert_array_equal(client.get_weights()[stem], source.state_dict()[stem[len("model.") :]].numpy())


def test_vit_from_a_local_pretrained_checkpoint_of_another_size(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    data, task = digits_sample(60)
    client = ViTClient(ViTClientConfig.model_validate({"pretrained": str(tmp_path / "vit")}))
    client.build(task, seed=0)
    assert client.fit(data, None, seed=0)["loss"] > 0
    assert client.predict_logits(data.images[:3]).shape == (3, 10)


def test_one_recipe_mixes_architectures(tmp_path):
    overrides = [
        "algorithm={name: local}",
        "federation.rounds=2",
        "clients=[{name: cnn, count: 2, params: {channels: [8, 16], hidden: 32}}, {name: resnet}, {name: vit}]",
    ]
    Runner(load_recipe(SMOKE, overrides), tmp_path).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted(rows[-1]["client_accuracy"]) == ["0", "1", "2", "3"]
    assert rows[-1]["failures"] == []


def test_fit_converting_the_whole_set_once_equals_converting_batch_by_batch(monkeypatch):
    from fedmmkt_plugins.clients import torch_classifier

    from fedmmkt_core.data import DistillSet

    data, task = digits_sample(70)
    rng = np.random.default_rng(0)
    distill = DistillSet(data.images[:40], rng.dirichlet(np.ones(10), 40).astype(np.float32), 1.0, 2.0)
    weights = []
    for budget in (torch_classifier.WHOLE_SET_FLOAT_BYTES, 0):  # 0: every set converted per batch
        monkeypatch.setattr(torch_classifier, "WHOLE_SET_FLOAT_BYTES", budget)
        client = ResNetClient(ResNetClientConfig.model_validate({"epochs": 2, "batch_size": 16}))
        client.build(task, seed=0)
        client.fit(data, distill, seed=3)
        weights.append(client.get_weights())
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        np.testing.assert_array_equal(weights[0][key], weights[1][key])


def test_longer_epochs_cover_the_synthetic_set_once_however_little_private_data():
    from fedmmkt_core.data import DistillSet, ImageSet

    data, task = digits_sample(150)
    distill = DistillSet(data.images[:80], np.full((80, 10), 0.1, np.float32), 1.0, 1.0)
    seen: dict[tuple[str, int], list[int]] = {}
    # 10 private images: fewer than a batch; 33: a wrapped slice would hold one image (BatchNorm cannot train on it)
    for epoch_steps, n in (("private", 10), ("longer", 10), ("longer", 33)):
        private = ImageSet(data.images[80 : 80 + n], data.labels[80 : 80 + n])
        config = {"epochs": 2, "batch_size": 16, "epoch_steps": epoch_steps}
        client = ResNetClient(ResNetClientConfig.model_validate(config))
        client.build(task, seed=0)
        sizes = seen.setdefault((epoch_steps, n), [])
        client.net.register_forward_pre_hook(lambda _module, args, sizes=sizes: sizes.append(len(args[0])))
        client.fit(private, distill, seed=1)
    # each step is one private batch then one synthetic batch; 80 synthetic images, batches of 16
    assert seen["private", 10][0::2] == [10, 10] and seen["private", 10][1::2] == [16, 16]
    for n in (10, 33):
        assert seen["longer", n][1::2] == [16] * 10  # all 80 synthetic images every epoch
        assert seen["longer", n][0::2] == [min(n, 16)] * 10  # full batches of the private data, cycling
