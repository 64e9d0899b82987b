"""A run's files through a log stream (``backend.params.server_dir``): what the ServerApp prints, what
``fedmmkt run`` writes back, and the lines it refuses."""

import base64
import hashlib
import json

from fedmmkt_plugins.backends.flower.results import BEGIN, CHUNK, CHUNK_CHARS, RunFileReceiver, emit_run_files


def run_dir(tmp_path):
    root = tmp_path / "server" / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "state.json").write_text("{}")
    (root / "samples").mkdir()
    (root / "samples" / "round1.png").write_bytes(bytes(range(256)) * 200)  # several chunks
    (root / "metrics.jsonl").write_text('{"round": 1}\n')
    (root / "run.lock").write_text("pid")
    (root / "empty.txt").write_text("")
    return root


def test_the_files_arrive_as_written_and_other_lines_pass_through(tmp_path):
    lines: list[str] = []
    assert emit_run_files(run_dir(tmp_path), write=lines.append) == 3
    assert sum(line.startswith(CHUNK) for line in lines) > 4
    stream = ["INFO round 1 done"]
    for line in lines:  # Flower may prefix a log line; the receiver finds the marker anywhere
        stream += ["INFO progress", f"\x1b[92mINFO\x1b[0m: {line}"]
    receiver = RunFileReceiver(tmp_path / "out")
    passed = [line for line in stream if not receiver.feed(line)]
    receiver.close()
    assert set(passed) == {"INFO round 1 done", "INFO progress"}
    assert sorted(receiver.written) == ["empty.txt", "metrics.jsonl", "samples/round1.png"]
    assert receiver.rejected == []
    out = tmp_path / "out"
    assert (out / "samples" / "round1.png").read_bytes() == bytes(range(256)) * 200
    assert (out / "metrics.jsonl").read_text() == '{"round": 1}\n'
    assert not (out / "checkpoints").exists() and not (out / "run.lock").exists()


def header(path, data, chunks=1):
    return BEGIN + json.dumps(
        {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "chunks": chunks}
    )


def test_hostile_or_damaged_files_are_refused_and_nothing_is_written_outside(tmp_path):
    data = b"x" * 10
    encoded = base64.b64encode(data).decode()
    stream = [
        header("../escape.txt", data),
        f"{CHUNK}0 {encoded}",
        header("/etc/passwd", data),
        f"{CHUNK}0 {encoded}",
        header("checkpoints/state.json", data),
        f"{CHUNK}0 {encoded}",
        header("tampered.txt", data),
        f"{CHUNK}0 {base64.b64encode(b'y' * 10).decode()}",
        header("cut.txt", data, chunks=2),
        f"{CHUNK}0 {encoded}",
        BEGIN + "not json",
        BEGIN + json.dumps({"path": "big.bin", "size": 2**40, "sha256": "0", "chunks": 2**30}),
        header("late.txt", data, chunks=2),
        f"{CHUNK}1 {encoded[:CHUNK_CHARS]}",  # out of order: never completes
    ]
    out = tmp_path / "deep" / "out"
    receiver = RunFileReceiver(out)
    assert all(receiver.feed(line) for line in stream)
    receiver.close()
    assert receiver.written == []
    assert len(receiver.rejected) == 8
    assert any("tampered.txt: size or sha256" in reason for reason in receiver.rejected)
    assert any("cut.txt: 1 of 2 parts" in reason for reason in receiver.rejected)
    assert not (tmp_path / "deep" / "escape.txt").exists() and not out.exists()
