"""Per-client data folders: `fedmmkt partition` writes each client's exact share; a client built from its
folder trains on the same data as one cut from the recipe's dataset."""

import json
from pathlib import Path

import numpy as np
import pytest
from fedmmkt_cli.main import app
from typer.testing import CliRunner

from fedmmkt_core.client import ClientFactory
from fedmmkt_core.client.folder import read_client_folder
from fedmmkt_core.errors import DataError
from fedmmkt_core.recipe import load_recipe

SMOKE = Path(__file__).resolve().parents[1] / "examples" / "smoke.yaml"
THREE_CLIENTS = ["clients.0.count=2", "clients.1.count=1"]
cli = CliRunner()


def partition(out: Path):
    args = ["partition", str(SMOKE), str(out), *sum((["--set", o] for o in THREE_CLIENTS), [])]
    return cli.invoke(app, args)


def test_partition_writes_each_clients_exact_share(tmp_path):
    result = partition(tmp_path / "parts")
    assert result.exit_code == 0, result.output
    recipe = load_recipe(SMOKE, THREE_CLIENTS)
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["client_0", "client_1", "client_2", "server"]
    cut = ClientFactory(recipe)
    sizes = []
    for k in range(3):
        folder = tmp_path / "parts" / f"client_{k}"
        expected = cut.build(k)
        written = read_client_folder(folder)
        assert written.client_id == k and written.num_clients == 3
        np.testing.assert_array_equal(written.train.images, expected.train.images)
        np.testing.assert_array_equal(written.train.labels, expected.train.labels)
        assert written.train.captions == expected.train.captions
        np.testing.assert_array_equal(written.evaluation.images, expected.test.images)  # the shared split
        np.testing.assert_array_equal(written.evaluation.labels, expected.test.labels)
        from_folder = ClientFactory(recipe, data_root=folder).build(k)
        np.testing.assert_array_equal(from_folder.train.images, expected.train.images)
        np.testing.assert_array_equal(from_folder.train.labels, expected.train.labels)
        np.testing.assert_array_equal(from_folder.test.images, expected.test.images)
        assert from_folder.task == expected.task  # classes, geometry and caption template from the manifest
        assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.npy"))
        sizes.append(len(written.train))
    assert len(set(sizes)) > 1  # Dirichlet: the shares differ, so a mix-up would show


