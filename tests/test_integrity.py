"""Issue 26, items 1 and 2: a run never deletes what fedmmkt did not write, and everything read back is
verified (state.json against its hash in run.json, cache entries against the hash written when they
were built). Each headline case goes through the CLI and compares the directory tree before and after."""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_fedmmkt import RECIPE
from test_hostile_corpus import invoke
from test_hostile_inputs import local_recipe
from test_imagefolder import write_folder

from fedmmkt_core.cache import MANIFEST, CacheWarning, folder_problem, tensors_sha256
from fedmmkt_core.recipe import load_recipe
from fedmmkt_core.rundir import LOCK_FILE, remove_new_paths, snapshot
from fedmmkt_core.server.runner import Runner

TIMING = re.compile(r'"seconds_[a-z_]+": [-0-9.e+]+(, )?')


def first_line(output: str) -> str:
    return output.splitlines()[0] if output else ""


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode() + (b"/" if path.is_dir() else b""))
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def corrupt_image_recipe(tmp_path: Path) -> Path:
    """The local recipe on an image folder holding a corrupt image: the data fails after the run starts."""
    root = write_folder(tmp_path / "images", per_class=4, classes=2)
    (root / "class_1" / "bad.png").write_bytes(b"\x89PNG but not really")
    return local_recipe(tmp_path, f"{{name: imagefolder, params: {{root: {root}, image_size: 8, channels: 1}}}}")


def user_folder(root: Path) -> Path:
    """A user's project folder whose names collide with a run directory's."""
    (root / "samples").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    (root / "log.txt").write_text("my own notes\n")
    (root / "samples" / "figure1.png").write_bytes(b"\x89PNG my figure")
    (root / "checkpoints" / "model.pt").write_bytes(b"my model weights")
    (root / "README").write_text("my project\n")
    return root


# --------------------------------------------------------------------------- 1. the user's files


def test_a_failing_run_into_a_folder_of_user_files_touches_none_of_them(tmp_path, monkeypatch):
    """fedmmkt run bad.yaml --out userproj (a corrupt image): exit 2, userproj byte for byte as it was."""
    monkeypatch.chdir(tmp_path)
    recipe = corrupt_image_recipe(tmp_path)
    project = user_folder(tmp_path / "userproj")
    before = tree_hash(project)
    code, output = invoke("run", recipe, "--out", "userproj")
    assert code == 2, output
    assert first_line(output).startswith("error: userproj is not empty and is not a fedmmkt run directory")
    assert "(it holds README, checkpoints, log.txt, samples); give --out a new or empty folder" in first_line(output)
    assert tree_hash(project) == before
    # a good recipe is refused the same way, before anything runs
    code, output = invoke("run", local_recipe(tmp_path), "--out", "userproj")
    assert code == 2 and "is not a fedmmkt run directory" in first_line(output), output
    assert tree_hash(project) == before


def test_a_failing_run_into_an_empty_folder_leaves_it_empty(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    code, output = invoke("run", corrupt_image_recipe(tmp_path), "--out", out)
    assert code == 2 and "bad.png" in first_line(output), output
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_failing_run_removes_only_the_paths_it_created(tmp_path):
    """A folder fedmmkt marked (a stale run.lock) that also holds a user's file: the run is allowed, and
    its failure removes what it wrote and nothing that was there."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": "elsewhere"}))
    (out / "notes.txt").write_text("mine\n")
    code, output = invoke("run", corrupt_image_recipe(tmp_path), "--out", out)
    assert code == 2 and "bad.png" in first_line(output), output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine\n"


def test_remove_new_paths_keeps_everything_it_found(tmp_path):
    user_folder(tmp_path)
    found = snapshot(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "checkpoints" / "state.json").write_text("{}")
    (tmp_path / "checkpoints" / "clients").mkdir()
    (tmp_path / "checkpoints" / "clients" / "client_0.r0.safetensors").write_bytes(b"x")
    (tmp_path / "samples" / "round_001.png").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "README")
    remove_new_paths(tmp_path, found)
    assert snapshot(tmp_path) == found
    assert (tmp_path / "README").read_text() == "my project\n"


# --------------------------------------------------------------------------- 2a. state.json

FEDMMKT_2_ROUNDS = RECIPE.replace("count: 3", "count: 2")
# One round of FedMMKT on a generator pre-trained for two steps, no oracle: what the cache test rebuilds.
CHEAP_GENERATOR = (
    FEDMMKT_2_ROUNDS.replace("rounds: 2", "rounds: 1")
    .replace("pretrain: {vae_steps: 20, steps: 30}", "pretrain: {vae_steps: 2, steps: 2}")
    .replace("eval_samples_per_class: 4}", "eval_samples_per_class: 4, evaluate_generator: false}")
)
assert CHEAP_GENERATOR.count("steps: 2}") == 1 and "evaluate_generator: false" in CHEAP_GENERATOR


@pytest.fixture(scope="module")
def interrupted_fedmmkt_run(tmp_path_factory) -> Path:
    """A 2-round FedMMKT run (tiny generator, oracle) stopped after round 1, as by Ctrl-C or a kill."""
    base = tmp_path_factory.mktemp("interrupted")
    recipe = base / "recipe.yaml"
    recipe.write_text(FEDMMKT_2_ROUNDS)

    def stop(event, **data):
        if event == "round_end":
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDMMKT_CACHE", session_cache(tmp_path_factory))
        with pytest.raises(KeyboardInterrupt):
            Runner(load_recipe(recipe), base / "run", events=stop).run()
    return base / "run"


def session_cache(tmp_path_factory) -> str:
    """The session's cache, as conftest sets it for every test (module fixtures run before it does):
    test_fedmmkt's runs of the same recipe pre-train the same generator and oracle."""
    base = tmp_path_factory.getbasetemp()
    return str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "cache")


