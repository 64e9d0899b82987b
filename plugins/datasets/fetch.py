"""``fedmmkt data fetch`` / ``verify``: bring a dataset's IDX files through apt, check pinned checksums.

Fashion-MNIST comes from Debian's package ``dataset-fashion-mnist`` (MIT): ``apt-get download`` into a
temporary folder and ``dpkg -x`` (no system install, no root), or from a folder the user filled
(``--from``: zalando's published files, a mirror, another machine). The pinned sha256 are those of the
*decompressed* IDX payloads, so they hold whichever source the files came from and whether or not they
are gzipped (Debian recompressed the ``.gz`` files; their bytes differ from zalando's, their payloads do
not). Every file is checked before any is written into the target folder.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedmmkt_plugins.datasets.idx import open_regular

from fedmmkt_core.errors import DataError, UserError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """Where a dataset's files come from and what they must hash to."""

    package: str  # Debian package holding the files
    folder: str  # their folder inside the package
    files: dict[str, tuple[int, str]]  # IDX file name (no .gz) -> (payload bytes, sha256 of the payload)
    urls: tuple[str, ...]  # the dataset's own published files
    about: str = ""


SOURCES: dict[str, Source] = {
    "fashion-mnist": Source(
        package="dataset-fashion-mnist",
        folder="usr/share/datasets/fashion-mnist",
        files={
            "train-images-idx3-ubyte": (47040016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
            "train-labels-idx1-ubyte": (60008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
            "t10k-images-idx3-ubyte": (7840016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
            "t10k-labels-idx1-ubyte": (10008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        },
        urls=tuple(
            f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}.gz"
            for name in (
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            )
        ),
        about="Fashion-MNIST (Zalando Research, MIT): 60,000 + 10,000 grey 28x28 images of 10 classes",
    ),
}


class FetchError(UserError):
    """The files could not be brought; the message says how to get them another way."""


@dataclass(frozen=True)
class FileRecord:
    name: str  # the file's name in the folder (with .gz where gzipped)
    size: int  # bytes on disk
    payload: int  # bytes of the IDX payload (decompressed)
    sha256: str  # of the payload


@dataclass
class FetchResult:
    dataset: str
    folder: Path
    origin: str
    files: list[FileRecord] = field(default_factory=list)
    seconds: float = 0.0


def source(name: str) -> Source:
    if name not in SOURCES:
        raise UserError(f"unknown dataset '{name}'; fetchable: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def instructions(name: str) -> str:
    src = source(name)
    urls = "\n".join(f"      {url}" for url in src.urls)
    return (
        f"Get the {len(src.files)} files another way:\n"
        f"  - on Debian or Ubuntu: `sudo apt-get update`, then this command again (it runs `apt-get download "
        f"{src.package}` and `dpkg -x`; nothing is installed)\n"
        f"  - the dataset's own published files:\n{urls}\n"
        f"    then check and copy them: fedmmkt data fetch {name} DIR --from FOLDER\n"
        f"    or check them where they are: fedmmkt data verify {name} FOLDER\n"
        "  The pinned sha256 are those of the decompressed IDX files: the same from every source, gzipped or not."
    )


def payload_digest(path: Path, limit: int) -> tuple[int, str]:
    """(bytes, sha256) of a file's IDX payload, decompressed if gzipped; stops reading after ``limit + 1`` bytes."""
    digest, total = hashlib.sha256(), 0
    raw = open_regular(path)
    try:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if raw.read(2) == b"\x1f\x8b" else raw
        raw.seek(0)
        while total <= limit:
            chunk = stream.read(min(CHUNK, limit + 1 - total))
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    finally:
        raw.close()
    return total, digest.hexdigest()


def _check(path: Path, expected: tuple[int, str]) -> FileRecord:
    size, sha = expected
    got_size, got_sha = payload_digest(path, size)
    if got_size != size or got_sha != sha:
        longer = " or more" if got_size > size else ""
        raise DataError(
            f"{path}: checksum mismatch: its IDX payload is {got_size}{longer} bytes with sha256 {got_sha}; expected "
            f"{size} bytes with sha256 {sha}. The file is corrupt, truncated or another dataset's"
        )
    return FileRecord(path.name, path.stat().st_size, got_size, got_sha)


def _present(folder: Path, name: str) -> list[Path]:
    return [folder / n for n in (name, name + ".gz") if (folder / n).exists() or (folder / n).is_symlink()]


def verify(name: str, folder: Path) -> FetchResult:
    """Check every copy (raw and gzipped) of the dataset's files in ``folder``; DataError names a bad one."""
    src, start = source(name), time.monotonic()
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    result = FetchResult(name, folder, f"{folder} (verified in place)")
    for file, expected in src.files.items():
        copies = _present(folder, file)
        if not copies:
            raise DataError(f"{folder}: no {file} or {file}.gz\n{instructions(name)}")
        result.files += [_check(path, expected) for path in copies]
    result.seconds = time.monotonic() - start
    return result


def fetch(
    name: str, target: Path, from_folder: Path | None = None, say: Callable[[str], None] = lambda _: None
) -> FetchResult:
    """Bring the dataset's files into ``target`` from ``from_folder`` or through apt; check them before writing."""
    src, start = source(name), time.monotonic()
    target = Path(target)
    with tempfile.TemporaryDirectory(prefix="fedmmkt-fetch-") as tmp:
        if from_folder is None:
            folder, origin = _apt_extract(name, src, Path(tmp), say)
        else:
            folder, origin = Path(from_folder), f"{from_folder}"
            if not folder.is_dir():
                raise DataError(f"--from {folder} is not a folder")
        chosen = {}
        for file, expected in src.files.items():
            copies = _present(folder, file)
            if not copies:
                raise DataError(f"{folder}: no {file} or {file}.gz\n{instructions(name)}")
            chosen[file] = (copies[-1], expected)  # the gzipped copy where both are there: smaller
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create {target}: {exc.strerror or exc}") from None
        staged: list[tuple[Path, Path]] = []
        result = FetchResult(name, target, origin)
        try:
            for path, expected in chosen.values():
                temp = target / f".{path.name}.partial"
                say(f"checking {path.name}")
                with open_regular(path) as f_in, open(temp, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out, CHUNK)
                staged.append((temp, target / path.name))
                record = _check(temp, expected)  # the bytes written, not the source (which could change)
                result.files.append(FileRecord(path.name, record.size, record.payload, record.sha256))
            for temp, final in staged:
                os.replace(temp, final)
            staged.clear()
        except OSError as exc:
            raise DataError(f"cannot write into {target}: {exc.strerror or exc}") from None
        finally:
            for temp, _ in staged:
                temp.unlink(missing_ok=True)
    for file, expected in src.files.items():  # a stale copy beside the new one (raw next to .gz) must agree too
        for path in _present(target, file):
            if path.name not in {r.name for r in result.files}:
                _check(path, expected)
    result.seconds = time.monotonic() - start
    return result


def _apt_extract(name: str, src: Source, tmp: Path, say: Callable[[str], None]) -> tuple[Path, str]:
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg")
    if apt is None or dpkg is None:
        missing = " and ".join(tool for tool, where in (("apt-get", apt), ("dpkg", dpkg)) if where is None)
        raise FetchError(
            f"{missing} not found: {name} is fetched with `apt-get download {src.package}`.\n" + instructions(name)
        )
    say(f"apt-get download {src.package}")
    _run([apt, "download", src.package], tmp, name)
    debs = sorted(tmp.glob(f"{src.package}_*.deb"))
    if len(debs) != 1:
        raise FetchError(f"apt-get download {src.package} left {len(debs)} .deb files in {tmp}\n" + instructions(name))
    say(f"dpkg -x {debs[0].name}")
    _run([dpkg, "-x", str(debs[0]), str(tmp / "extracted")], tmp, name)
    folder = tmp / "extracted" / src.folder
    if not folder.is_dir():
        raise FetchError(f"{debs[0].name} holds no {src.folder}\n" + instructions(name))
    return folder, f"{debs[0].name} (apt-get download {src.package})"


def _run(command: list[str], cwd: Path, name: str) -> None:
    shown = " ".join(Path(command[0]).name if i == 0 else part for i, part in enumerate(command))
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"`{shown}` could not run: {exc}\n" + instructions(name)) from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        raise FetchError(f"`{shown}` failed (exit {done.returncode}):\n{tail}\n" + instructions(name))


def render(result: FetchResult, verb: str = "fetched"):
    """A rich table of the files: name, bytes on disk, payload bytes, sha256; elapsed time in the caption."""
    from rich.table import Table

    table = Table(title=f"{result.dataset}: {verb} {'into' if verb == 'fetched' else 'in'} {result.folder}")
    table.add_column("file", no_wrap=True)
    table.add_column("bytes", justify="right")
    table.add_column("IDX bytes", justify="right")
    table.add_column("sha256 of the IDX payload (pinned)", overflow="fold")
    for record in result.files:
        table.add_row(record.name, f"{record.size:,}", f"{record.payload:,}", record.sha256)
    total = sum(r.size for r in result.files)
    table.caption = f"from {result.origin}: {len(result.files)} files, {total:,} bytes, {result.seconds:.1f} s"
    return table