def test_a_client_folder_is_checked(tmp_path):
    assert partition(tmp_path / "parts").exit_code == 0
    recipe = load_recipe(SMOKE, THREE_CLIENTS)
    folder = tmp_path / "parts" / "client_1"
    with pytest.raises(DataError, match="holds client 1's data, not client 0's"):
        ClientFactory(recipe, data_root=folder).build(0)
    with pytest.raises(DataError, match="written for 3 clients, the recipe has 4"):
        ClientFactory(load_recipe(SMOKE), data_root=folder).build(1)
    server_task = ClientFactory(recipe).task
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["class_names"] = manifest["class_names"][::-1]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="differ from the recipe's"):  # checked against the server's task
        ClientFactory(recipe, data_root=folder).check_task(server_task)
    evaluated_on_validation = load_recipe(SMOKE, [*THREE_CLIENTS, "data.evaluate_on=validation"])
    with pytest.raises(DataError, match="holds the test split for evaluation, the recipe evaluates on validation"):
        ClientFactory(evaluated_on_validation, data_root=folder).build(1)
    blob = bytearray((folder / "train.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (folder / "train.safetensors").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="sha256 differs"):
        read_client_folder(folder)
    with pytest.raises(DataError, match="not a client data folder"):
        read_client_folder(tmp_path)
    again = partition(tmp_path / "parts")
    assert again.exit_code == 2 and "is not empty" in again.output


def test_a_node_with_a_data_folder_never_loads_the_dataset(tmp_path, monkeypatch):
    """Built from its folder, a client reads nothing else: the dataset plugin is never called, and it
    trains and evaluates exactly as the client cut from the recipe's dataset."""
    from fedmmkt_plugins.datasets.digits import DigitsDataset

    from fedmmkt_core.wire import Message

    assert partition(tmp_path / "parts").exit_code == 0
    recipe = load_recipe(SMOKE, THREE_CLIENTS)
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    fit = Message("fit", {"seed": 3, "logits_dtype": "float32"}, {"predict_images": images})

    def replies(runtime):
        return runtime.handle(fit), runtime.handle(Message("evaluate", {}))

    expected = replies(ClientFactory(recipe).build(2))

    def refuse(self, seed):
        raise AssertionError("a client with a data folder loaded the recipe's dataset")

    monkeypatch.setattr(DigitsDataset, "load", refuse)
    with pytest.raises(AssertionError, match="loaded the recipe's dataset"):
        ClientFactory(recipe).build(2)  # the patch bites
    got = replies(ClientFactory(recipe, data_root=tmp_path / "parts" / "client_2").build(2))
    for want, have in zip(expected, got, strict=True):
        assert (have.type, have.config) == (want.type, want.config)
        assert set(have.arrays) == set(want.arrays)
        for name, array in want.arrays.items():
            np.testing.assert_array_equal(have.arrays[name], array)


def test_the_evaluation_file_is_checked(tmp_path):
    """evaluation.safetensors is checked against its sha256 in the manifest like train.safetensors."""
    assert partition(tmp_path / "parts").exit_code == 0
    folder = tmp_path / "parts" / "client_0"
    path = folder / "evaluation.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"evaluation\.safetensors: its sha256 differs"):
        read_client_folder(folder)
    path.unlink()
    with pytest.raises(DataError, match=r"evaluation\.safetensors is missing"):
        read_client_folder(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="version 1 .no evaluation split.: write the folder again"):
        read_client_folder(folder)


def test_the_servers_folder_holds_its_splits_and_a_run_from_it_never_loads_the_dataset_on_the_server(
    tmp_path, monkeypatch
):
    """OUT/server holds exactly what load_server_data cuts, and a run with data.server_folder completes
    while the server side never cuts anything from the recipe's dataset."""
    import fedmmkt_core.loading
    from fedmmkt_core.loading import cut_server_data
    from fedmmkt_core.server.runner import Runner
    from fedmmkt_core.server_folder import read_server_folder

    assert partition(tmp_path / "parts").exit_code == 0
    cheap = [  # a short pre-training and a small transfer set: the data, not the quality, is under test
        *THREE_CLIENTS, "federation.rounds=1", "algorithm.params.samples_per_class=4",
        "algorithm.params.eval_samples_per_class=4", "generator.params.pretrain.vae_steps=10",
        "generator.params.pretrain.steps=20", "generator.params.fine_tune_steps=3",
    ]  # fmt: skip
    recipe = load_recipe(SMOKE, cheap)
    folder = tmp_path / "parts" / "server"
    written, cut = read_server_folder(folder, "test"), cut_server_data(recipe)
    assert written.task == cut.task
    for name in ("evaluation", "oracle", "public"):
        np.testing.assert_array_equal(getattr(written, name).images, getattr(cut, name).images)
        np.testing.assert_array_equal(getattr(written, name).labels, getattr(cut, name).labels)
        assert getattr(written, name).captions == getattr(cut, name).captions

    def refuse(recipe):
        raise AssertionError("the server cut its splits from the recipe's dataset")

    monkeypatch.setattr(fedmmkt_core.loading, "cut_server_data", refuse)
    own = load_recipe(SMOKE, [*cheap, f"data.server_folder={folder}"])
    summary = Runner(own, tmp_path / "from-folder").run()  # the same arrays as cut: the same run
    assert summary["rounds_completed"] == 1 and "generator_cas" in summary


def test_the_servers_folder_is_checked(tmp_path):
    from fedmmkt_core.server_folder import read_server_folder

    assert partition(tmp_path / "parts").exit_code == 0
    folder = tmp_path / "parts" / "server"
    with pytest.raises(DataError, match="written for data.evaluate_on 'test', the recipe has 'validation'"):
        read_server_folder(folder, "validation")
    blob = bytearray((folder / "oracle.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (folder / "oracle.safetensors").write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"oracle\.safetensors: its sha256 differs"):
        read_server_folder(folder, "test")
    with pytest.raises(DataError, match="not a server data folder"):
        read_server_folder(tmp_path / "parts" / "client_0" / "nothing", "test")
    missing = load_recipe(SMOKE, [f"data.server_folder={tmp_path / 'absent'}"])  # parsed where it is absent
    from fedmmkt_core.loading import load_server_data

    with pytest.raises(DataError, match="not a server data folder"):
        load_server_data(missing)


def test_the_nodes_recipe_never_names_the_servers_folder(tmp_path):
    pytest.importorskip("flwr")
    from fedmmkt_plugins.backends.flower.packaging import client_recipe_text

    from fedmmkt_core.recipe import parse_recipe

    recipe = load_recipe(SMOKE, [f"data.server_folder={tmp_path / 'server'}"])
    assert recipe.data.server_folder == (tmp_path / "server").resolve()
    text = client_recipe_text(recipe)
    assert "server_folder" not in text and str(tmp_path) not in text
    assert parse_recipe(text).data.server_folder is None  # a node parses it without the server's folder