def _state_path(run: Path) -> Path:
    return run / "checkpoints" / "state.json"


def _edit_state(run: Path, edit) -> None:
    state = json.loads(_state_path(run).read_text())
    edit(state)
    _state_path(run).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def _set_cas(state: dict) -> None:
    assert state["algorithm"]["initial"]["cas"] != 0.99
    state["algorithm"]["initial"]["cas"] = 0.99


def _drop_generator(state: dict) -> None:
    del state["files"]["generator.r1.safetensors"]


STATE_DAMAGE = {
    # name: (damage, first-line fragment)
    "initial-cas-edited": (lambda r: _edit_state(r, _set_cas), "state.json was changed after it was written"),
    "generator-entry-removed": (
        lambda r: _edit_state(r, _drop_generator),
        "state.json was changed after it was written",
    ),
    "state-deleted": (lambda r: _state_path(r).unlink(), "state.json is missing, but"),
}


@pytest.mark.parametrize("case", sorted(STATE_DAMAGE))
def test_a_resume_from_an_edited_or_deleted_state_is_refused_and_writes_nothing(
    interrupted_fedmmkt_run, tmp_path, case
):
    damage, fragment = STATE_DAMAGE[case]
    run = tmp_path / "run"
    shutil.copytree(interrupted_fedmmkt_run, run)
    log_before = (run / "log.txt").read_bytes()
    damage(run)
    before = tree_hash(run)
    code, output = invoke("run", "--resume", run)
    assert code == 2, output
    line = first_line(output)
    assert line.startswith(f"error: cannot resume {run}") and fragment in line, output
    assert str(_state_path(run)) in line
    assert tree_hash(run) == before
    assert (run / "log.txt").read_bytes() == log_before


def test_a_consistent_state_without_the_generator_checkpoint_is_refused_after_set_up(interrupted_fedmmkt_run, tmp_path):
    """The generator's entry removed and state.json's hash re-recorded (a consistent but incomplete
    checkpoint): refused while verifying (the file is there, unrecorded), or, the file gone too, when the
    checkpoint is loaded after the run was set up; nothing written either way."""
    run = tmp_path / "run"
    shutil.copytree(interrupted_fedmmkt_run, run)
    _edit_state(run, _drop_generator)
    record = json.loads((run / "run.json").read_text())
    record["state_sha256"] = hashlib.sha256(_state_path(run).read_bytes()).hexdigest()
    (run / "run.json").write_text(json.dumps(record))
    before = tree_hash(run)
    code, output = invoke("run", "--resume", run)
    assert code == 2, output
    assert "checkpoints/generator.r1.safetensors is not recorded in its files" in first_line(output), output
    assert tree_hash(run) == before
    (run / "checkpoints" / "generator.r1.safetensors").unlink()  # and the file gone: found at loading
    before = tree_hash(run)
    code, output = invoke("run", "--resume", run)
    assert code == 2, output
    assert "records no generator checkpoint (generator.r1.safetensors)" in first_line(output), output
    assert tree_hash(run) == before


def test_a_resume_refused_in_set_up_leaves_the_log_unchanged(tmp_path):
    """The data broke between the kill and the resume: refused (exit 2) with log.txt and every other file
    as they were (it used to append 'resuming run' first)."""
    root = write_folder(tmp_path / "images", per_class=4, classes=2)
    recipe = local_recipe(tmp_path, f"{{name: imagefolder, params: {{root: {root}, image_size: 8, channels: 1}}}}")
    recipe.write_text(recipe.read_text().replace("hidden: 16}", "hidden: 16, epochs: 1}"))
    out = tmp_path / "run"

    def stop(event, **data):
        if event == "round_end":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Runner(load_recipe(recipe), out, events=stop).run()
    (root / "class_1" / "000.png").write_bytes(b"\x89PNG but not really")
    log_before = (out / "log.txt").read_bytes()
    before = tree_hash(out)
    code, output = invoke("run", "--resume", out)
    assert code == 2 and "000.png" in first_line(output), output
    assert tree_hash(out) == before
    assert (out / "log.txt").read_bytes() == log_before


