"""Issue 14's hostile-input corpus: recipes, run directories, peers' messages and data a hostile user
controls. Each case exits 2 (or is recorded as a client failure), says what is wrong on the first
line, shows no traceback, and leaves nothing behind (a refused resume: the directory byte for byte)."""

import hashlib
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fedmmkt_cli.main import app
from test_hostile_inputs import LOCAL, local_recipe
from test_imagefolder import write_folder
from typer.testing import CliRunner

from fedmmkt_core.recipe import load_recipe, parse_recipe
from fedmmkt_core.rundir import LOCK_FILE, RunLock
from fedmmkt_core.server.runner import Runner
from fedmmkt_core.wire import Message, MessageError, check_reply_fields

cli = CliRunner()

FEDMMKT_PARAMS = "algorithm: {name: local}"


def invoke(*args) -> tuple[int, str]:
    result = cli.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode() + (b"/" if path.is_dir() else b""))
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


# --------------------------------------------------------------------------- recipes

NESTED = "fedmmkt: 1\nx: " + "[" * 10_000 + "]" * 10_000 + "\n"
LAUGHS = "fedmmkt: 1\na0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)
)


def edited(old: str, new: str) -> str:
    assert old in LOCAL
    return LOCAL.replace("DATASET", "{name: digits}").replace("CLIENTS", "2").replace(old, new)


