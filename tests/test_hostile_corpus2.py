"""Issue 26's hostile corpus, part two, as one table: files that are not regular files, sizes past the
documented bounds, YAML 1.1's quiet conversions, rich markup in user text, run directories another tool
wrote, outputs that cannot be written. Every case runs the CLI in-process and asserts the exit code, the
first line of output, that no traceback is shown, and that the folder tree (every name, type, link
target and file's bytes) is the same afterwards, except what the case lets the project write."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fedmmkt_cli.main import app
from test_imagefolder import write_folder
from typer.testing import CliRunner

cli = CliRunner()

BASE = """\
fedmmkt: 1
seed: 0
data: {dataset: DATASET, partitioner: {name: iid}}
clients: [{name: cnn, count: 2, params: {channels: [4, 8], hidden: 16}}]
federation: {rounds: 1}
algorithm: {name: local}
loggers: []
"""
INVALID = "error: recipe r.yaml is invalid"


def recipe(tmp: Path, old: str = "", new: str = "", dataset: str = "{name: digits}", name: str = "r.yaml") -> str:
    text = BASE.replace("DATASET", dataset)
    assert old in text, old
    (tmp / name).write_text(text.replace(old, new, 1) if old else text)
    return name


def images(tmp: Path, **params) -> str:
    """An image folder (classes a and b) and a recipe reading it; ``params`` go into the dataset's."""
    root = write_folder(tmp / "images", per_class=3, classes=2)
    (root / "class_0").rename(root / "a")
    (root / "class_1").rename(root / "b")
    settings = {"root": "images", "image_size": 8, "channels": 1, **params}
    return recipe(tmp, dataset=json.dumps({"name": "imagefolder", "params": settings}))


def fake_run(tmp: Path, metrics: bytes | None = None, summary: bytes | None = None, marker: bool = True) -> str:
    """A folder shaped like a run directory with the given metrics.jsonl / summary.json bytes."""
    run = tmp / "run"
    run.mkdir()
    if marker:
        (run / "recipe.resolved.yaml").write_text(BASE.replace("DATASET", "{name: digits}"))
    if metrics is not None:
        (run / "metrics.jsonl").write_bytes(metrics)
    if summary is not None:
        (run / "summary.json").write_bytes(summary)
    return "run"


def laughs() -> str:
    levels = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    return "x=[" + ", ".join(levels) + "]"


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def loop(path: Path) -> Path:
    path.symlink_to(path.name)
    return path


def after(first: Callable[[Path], list[str]], then: Callable[[Path], object]) -> Callable[[Path], list[str]]:
    """A set-up that runs ``first`` (its arguments are returned) and then ``then`` (damage on top)."""

    def setup(tmp: Path) -> list[str]:
        args = first(tmp)
        then(tmp)
        return args

    return setup


@dataclass
class Case:
    setup: Callable[[Path], list[str]]  # builds files under the folder (the cwd), returns the CLI arguments
    first: str  # the first line of output starts with this
    detail: str = ""  # and this appears in the output (folded lines joined)
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)  # {NAME: value}, "{tmp}" replaced by the folder
    writes: tuple[str, ...] = ()  # paths under the folder the project may create (exit-0 cases)