def test_an_intact_interrupted_run_resumes(interrupted_fedmmkt_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(interrupted_fedmmkt_run, run)
    record = json.loads((run / "run.json").read_text())
    assert record["state_sha256"] == hashlib.sha256(_state_path(run).read_bytes()).hexdigest()
    assert "pending_state_sha256" not in record
    code, output = invoke("run", "--resume", run)
    assert code == 0, output
    record = json.loads((run / "run.json").read_text())
    assert record["state_sha256"] == hashlib.sha256(_state_path(run).read_bytes()).hexdigest()
    assert json.loads(_state_path(run).read_text())["rounds_completed"] == 2
    assert "resumed after round 1" in (run / "log.txt").read_text()


# --------------------------------------------------------------------------- 2b. the cache


def without_timing(path: Path) -> str:
    return TIMING.sub("", path.read_text(encoding="utf-8"))


def _scale_generator(cache: Path) -> Path:
    (folder,) = (cache / "generators").iterdir()
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
    save_file({k: v * 1.5 for k, v in load_file(path).items()}, path, metadata=metadata)
    return path


def _zero_oracle(cache: Path) -> Path:
    (path,) = (cache / "oracles").glob("*.safetensors")
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()  # the hash kept: the tensors no longer match it
    save_file({k: np.zeros_like(v) for k, v in load_file(path).items()}, path, metadata=metadata)
    return path


def test_scaled_cached_generator_weights_are_rebuilt_with_a_warning(tmp_path, monkeypatch):
    """Generator weights scaled by 1.5 in the cache: the next run says so (warning, log.txt), pre-trains
    the base again and reports exactly the numbers of the run that built it, never the scaled ones."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDMMKT_CACHE", str(cache))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(CHEAP_GENERATOR)
    code, output = invoke("run", recipe, "--out", tmp_path / "a")
    assert code == 0, output
    (generator_folder,) = (cache / "generators").iterdir()
    assert folder_problem(generator_folder) is None and (generator_folder / MANIFEST).is_file()
    unet = _scale_generator(cache)
    assert folder_problem(generator_folder).startswith(f"{unet} differs from the file written")
    code, output = invoke("run", recipe, "--out", tmp_path / "b")
    assert code == 0, output
    message = f"the cached pre-trained generator {generator_folder} is not used: {unet} differs from the file"
    warning = next(line for line in output.splitlines() if line.startswith("warning:"))
    assert warning.startswith(f"warning: {message}") and warning.endswith("; building it again"), output
    assert f"WARNING {message}" in (tmp_path / "b" / "log.txt").read_text()
    assert without_timing(tmp_path / "b" / "metrics.jsonl") == without_timing(tmp_path / "a" / "metrics.jsonl")
    assert folder_problem(generator_folder) is None  # rebuilt and sealed again


@pytest.fixture(scope="module")
def digits_oracle_split():
    from fedmmkt_plugins.datasets.digits import DigitsConfig, DigitsDataset

    return DigitsDataset(DigitsConfig(oracle_fraction=0.1)).load(seed=0)


def test_zeroed_cached_oracle_weights_are_rebuilt_with_a_warning(digits_oracle_split, tmp_path):
    """Zeroed oracle weights (hash kept in the metadata) used to give generator_fid 0.0: now the oracle
    is trained again, with a warning, and labels images exactly as before."""
    from fedmmkt_plugins.evaluation.oracle import EvaluationOracle

    splits = digits_oracle_split
    first = EvaluationOracle(splits.oracle, splits.task, tmp_path, seed=0, epochs=2)
    expected = first.predict(splits.test.images)
    _zero_oracle(tmp_path)
    with pytest.warns(CacheWarning, match=f"the cached evaluation oracle {first.cache_path} is not used: its tensors"):
        again = EvaluationOracle(splits.oracle, splits.task, tmp_path, seed=0, epochs=2)
    assert not again.from_cache
    np.testing.assert_array_equal(again.predict(splits.test.images), expected)
    assert EvaluationOracle(splits.oracle, splits.task, tmp_path, seed=0, epochs=2).from_cache


def test_an_oracle_cached_without_a_hash_is_rebuilt(digits_oracle_split, tmp_path):
    """An oracle cached by an older fedmmkt (no hash in its metadata) is trained again, not trusted."""
    from fedmmkt_plugins.evaluation.oracle import EvaluationOracle

    splits = digits_oracle_split
    first = EvaluationOracle(splits.oracle, splits.task, tmp_path, seed=0, epochs=2)
    save_file(load_file(first.cache_path), first.cache_path)  # no metadata
    with pytest.warns(CacheWarning, match="has no content hash"):
        again = EvaluationOracle(splits.oracle, splits.task, tmp_path, seed=0, epochs=2)
    assert not again.from_cache
    with safe_open(str(first.cache_path), framework="np") as handle:
        assert handle.metadata()["fedmmkt_tensors_sha256"] == tensors_sha256(load_file(first.cache_path))