RECIPES = {
    # name: (recipe text or bytes, fragment of the second line)
    "billion-laughs": (LAUGHS, "too many values once aliases are expanded"),
    "huge-list": ("fedmmkt: 1\nx: [" + "1, " * 700_000 + "1]\n", "a recipe may be at most 1024 KiB"),
    "binary": (b"fedmmkt: 1\n\xff\xfe\x00\x81garbage", "not UTF-8 text"),
    "deep-nesting": (NESTED, "nested too deeply"),
    "timeout-inf": (
        edited("rounds: 2}", "rounds: 2, round_timeout: .inf}"),
        "federation.round_timeout: must be a finite",
    ),
    "timeout-huge": (edited("rounds: 2}", "rounds: 2, round_timeout: 1e300}"), "less than or equal to 604800"),
    "lr-inf": (edited("hidden: 16}", "hidden: 16, lr: .inf}"), "clients.0.params.lr: must be a finite"),
    "nan": (edited("seed: 0", "seed: .nan"), "seed: must be a finite number"),
    "samples-1e12": (
        edited("{name: local}", "{name: fedmmkt, params: {samples_per_class: 1000000000000}}"),
        "samples_per_class: Input should be less than or equal to 10000",
    ),
    "seed-negative": (edited("seed: 0", "seed: -5"), "seed: Input should be greater than or equal to 0"),
    "seed-1e23": (edited("seed: 0", "seed: 100000000000000000000000"), "seed: Input should be less than or equal"),
    "name-parent": (edited("seed: 0", "name: ../../x\nseed: 0"), "run name '../../x' is not allowed"),
    "name-absolute": (edited("seed: 0", "name: /tmp/x\nseed: 0"), "run name '/tmp/x' is not allowed"),
    "name-nested": (edited("seed: 0", "name: a/b\nseed: 0"), "run name 'a/b' is not allowed"),
    "name-nul": (edited("seed: 0", 'name: "a\\0b"\nseed: 0'), "run name 'a\\\\x00b' is not allowed"),
    "name-300": (edited("seed: 0", f"name: {'n' * 300}\nseed: 0"), "run name 'nnnnnnnn"),
    "name-escape": (edited("seed: 0", 'name: "x\\e[31mred"\nseed: 0'), "run name 'x\\\\x1b[31mred' is not allowed"),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_hostile_recipe_is_refused_before_anything_is_written(tmp_path, monkeypatch, case):
    text, fragment = RECIPES[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    monkeypatch.chdir(tmp_path)
    for command in (["validate", recipe], ["run", recipe]):
        code, output = invoke(*command)
        assert code == 2, output
        lines = output.splitlines()
        assert lines[0].startswith("error: recipe ") and "is invalid" in lines[0], output
        assert fragment in " ".join(lines[1:]), output
        assert "\x1b[31m" not in output and "\x00" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no runs/ folder


# --------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One finished 2-round run that every resume case copies and damages."""
    base = tmp_path_factory.mktemp("finished")
    out = base / "run"
    recipe = local_recipe(base)
    recipe.write_text(recipe.read_text().replace("hidden: 16}", "hidden: 16, epochs: 1}"))
    Runner(load_recipe(recipe), out).run()
    return out


def _state(run: Path) -> dict:
    return json.loads((run / "checkpoints" / "state.json").read_text())


def _set_state(run: Path, **changes) -> None:
    """Change state.json's fields *and* its hash in run.json, as a buggy writer would: the field checks."""
    (run / "checkpoints" / "state.json").write_text(json.dumps({**_state(run), **changes}))
    record = json.loads((run / "run.json").read_text())
    record["state_sha256"] = hashlib.sha256((run / "checkpoints" / "state.json").read_bytes()).hexdigest()
    (run / "run.json").write_text(json.dumps(record))


def _edit_state(run: Path, **changes) -> None:
    """Change state.json's fields by hand: its hash in run.json no longer matches."""
    (run / "checkpoints" / "state.json").write_text(json.dumps({**_state(run), **changes}))


def _edit_recipe(run: Path) -> None:
    path = run / "recipe.resolved.yaml"
    path.write_text(path.read_text().replace("lr: 0.001", "lr: 0.01"))


RESUMES = {
    # name: (damage, first-line fragment)
    "rounds-completed-negative": (lambda r: _set_state(r, rounds_completed=-1), "rounds_completed must be a whole"),
    "state-garbage": (
        lambda r: (r / "checkpoints/state.json").write_bytes(b"\xff\x00garbage"),
        "state.json was changed after it was written",
    ),
    "state-truncated": (
        lambda r: (r / "checkpoints/state.json").write_bytes((r / "checkpoints/state.json").read_bytes()[:40]),
        "state.json was changed after it was written",
    ),
    "state-edited": (lambda r: _edit_state(r, rounds_completed=1), "state.json was changed after it was written"),
    "state-entry-removed": (
        lambda r: _edit_state(r, files={k: v for k, v in _state(r)["files"].items() if not k.startswith("algorithm")}),
        "state.json was changed after it was written",
    ),
    "state-deleted": (lambda r: (r / "checkpoints/state.json").unlink(), "state.json is missing, but"),
    "run-record-without-state-hash": (
        lambda r: (r / "run.json").write_text(
            json.dumps({"recipe_sha256": json.loads((r / "run.json").read_text())["recipe_sha256"]})
        ),
        "records no hash of state.json",
    ),
    "state-without-hashes": (lambda r: _set_state(r, files=None), "records no checkpoint hashes"),
    "recipe-edited": (_edit_recipe, "was changed after the run started"),
    "recipe-not-utf8": (lambda r: (r / "recipe.resolved.yaml").write_bytes(b"\xff\xfe"), "yaml is invalid"),
    "run-record-missing": (lambda r: (r / "run.json").unlink(), "run.json is missing"),
    "client-garbage": (
        lambda r: (r / "checkpoints/clients/client_1.r1.safetensors").write_bytes(b"garbage"),
        "client_1.r1.safetensors is damaged",
    ),
    "client-deleted": (
        lambda r: (r / "checkpoints/clients/client_0.r1.safetensors").unlink(),
        "client_0.r1.safetensors is missing",
    ),
    "algorithm-deleted": (lambda r: (r / "checkpoints/algorithm.r2.safetensors").unlink(), "is missing"),
    "metrics-garbage": (lambda r: (r / "metrics.jsonl").write_text('{"round": 1}\nnot json\n'), "not valid JSON"),
    "metrics-short": (lambda r: (r / "metrics.jsonl").write_text('{"round": 1}\n'), "does not hold rounds 1..2"),
    "extra-client-file": (
        lambda r: shutil.copy(
            r / "checkpoints/clients/client_0.r1.safetensors", r / "checkpoints/clients/client_5.r0.safetensors"
        ),
        "client checkpoints differ",
    ),
}


@pytest.mark.parametrize("case", sorted(RESUMES))
def test_refused_resume_leaves_the_directory_byte_for_byte_unchanged(finished_run, tmp_path, case):
    damage, fragment = RESUMES[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    before = tree_hash(run)
    code, output = invoke("run", "--resume", run)
    assert code == 2, output
    assert output.startswith("error: ") and fragment in output.splitlines()[0], output
    assert tree_hash(run) == before


def test_an_intact_run_passes_verification(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = _state(run)
    assert state["rounds_completed"] == 2 and state["recipe_sha256"]
    assert sorted(state["files"]) == [
        "algorithm.r2.safetensors",
        "clients/client_0.r1.safetensors",
        "clients/client_1.r1.safetensors",
    ]
    runner = Runner(load_recipe(run / "recipe.resolved.yaml"), run, resume=True)
    assert runner._prepare_directory() == 2


# --------------------------------------------------------------------------- the lock


def test_a_locked_run_directory_is_refused_naming_the_holder(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    lock = RunLock.acquire(run)
    try:
        before = tree_hash(run)
        code, output = invoke("run", "--resume", run)
        assert code == 2 and f"is in use by another fedmmkt process (pid {os.getpid()} on" in output, output
        code, output = invoke("run", run / "recipe.resolved.yaml", "--out", run)
        assert code == 2 and f"(pid {os.getpid()} on" in output, output
        assert tree_hash(run) == before
    finally:
        lock.release()
    assert not (run / LOCK_FILE).exists()


def test_a_stale_lock_is_recognised(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    lock = RunLock.acquire(tmp_path)
    try:
        assert lock.stale is not None and lock.stale["pid"] == 2**22 + 12345
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release(restore=True)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == 2**22 + 12345


def test_any_failure_before_round_1_removes_the_run_directory(tmp_path, monkeypatch):
    def broken(recipe):
        raise RuntimeError("a bug in set-up")

    monkeypatch.setattr("fedmmkt_core.server.runner.load_server_data", broken)
    with pytest.raises(RuntimeError, match="a bug in set-up"):
        Runner(load_recipe(local_recipe(tmp_path)), tmp_path / "run").run()
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- peers' messages


def _raw_message(metadata: object) -> bytes:
    header = json.dumps({"__metadata__": metadata}).encode()
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    ("blob", "fragment"),
    [
        (_raw_message({"fedmmkt": 123}), "not valid JSON: TypeError"),
        (_raw_message({"fedmmkt": "[" * 100_000 + "]" * 100_000}), "nested too deeply"),
        (_raw_message({"fedmmkt": '{"type": "fit", "config": {"lr": NaN}}'}), "NaN is not plain finite JSON"),
        (_raw_message({"fedmmkt": '{"type": "fit", "config": {"lr": 1e400}}'}), "1e400 overflows"),
        (_raw_message([1, 2]), "not valid JSON: AttributeError"),
    ],
    ids=["metadata-type", "deep-config", "nan-config", "overflow-config", "header-list"],
)
def test_decode_refuses_hostile_headers(blob, fragment):
    with pytest.raises(MessageError, match=fragment):
        Message.decode(blob)


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        (Message("evaluate_reply", {}), "has no 'accuracy'"),
        (Message("evaluate_reply", {"accuracy": "high"}), "'accuracy' must be a number, got str"),
        (Message("evaluate_reply", {"accuracy": float("nan")}), "outside"),
        (Message("evaluate_reply", {"accuracy": 1e300}), "'accuracy' is 1e+300, outside [0, 1]"),
        (Message("fit_reply", {"loss": "low"}), "'loss' must be a number"),
        (Message("fit_reply", {"num_samples": 2.5}), "must be a whole number"),
    ],
)
def test_reply_fields_are_checked(reply, fragment):
    with pytest.raises(MessageError) as caught:
        check_reply_fields(reply)
    assert fragment in str(caught.value)


def test_a_hostile_client_is_a_failure_not_a_crash(tmp_path, monkeypatch):
    """Client 1 replies to fit without a loss and to evaluate with accuracy "high": FedAvg goes on."""
    from fedmmkt_core.client import ClientRuntime

    fit, evaluate = ClientRuntime._fit, ClientRuntime._evaluate

    def hostile_fit(self, message):
        reply = fit(self, message)
        if self.client_id == 1:
            reply = Message("fit_reply", {"num_samples": reply.config["num_samples"]}, reply.arrays)
        return reply

    def hostile_evaluate(self, message):
        reply = evaluate(self, message)
        return Message("evaluate_reply", {"accuracy": "high"}) if self.client_id == 1 else reply

    monkeypatch.setattr(ClientRuntime, "_fit", hostile_fit)
    monkeypatch.setattr(ClientRuntime, "_evaluate", hostile_evaluate)
    recipe = parse_recipe(
        edited("{name: local}", "{name: fedavg}").replace("rounds: 2", "rounds: 1"), base_dir=str(tmp_path)
    )
    summary = Runner(recipe, tmp_path / "run").run()
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert list(row["client_accuracy"]) == ["0"] and np.isfinite(row["train_loss"])
    assert row["failures"] == [
        {"client": 1, "phase": "evaluate", "reason": "MessageError: 'accuracy' must be a number, got str"}
    ]
    assert summary["client_failures"] == 1


# --------------------------------------------------------------------------- data


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _bomb(root: Path) -> None:
    (root / "class_1" / "bomb.png").write_bytes(bomb_png())


def _captions(root: Path) -> None:
    (root / "captions.jsonl").write_bytes(b'{"file": "class_0/000.png", "caption": "\xff\xfe"}\n')


def _outside_link(root: Path) -> None:
    outside = root.parent / "secret.png"
    shutil.copy(root / "class_0" / "000.png", outside)
    (root / "class_0" / "link.png").symlink_to(outside)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (_bomb, "bomb.png"),
        (_captions, "captions.jsonl: not UTF-8 text"),
        (_outside_link, "link.png is a link to"),
    ],
    ids=["decompression-bomb", "captions-not-utf8", "link-outside"],
)
def test_hostile_image_folder(tmp_path, damage, fragment):
    root = write_folder(tmp_path / "images", per_class=4, classes=2)
    damage(root)
    dataset = f"{{name: imagefolder, params: {{root: {root}, image_size: 8, channels: 1}}}}"
    out = tmp_path / "run"
    code, output = invoke("run", local_recipe(tmp_path, dataset), "--out", out)
    assert code == 2 and output.startswith("error: ") and fragment in output.splitlines()[0], output
    assert not out.exists()


def test_hf_disk_decompression_bomb_is_named(tmp_path):
    hf = pytest.importorskip("datasets")
    from fedmmkt_plugins.datasets.hf_disk import HFDiskConfig, HFDiskDataset

    from fedmmkt_core.errors import DataError

    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=["a", "b"])})
    images = [{"bytes": bomb_png(), "path": None}] * 4
    hf.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features).save_to_disk(str(tmp_path / "d"))
    dataset = HFDiskDataset(HFDiskConfig.model_validate({"path": str(tmp_path / "d"), "image_size": 8}))
    with pytest.raises(DataError, match="cannot decode the image in row 0 .*exceeds limit"):
        dataset.load(0)


def test_pretrained_pickle_weights_are_refused(tmp_path):
    folder = tmp_path / "pretrained"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")
    path = local_recipe(tmp_path)
    path.write_text(
        path.read_text()
        .replace("{name: cnn,", "{name: resnet,")
        .replace("params: {channels: [4, 8], hidden: 16}", f"params: {{pretrained: {folder}}}")
    )
    code, output = invoke("validate", path)
    assert code == 2 and output.startswith("error: recipe "), output
    assert "holds no model.safetensors (found: config.json, pytorch_model.bin)" in output
    assert "never pickle files" in " ".join(output.split())