CASES: dict[str, Case] = {
    # ----------------------------------------------------------------- the recipe file is not a regular file
    "recipe-fifo": Case(
        lambda t: ["validate", fifo(t / "r.yaml").name], "error: recipe file r.yaml is a FIFO (named pipe), not a"
    ),
    "recipe-fifo-run": Case(lambda t: ["run", fifo(t / "r.yaml").name], "error: recipe file r.yaml is a FIFO"),
    "recipe-folder": Case(
        lambda t: ["validate", (t / "r.yaml").mkdir() or "r.yaml"], "error: recipe file r.yaml is a folder"
    ),
    "recipe-link-loop": Case(
        lambda t: ["validate", loop(t / "r.yaml").name], "error: recipe file r.yaml is a symbolic link loop"
    ),
    "recipe-dev-zero": Case(lambda t: ["validate", "/dev/zero"], "error: recipe file /dev/zero is a character device"),
    "recipe-missing": Case(lambda t: ["validate", "nothere.yaml"], "error: recipe file not found: nothere.yaml"),
    # ----------------------------------------------------------------- YAML 1.1's quiet conversions
    "duplicate-key": Case(
        lambda t: ["validate", recipe(t, "seed: 0", "seed: 0\nseed: 1")],
        INVALID,
        "r.yaml:3: seed: duplicate key 'seed' (lines 2 and 3)",
    ),
    "duplicate-nested-key": Case(
        lambda t: ["validate", recipe(t, "{rounds: 1}", "{rounds: 1, rounds: 5}")],
        INVALID,
        "federation.rounds: duplicate key 'rounds' (lines 5 and 5)",
    ),
    "rounds-yes": Case(
        lambda t: ["validate", recipe(t, "rounds: 1", "rounds: yes")], INVALID, "federation.rounds: Input should be"
    ),
    "count-on": Case(lambda t: ["validate", recipe(t, "count: 2", "count: on")], INVALID, "(got 'on')"),
    "rounds-sexagesimal": Case(
        lambda t: ["validate", recipe(t, "rounds: 1", "rounds: 1:30")], INVALID, "r.yaml:5: federation.rounds:"
    ),
    "seed-octal": Case(
        lambda t: ["validate", recipe(t, "seed: 0", "seed: 010")], INVALID, "seed: expected a number, got the string"
    ),
    "binary-tag": Case(
        lambda t: ["validate", recipe(t, "seed: 0", "name: !!binary cnVu\nseed: 0")],
        INVALID,
        "r.yaml:2: name: explicit YAML tag !!binary is not allowed",
    ),
    "python-tag": Case(
        lambda t: ["validate", recipe(t, "seed: 0", "seed: !!python/object:os.system x")],
        INVALID,
        "seed: explicit YAML tag !!python/object:os.system is not allowed",
    ),
    "str-tag": Case(lambda t: ["validate", recipe(t, "seed: 0", "seed: !!str 0")], INVALID, "explicit YAML tag !!str"),
    "format-version-true": Case(
        lambda t: ["validate", recipe(t, "fedmmkt: 1", "fedmmkt: true")],
        INVALID,
        "r.yaml:1: fedmmkt: the format version must be the number 1, got true",
    ),
    "quoted-rounds": Case(
        lambda t: ["validate", recipe(t, "rounds: 1", 'rounds: "1"')],
        INVALID,
        "federation.rounds: expected a number, got the string '1' (write it without quotes)",
    ),
    "lr-quoted-inf": Case(
        lambda t: ["validate", recipe(t, "hidden: 16", 'hidden: 16, lr: "inf"')],
        INVALID,
        "clients.0.params.lr: expected a number, got the string 'inf'",
    ),
    "lr-overflow": Case(
        lambda t: ["validate", recipe(t, "hidden: 16", "hidden: 16, lr: 1e309")],
        INVALID,
        "clients.0.params.lr: must be a finite number (got inf)",
    ),
    "boolean-as-number": Case(
        lambda t: ["validate", recipe(t, "hidden: 16", "hidden: true")],
        INVALID,
        "clients.0.params.hidden: expected a number, got the boolean true",
    ),
    "int-5000-digits": Case(
        lambda t: ["validate", recipe(t, "seed: 0", "seed: " + "7" * 5000)],
        INVALID,
        "r.yaml:2: seed: an integer of 5000 digits; at most 100 are read",
    ),
    "markup-key": Case(
        lambda t: ["validate", recipe(t, "seed: 0", '"[/x]": 1\nseed: 0')], INVALID, "[/x]: unknown key"
    ),
    # ----------------------------------------------------------------- bounds
    "count-1e9": Case(
        lambda t: ["validate", recipe(t, "count: 2", "count: 1000000000")],
        INVALID,
        "clients.0.count: Input should be less than or equal to 10000",
    ),
    "clients-over-10000": Case(
        lambda t: ["validate", recipe(t, "clients: [", "clients: [{name: cnn, count: 9999}, ")],
        INVALID,
        "clients: the groups hold 10001 clients; a recipe may have at most 10000",
    ),
    "image-size-40000": Case(
        lambda t: ["run", images(t, image_size=40000), "--out", "out"],
        INVALID,
        "data.dataset.params.image_size: Input should be less than or equal to 1024",
    ),
    "digits-image-size-40000": Case(
        lambda t: ["validate", recipe(t, dataset="{name: digits, params: {image_size: 40000}}")],
        INVALID,
        "image_size: Input should be less than or equal to 1024",
    ),
    "caption-template-index": Case(
        lambda t: ["validate", recipe(t, dataset="{name: digits, params: {caption_template: '{name} {0}'}}")],
        INVALID,
        "caption_template '{name} {0}' cannot be filled in ({0} is not {name})",
    ),
    "caption-template-width": Case(
        lambda t: [
            "validate",
            recipe(t, dataset="{name: digits, params: {caption_template: '{name} {name:>999999999}'}}"),
        ],
        INVALID,
        "cannot be filled in ({name:>999999999} is not {name})",
    ),
    # ----------------------------------------------------------------- --set values: the recipe file's limits
    "set-billion-laughs": Case(
        lambda t: ["validate", recipe(t), "--set", laughs()], INVALID, "too many values once aliases are expanded"
    ),
    "set-3000-deep": Case(
        lambda t: ["validate", recipe(t), "--set", "x=" + "[" * 3000 + "]" * 3000], INVALID, "nested too deeply"
    ),
    "set-5000-digits": Case(
        lambda t: ["validate", recipe(t), "--set", "seed=" + "9" * 5000], INVALID, "an integer of 5000 digits"
    ),
    "set-quoted-number": Case(
        lambda t: ["validate", recipe(t), "--set", "federation.rounds='3'"],
        INVALID,
        "federation.rounds: expected a number, got the string '3' (write it without quotes) (from --set",
    ),
    "set-duplicate-key": Case(
        lambda t: ["validate", recipe(t), "--set", "federation={rounds: 1, rounds: 2}"],
        INVALID,
        "duplicate key 'rounds'",
    ),
    "set-binary-tag": Case(
        lambda t: ["validate", recipe(t), "--set", "name=!!binary cnVu"], INVALID, "explicit YAML tag !!binary"
    ),
    "set-2-mib": Case(
        lambda t: ["validate", recipe(t), "--set", "name=" + "n" * (2 << 20)], INVALID, "the limit is 1024 KiB"
    ),
    # ----------------------------------------------------------------- rich markup in user text
    "markup-recipe-name": Case(
        lambda t: ["validate", ((t / "[").mkdir(), recipe(t, name="[/x].yaml"))[1]],
        "ok: [/x].yaml is valid (2 clients, 1 rounds)",
        code=0,
    ),
    "markup-recipe-missing": Case(lambda t: ["validate", "[/x].yaml"], "error: recipe file not found: [/x].yaml"),
    "markup-out": Case(
        lambda t: ["run", recipe(t), "--out", "runs/[/x]"], "", "summary (runs/[/x])", code=0, writes=("runs",)
    ),
    "markup-report-value": Case(
        lambda t: ["report", fake_run(t, b'{"round": 1, "client_accuracy_mean": "[/x]"}\n'), "--no-plot"],
        "",
        "[/x]",
        code=0,
    ),
    # ----------------------------------------------------------------- image folders
    "fifo-image": Case(
        after(lambda t: ["run", images(t), "--out", "out"], lambda t: fifo(t / "images" / "a" / "fifo.png")),
        "error: image ",
        "images/a/fifo.png is a FIFO (named pipe), not a regular file",
    ),
    "image-link-loop": Case(
        after(lambda t: ["run", images(t), "--out", "out"], lambda t: loop(t / "images" / "a" / "loop.png")),
        "error: ",
        "images/a/loop.png is a symbolic link loop",
    ),
    "captions-fifo": Case(
        after(lambda t: ["run", images(t), "--out", "out"], lambda t: fifo(t / "images" / "captions.jsonl")),
        "error: captions file ",
        "captions.jsonl is a FIFO (named pipe), not a regular file",
    ),
    "captions-dev-zero": Case(
        lambda t: ["run", images(t, captions_file="/dev/zero"), "--out", "out"],
        "error: captions file /dev/zero is a character device, not a regular file",
    ),
    "captions-folder": Case(
        lambda t: ["run", images(t, captions_file="."), "--out", "out"], "error: captions file ", "is a folder"
    ),
    "captions-link-loop": Case(
        after(lambda t: ["run", images(t), "--out", "out"], lambda t: loop(t / "images" / "captions.jsonl")),
        "error: captions file ",
        "captions.jsonl is a symbolic link loop",
    ),
    "captions-list-line": Case(
        after(
            lambda t: ["run", images(t), "--out", "out"],
            lambda t: (t / "images" / "captions.jsonl").write_text("[1, 2]\n"),
        ),
        "error: ",
        "captions.jsonl:1: expected",
    ),
    "captions-nested-line": Case(
        after(
            lambda t: ["run", images(t), "--out", "out"],
            lambda t: (t / "images" / "captions.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n"),
        ),
        "error: ",
        "(nested too deeply)",
    ),
    "captions-list-file": Case(
        after(
            lambda t: ["run", images(t), "--out", "out"],
            lambda t: (t / "images" / "captions.jsonl").write_text('{"file": ["a"], "caption": "x"}\n'),
        ),
        "error: ",
        "('file' is list, not a string)",
    ),
    "root-link-loop": Case(
        after(lambda t: ["validate", images(t, root="loop")], lambda t: loop(t / "loop")),
        INVALID,
        "loop is a symbolic link loop",
    ),
    # ----------------------------------------------------------------- report / compare
    "report-metrics-not-utf8": Case(
        lambda t: ["report", fake_run(t, b'{"round": 1}\n\xff\xfe\n')], "error: run/metrics.jsonl is not UTF-8 text"
    ),
    "report-metrics-nested": Case(
        lambda t: ["report", fake_run(t, b'{"round": 1, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n")],
        "error: run/metrics.jsonl:1: not valid JSON (nested too deeply)",
    ),
    "report-metrics-50-deep": Case(
        lambda t: ["report", fake_run(t, b'{"round": 1, "x": ' + b"[" * 50 + b"]" * 50 + b"}\n")],
        "error: run/metrics.jsonl:1: nested more than 32 levels deep",
    ),
    "report-metrics-5000-digits": Case(
        lambda t: ["report", fake_run(t, b'{"round": 1, "x": ' + b"1" * 5000 + b"}\n")],
        "error: run/metrics.jsonl:1: not valid JSON (Exceeds the limit",
    ),
    "report-other-tool-lines": Case(
        lambda t: ["report", fake_run(t, b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n', marker=False)],
        "error: run is not a fedmmkt run directory: it holds no recipe.resolved.yaml",
    ),
    "report-other-tool-lines-in-run": Case(
        lambda t: ["report", fake_run(t, b'{"step": 1, "loss": 0.5}\n')],
        "error: run/metrics.jsonl:1: not a fedmmkt metrics row",
    ),
    "report-round-string": Case(
        lambda t: ["report", fake_run(t, b'{"round": "1"}\n')], "error: run/metrics.jsonl:1: not a fedmmkt metrics row"
    ),
    "report-summary-list": Case(
        lambda t: ["report", fake_run(t, b'{"round": 1}\n', b"[1, 2]")],
        "error: run/summary.json is not a fedmmkt summary: a JSON object, not list",
    ),
    "report-summary-not-utf8": Case(
        lambda t: ["report", fake_run(t, b'{"round": 1}\n', b"\xff")], "error: run/summary.json is not UTF-8 text"
    ),
    "report-summary-truncated": Case(
        lambda t: ["report", fake_run(t, b'{"round": 1}\n', b'{"name": "x", ')],
        "error: run/summary.json: not valid JSON",
    ),
    "report-metrics-fifo": Case(
        after(lambda t: ["report", fake_run(t)], lambda t: fifo(t / "run" / "metrics.jsonl")),
        "error: file run/metrics.jsonl is a FIFO (named pipe), not a regular file",
    ),
    "report-metrics-loop": Case(
        after(lambda t: ["report", fake_run(t)], lambda t: loop(t / "run" / "metrics.jsonl")),
        "error: file run/metrics.jsonl is a symbolic link loop",
    ),
    "report-a-file": Case(
        lambda t: ["report", recipe(t)], "error: r.yaml is a regular file, not a fedmmkt run directory"
    ),
    "report-missing": Case(lambda t: ["report", "nothere"], "error: run directory not found: nothere"),
    "compare-not-runs": Case(
        lambda t: ["compare", (t / "a").mkdir() or "a", "a", "--plot", "c.png"],
        "error: a is not a fedmmkt run directory",
    ),
    "compare-plot-proc": Case(
        lambda t: ["compare", fake_run(t, b'{"round": 1}\n'), "run", "--plot", "/proc/x.png"],
        "error: the plot's folder /proc is not writable",
    ),
    "compare-plot-jsonl": Case(
        lambda t: ["compare", fake_run(t, b'{"round": 1}\n'), "run", "--plot", "run/metrics.jsonl"],
        "error: plot run/metrics.jsonl: name it .png, .pdf or .svg",
    ),
    "compare-plot-folder": Case(
        lambda t: ["compare", fake_run(t, b'{"round": 1}\n'), "run", "--plot", (t / "p.png").mkdir() or "p.png"],
        "error: plot p.png is a folder, not a file",
    ),
    # ----------------------------------------------------------------- outputs that cannot be written
    "out-proc-self": Case(
        lambda t: ["run", recipe(t), "--out", "/proc/self"], "error: run directory --out /proc/self is not writable"
    ),
    "out-a-file": Case(
        lambda t: ["run", recipe(t), "--out", "r.yaml"], "error: run directory --out r.yaml is a regular file"
    ),
    "out-under-a-file": Case(
        lambda t: ["run", recipe(t), "--out", "r.yaml/run"],
        "error: run directory --out r.yaml/run cannot be created: a part of the path is a file, not a folder",
    ),
    "partition-into-a-file": Case(
        lambda t: ["partition", recipe(t), "r.yaml"], "error: partition folder r.yaml is a regular file, not a folder"
    ),
    "partition-into-proc": Case(
        lambda t: ["partition", recipe(t), "/proc/self/clients"],
        "error: partition folder /proc/self/clients is not writable",
    ),
    "federation-workdir-a-file": Case(
        lambda t: ["federation", "up", "--nodes", "2", "--workdir", recipe(t)],
        "error: --workdir r.yaml is a regular file, not a folder",
    ),
    "federation-nodes-0": Case(
        lambda t: ["federation", "up", "--nodes", "0"], "error: --nodes 0: a local federation runs 1 to 1000"
    ),
    "federation-nodes-negative": Case(
        lambda t: ["federation", "up", "--nodes", "-3"], "error: --nodes -3: a local federation runs 1 to 1000"
    ),
    "federation-data-empty": Case(
        lambda t: ["federation", "up", "--data", (t / "d").mkdir() or "d"], "error: d holds no client_K folders"
    ),
    "cache-a-file": Case(
        after(lambda t: ["run", recipe(t), "--out", "out"], lambda t: (t / "cache").write_text("x")),
        "error: the cache folder (FEDMMKT_CACHE) ",
        "cache is a regular file, not a folder",
        env={"FEDMMKT_CACHE": "{tmp}/cache"},
    ),
    "cache-under-a-file": Case(
        after(lambda t: ["run", recipe(t), "--out", "out"], lambda t: (t / "cache").write_text("x")),
        "error: the cache folder (FEDMMKT_CACHE) ",
        "a part of the path is a file",
        env={"FEDMMKT_CACHE": "{tmp}/cache/sub"},
    ),
}


def tree_hash(root: Path, skip: tuple[str, ...] = ()) -> str:
    """Names, types, link targets and regular files' bytes under ``root`` (never opening a FIFO or
    following a link); top-level entries named in ``skip`` are left out."""
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        relative = Path(folder).relative_to(root)
        if relative.parts and relative.parts[0] in skip:
            dirs.clear()
            continue
        for name in sorted(dirs + files):
            path = Path(folder) / name
            if not relative.parts and name in skip:
                continue
            info = os.lstat(path)
            digest.update(f"{relative / name}\0{stat.S_IFMT(info.st_mode)}\0".encode())
            if stat.S_ISLNK(info.st_mode):
                digest.update(os.readlink(path).encode())
            elif stat.S_ISREG(info.st_mode):
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_case(name, tmp_path, monkeypatch):
    case = CASES[name]
    monkeypatch.chdir(tmp_path)
    args = case.setup(tmp_path)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.replace("{tmp}", str(tmp_path)))
    before = tree_hash(tmp_path)
    result = cli.invoke(app, args)
    output = result.output
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == case.code, output
    assert output.splitlines()[0].startswith(case.first) if case.first else output, output
    assert case.detail in " ".join(output.split()) or case.detail in output, output
    assert tree_hash(tmp_path, case.writes) == before, sorted(p.name for p in tmp_path.iterdir())
    if case.writes:
        assert all((tmp_path / path).exists() for path in case.writes)


def test_the_corpus_is_large():
    assert len(CASES) >= 70


def test_memory_is_estimated_before_the_images_are_allocated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fedmmkt_core.paths.available_memory", lambda: 100)
    args = ["run", images(tmp_path), "--out", "out"]
    before = tree_hash(tmp_path)
    result = cli.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(
        "error: 6 images of 8x8 would need 384 bytes of memory, more than the 100 bytes available"
    ), result.output
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("value", ["1e3", "yes", "on", "010", "1:30", "2024-01-02", "null", "", "~", ".inf", "0x1f"])
def test_strings_dumped_for_a_resume_read_back_as_strings(value):
    import yaml

    from fedmmkt_core.recipe import dump_yaml
    from fedmmkt_core.strict_yaml import load_strict

    text = dump_yaml({"name": value, "n": 3, "x": 1e-3, "b": True})
    assert load_strict(text, 100)[0] == {"name": value, "n": 3, "x": 1e-3, "b": True}
    assert yaml.safe_load(text) == {"name": value, "n": 3, "x": 1e-3, "b": True}
