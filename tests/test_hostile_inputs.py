"""A corpus of hostile inputs through the CLI: each exits 2 with an error naming what is wrong, and
leaves nothing behind that looks like a result."""

import json
from pathlib import Path

import numpy as np
import pytest
from fedmmkt_cli.main import app
from safetensors.numpy import load_file, save_file
from test_fedmmkt import RECIPE
from test_imagefolder import write_folder
from typer.testing import CliRunner

from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.rundir import sha256_file
from fedmmkt_core.server.runner import Runner

cli = CliRunner()

LOCAL = """\
fedmmkt: 1
seed: 0
data: {dataset: DATASET, partitioner: {name: iid}}
clients: [{name: cnn, count: CLIENTS, params: {channels: [4, 8], hidden: 16}}]
federation: {rounds: 2}
algorithm: {name: local}
loggers: []
"""


def local_recipe(tmp_path: Path, dataset: str = "{name: digits}", clients: int = 2) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(LOCAL.replace("DATASET", dataset).replace("CLIENTS", str(clients)))
    return path


def run_cli(*args: str):
    result = cli.invoke(app, ["run", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # the console wraps long lines
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)


def assert_no_result(out: Path) -> None:
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_malformed_recipe(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("fedmmkt: 1\nclients: [oops\n")
    out = tmp_path / "run"
    assert_refused(run_cli(path, "--out", out), "bad.yaml:3: invalid YAML")
    assert_no_result(out)


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        ("corrupt_image", ["cannot read image", "class_2/bad.png"]),
        ("empty_class", ["class_9 has no images"]),
        ("one_class", ["at least two class"]),
    ],
)
def test_broken_image_folder_is_named(tmp_path, damage, fragments):
    root = write_folder(tmp_path / "images", classes=1 if damage == "one_class" else 3)
    if damage == "corrupt_image":
        (root / "class_2" / "bad.png").write_bytes(b"\x89PNG but not really")
    if damage == "empty_class":
        (root / "class_9").mkdir()
    dataset = f"{{name: imagefolder, params: {{root: {root}, image_size: 8, channels: 1}}}}"
    out = tmp_path / "run"
    assert_refused(run_cli(local_recipe(tmp_path, dataset), "--out", out), *fragments)
    assert_no_result(out)


def test_more_clients_than_samples(tmp_path):
    out = tmp_path / "run"
    assert_refused(run_cli(local_recipe(tmp_path, clients=5000), "--out", out), "5000 clients but only")
    assert_no_result(out)


def test_an_existing_folder_keeps_only_what_was_there(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # a folder fedmmkt did not mark is refused before anything runs
    assert_refused(
        run_cli(local_recipe(tmp_path), "--out", out), "is not empty and is not a fedmmkt run directory", "notes.txt"
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    # an empty folder the user made is kept (empty) when the run fails in set-up
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(run_cli(local_recipe(tmp_path, clients=5000), "--out", empty), "5000 clients")
    assert empty.is_dir() and not list(empty.iterdir())


def interrupted_after_round_1(recipe, out: Path) -> None:
    def stop(event, **data):
        if event == "round_end":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Runner(recipe, out, events=stop).run()


def record_hash(out: Path, name: str) -> None:
    state_path = out / "checkpoints" / "state.json"
    state = json.loads(state_path.read_text())
    state["files"][name] = sha256_file(out / "checkpoints" / name)
    state_path.write_text(json.dumps(state))
    record = json.loads((out / "run.json").read_text())  # and state.json's hash: a consistent checkpoint
    record["state_sha256"] = sha256_file(state_path)
    (out / "run.json").write_text(json.dumps(record))


def test_truncated_checkpoint_on_resume(tmp_path):
    out = tmp_path / "run"
    recipe_file = local_recipe(tmp_path)
    from fedmmkt_core.recipe import load_recipe

    interrupted_after_round_1(load_recipe(recipe_file), out)
    checkpoint = out / "checkpoints" / "algorithm.r1.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5])
    assert_refused(run_cli("--resume", out), "algorithm.r1.safetensors is damaged")
    assert not (out / "summary.json").exists()


def test_mismatched_lora_file_on_resume(tmp_path):
    out = tmp_path / "run"
    interrupted_after_round_1(parse_recipe(RECIPE), out)
    lora = out / "checkpoints" / "generator.r1.safetensors"
    weights = load_file(lora)
    name = next(k for k in sorted(weights) if "lora.down" in k)
    weights[name] = np.concatenate([weights[name], weights[name]])  # as if trained with twice the rank
    save_file(weights, lora)
    record_hash(out, "generator.r1.safetensors")  # consistent but incompatible: the adapter's own check
    assert_refused(run_cli("--resume", out), "generator.r1.safetensors", "another rank")
    assert not (out / "summary.json").exists()
    assert json.loads((out / "checkpoints" / "state.json").read_text())["rounds_completed"] == 1


def test_a_full_disk_stops_the_run_naming_the_path_not_a_client(tmp_path, monkeypatch):
    """In-process, a client's weights go to this machine's disk: ENOSPC there is the run's error (one line
    with the path), never 'client N failed in fit'."""
    import errno

    from fedmmkt_core.client import ClientStateStore

    def full(self, client_id, round_index, weights):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "clients"))

    monkeypatch.setattr(ClientStateStore, "save", full)
    out = tmp_path / "run"
    result = run_cli(local_recipe(tmp_path), "--out", out)
    assert_refused(result, "No space left on device", str(tmp_path / "run" / "clients"))
    assert "client 0" not in result.output and "failed in fit" not in result.output
    assert not out.exists()  # nothing finished: the run removes what it wrote
