"""transformers client models: pre-trained checkpoints from a local folder, mixed architectures."""

import json
from pathlib import Path

import numpy as np
from fedmmkt_plugins.client_resnet import ResNetClient, ResNetClientConfig
from fedmmkt_plugins.client_vit import ViTClient, ViTClientConfig

from fedmmkt_core.recipe import load_recipe
from fedmmkt_core.runner import Runner
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
