"""The idx dataset on small IDX files written here (raw and gzipped), hostile headers naming the file, and
``fedmmkt data fetch`` / ``verify`` with fake files and pinned checksums (no network, no real data)."""

import gzip
import hashlib
import os
import time
import tracemalloc

import numpy as np
import pytest
from fedmmkt_cli.main import app
from fedmmkt_plugins.datasets import fetch as fetch_module
from fedmmkt_plugins.datasets import idx as dataset_idx
from fedmmkt_plugins.datasets.idx import IDXConfig, IDXDataset, fit_images
from pydantic import ValidationError
from typer.testing import CliRunner

from fedmmkt_core.errors import DataError
from fedmmkt_core.testing import DatasetTests

cli = CliRunner()


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def write(path, data: bytes, gz: bool = False):
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def tiny(per_split=(30, 10), classes=3, size=6, seed=0):
    """Images whose every pixel is ``10 * label + index % 7``: labels recoverable from the pixels."""
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, count in zip(("train", "t10k"), per_split, strict=True):
        labels = rng.integers(0, classes, count).astype(np.uint8)
        labels[:classes] = np.arange(classes)
        images = np.broadcast_to((10 * labels + np.arange(count) % 7)[:, None, None], (count, size, size))
        out[prefix] = (np.ascontiguousarray(images, dtype=np.uint8), labels)
    return out


def write_folder(root, gz=False, **kwargs):
    root.mkdir(parents=True, exist_ok=True)
    for prefix, (images, labels) in tiny(**kwargs).items():
        write(root / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write(root / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
    return root


def dataset(root, **params):
    params = {"root": str(root), "class_names": ["a", "b", "c"], "image_size": 6, **params}
    return IDXDataset(IDXConfig.model_validate(params))


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_through_the_split_protocol(tmp_path, gz):
    root = write_folder(tmp_path / "idx", gz=gz)
    splits = dataset(root, validation_fraction=0.1).load(seed=0)
    parts = [splits.train, splits.test, splits.oracle, splits.validation]
    assert sum(len(p) for p in parts) == 40
    assert splits.task.class_names == ("a", "b", "c") and splits.task.channels == 1
    for part in parts:
        assert part.images.shape[1:] == (6, 6, 1) and part.images.dtype == np.uint8
        np.testing.assert_array_equal(part.images[:, 0, 0, 0] // 10, part.labels)  # pixels and labels stay paired
        assert part.captions == [f"a photo of a {'abc'[y]}" for y in part.labels]
    pooled = np.concatenate([p.images[:, 0, 0, 0] for p in parts])
    written = np.concatenate([images[:, 0, 0] for images, _ in tiny().values()])
    np.testing.assert_array_equal(np.sort(pooled), np.sort(written))  # train + t10k pooled, nothing lost


def test_raw_and_gzip_read_the_same(tmp_path):
    a = dataset(write_folder(tmp_path / "raw")).load(seed=3)
    b = dataset(write_folder(tmp_path / "gz", gz=True)).load(seed=3)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)


def test_known_names_and_caption(tmp_path):
    root = write_folder(tmp_path / "idx", classes=10, per_split=(60, 20))
    splits = IDXDataset(IDXConfig.model_validate({"root": str(root), "known": "fashion-mnist"})).load(seed=0)
    assert splits.task.class_names[0] == "T-shirt/top" and splits.task.class_names[9] == "Ankle boot"
    assert splits.task.image_size == 28 and splits.train.images.shape[1:] == (28, 28, 1)  # 6x6 padded
    assert splits.task.prompt(9) == "a photo of a Ankle boot"
    mnist = IDXConfig.model_validate({"root": str(root), "known": "mnist"})
    assert mnist.caption_template == "a photo of the digit {name}"


def test_names_need_exactly_one_source(tmp_path):
    root = write_folder(tmp_path / "idx")
    for params in ({}, {"known": "mnist", "class_names": ["a", "b"]}):
        with pytest.raises(ValidationError, match="exactly one of class_names"):
            IDXConfig.model_validate({"root": str(root), **params})


def test_max_samples_per_class_is_stratified_and_seed_independent(tmp_path):
    root = write_folder(tmp_path / "idx")
    first, second = (dataset(root, max_samples_per_class=5).load(seed=s) for s in (0, 1))

    def pool(splits):
        parts = [splits.train, splits.test] + ([splits.oracle] if splits.oracle else [])
        return np.sort(np.concatenate([p.images[:, 0, 0, 0] for p in parts]))

    assert len(pool(first)) == 15
    np.testing.assert_array_equal(np.bincount(pool(first) // 10), [5, 5, 5])
    np.testing.assert_array_equal(pool(first), pool(second))  # the same images whatever the seed


def test_fit_pad_nearest_bilinear():
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    padded = fit_images(images, 8, "pad", "x")
    assert padded.shape == (2, 8, 8) and padded[:, :2].sum() == 0
    np.testing.assert_array_equal(padded[:, 2:6, 2:6], images)
    np.testing.assert_array_equal(fit_images(images, 8, "nearest", "x"), images.repeat(2, 1).repeat(2, 2))
    smooth = fit_images(np.full((1, 4, 4), 200, np.uint8), 8, "bilinear", "x")
    assert (smooth == 200).all()
    ramp = fit_images(np.tile(np.array([0, 100, 200, 250], np.uint8), (1, 4, 1)), 8, "bilinear", "x")
    assert (np.diff(ramp[0, 0].astype(int)) >= 0).all() and ramp[0, 0, 0] == 0 and ramp[0, 0, -1] == 250
    with pytest.raises(DataError, match="do not fit image_size 2"):
        fit_images(images, 2, "pad", "x")


# ------------------------------------------------------------------------------------------------ hostile files


def corrupt(tmp_path, which, data: bytes, gz=False):
    root = write_folder(tmp_path / "idx")
    target = root / which
    target.unlink()
    return root, write(target, data, gz)


def images_header(dims, dtype=0x08, ndim=None) -> bytes:
    return bytes([0, 0, dtype, len(dims) if ndim is None else ndim]) + np.asarray(dims, dtype=">u4").tobytes()


GOOD = idx_bytes(np.zeros((30, 6, 6), np.uint8))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x1f\x00\x08\x03" + GOOD[4:], "not an IDX file"),
        (images_header((30, 6, 6), ndim=1) + GOOD[16:], r"has 1 dimensions; an IDX images file has magic 0x00000803"),
        (images_header((30, 6, 6), dtype=0x0D) + GOOD[16:], r"data type 0x0d; only unsigned bytes"),
        (GOOD[:-5], "truncated"),
        (GOOD + b"\0", "too long"),
        (GOOD[:10], "truncated header"),
        (b"", "truncated header"),
        (images_header((2**28, 2**16, 2**16)) + b"\0" * 64, r"claims 268435456 x 65536 x 65536 = 1152921504606846976"),
    ],
    ids=["magic", "ndim", "dtype", "truncated", "too-long", "short-header", "empty", "2**60"],
)
def test_hostile_image_file_is_named(tmp_path, data, message, gz):
    root, path = corrupt(tmp_path, "train-images-idx3-ubyte", data, gz)
    with pytest.raises(DataError, match=message) as info:
        dataset(root).load(seed=0)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("gz", [False, True])
def test_huge_dimension_is_refused_from_the_header_alone(tmp_path, gz):
    _root, path = corrupt(tmp_path, "train-images-idx3-ubyte", images_header((2**20, 2**20, 2**20)) + b"\0" * 16, gz)
    root = tmp_path / "idx"
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(DataError, match=r"at most 2147483648 are read") as info:
            dataset(root).load(seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert peak < 2**20 and time.monotonic() - started < 2


def test_gzip_claim_below_the_cap_grows_only_with_the_data(tmp_path):
    # 2**30 bytes claimed, 64 there: refused as truncated without a 1 GiB buffer
    root, path = corrupt(tmp_path, "train-images-idx3-ubyte", images_header((2**14, 2**8, 2**8)) + b"\0" * 64, gz=True)
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2**14, np.uint8)))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="truncated: the header claims 1073741824 bytes") as info:
            dataset(root, prefixes=["train"]).load(seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value) and peak < 8 * 2**20


def test_corrupt_gzip_is_named(tmp_path):
    root = write_folder(tmp_path / "idx", gz=True)
    path = root / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12] + b"garbage-tail")
    with pytest.raises(DataError) as info:
        dataset(root).load(seed=0)
    assert str(path) in str(info.value)


def test_label_count_mismatch_is_named(tmp_path):
    root, path = corrupt(tmp_path, "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(9, np.uint8)))
    with pytest.raises(DataError, match="9 labels for the 10 images") as info:
        dataset(root).load(seed=0)
    assert str(path) in str(info.value)


def test_label_file_with_image_magic_is_named(tmp_path):
    root, path = corrupt(tmp_path, "t10k-labels-idx1-ubyte", idx_bytes(np.zeros((10, 1, 1), np.uint8)))
    with pytest.raises(DataError, match="an IDX labels file has magic 0x00000801") as info:
        dataset(root).load(seed=0)
    assert str(path) in str(info.value)


def test_label_out_of_range_is_named(tmp_path):
    labels = np.zeros(30, np.uint8)
    labels[17] = 3
    root, path = corrupt(tmp_path, "train-labels-idx1-ubyte", idx_bytes(labels))
    with pytest.raises(DataError, match="label 3 at index 17 .* there are 3 classes") as info:
        dataset(root).load(seed=0)
    assert str(path) in str(info.value)


def test_fifo_is_refused_without_blocking(tmp_path):
    root = write_folder(tmp_path / "idx")
    path = root / "train-images-idx3-ubyte"
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(DataError, match="not a regular file") as info:
        dataset(root).load(seed=0)
    assert str(path) in str(info.value)


def test_missing_file_says_how_to_fetch(tmp_path):
    root = write_folder(tmp_path / "idx")
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte .*fedmmkt data fetch fashion-mnist"):
        dataset(root).load(seed=0)


def test_hostile_file_through_the_cli_exits_2_without_traceback(tmp_path):
    root, path = corrupt(tmp_path, "train-images-idx3-ubyte", GOOD[:-1])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "fedmmkt: 1\nname: idx\ndata:\n  dataset: {name: idx, params: {root: idx, class_names: [a, b, c], "
        "image_size: 6}}\n  partitioner: {name: iid}\nclients:\n  - {name: cnn, count: 2}\nfederation: {rounds: 1}\n"
        "algorithm: {name: local}\nloggers: []\n"
    )
    result = cli.invoke(app, ["partition", str(recipe), str(tmp_path / "parts")])
    assert result.exit_code == 2, result.output
    assert "train-images-idx3-ubyte" in result.output and "truncated" in result.output
    assert "Traceback" not in result.output


class TestIDXConformance(DatasetTests):
    name = "idx"

    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path):
        type(self).params = {"root": str(write_folder(tmp_path / "idx", gz=True)), "class_names": ["a", "b", "c"]}


# ------------------------------------------------------------------------------------------------ fetch / verify


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """Four small IDX files in ``downloads/`` (gzipped) and the fetch table pinned to their checksums."""
    folder = write_folder(tmp_path / "downloads", gz=True)
    pinned = {}
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        payload = gzip.decompress((folder / f"{name}.gz").read_bytes())
        pinned[name] = (len(payload), hashlib.sha256(payload).hexdigest())
    real = fetch_module.SOURCES["fashion-mnist"]
    fake = fetch_module.Source(real.package, real.folder, pinned, real.urls, real.about)
    monkeypatch.setitem(fetch_module.SOURCES, "fashion-mnist", fake)
    return folder


def test_fetch_from_folder_copies_and_verifies(tmp_path, fake_source):
    target = tmp_path / "data" / "fashion"
    result = cli.invoke(app, ["data", "fetch", "fashion-mnist", str(target), "--from", str(fake_source)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in fake_source.iterdir())
    text = " ".join(result.output.split())
    assert "t10k-images-idx3-ubyte.gz" in text and "4 files" in text
    splits = dataset(target).load(seed=0)  # what was fetched loads through the plugin
    assert len(splits.train) + len(splits.test) + len(splits.oracle) == 40
    verified = cli.invoke(app, ["data", "verify", "fashion-mnist", str(target)])
    assert verified.exit_code == 0, verified.output


def test_fetch_accepts_raw_files(tmp_path, fake_source):
    raw = tmp_path / "raw"
    raw.mkdir()
    for path in fake_source.iterdir():
        (raw / path.name[:-3]).write_bytes(gzip.decompress(path.read_bytes()))
    result = cli.invoke(app, ["data", "fetch", "fashion-mnist", str(tmp_path / "out"), "--from", str(raw)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "train-images-idx3-ubyte").is_file()


def test_fetch_checksum_mismatch_names_the_file_and_writes_nothing(tmp_path, fake_source):
    bad = fake_source / "train-labels-idx1-ubyte.gz"
    payload = bytearray(gzip.decompress(bad.read_bytes()))
    payload[-1] ^= 1
    bad.write_bytes(gzip.compress(bytes(payload)))
    target = tmp_path / "out"
    result = cli.invoke(app, ["data", "fetch", "fashion-mnist", str(target), "--from", str(fake_source)])
    assert result.exit_code == 2, result.output
    assert "train-labels-idx1-ubyte.gz" in result.output and "checksum mismatch" in result.output
    assert "Traceback" not in result.output
    assert not [p for p in target.iterdir() if p.is_file()]  # nothing half-written, no stray .partial
    verified = cli.invoke(app, ["data", "verify", "fashion-mnist", str(fake_source)])
    assert verified.exit_code == 2 and "train-labels-idx1-ubyte.gz" in verified.output


def test_fetch_missing_file_gives_instructions(tmp_path, fake_source):
    (fake_source / "t10k-images-idx3-ubyte.gz").unlink()
    result = cli.invoke(app, ["data", "fetch", "fashion-mnist", str(tmp_path / "out"), "--from", str(fake_source)])
    assert result.exit_code == 2
    assert "no t10k-images-idx3-ubyte" in result.output and "fashion-mnist.s3-website" in result.output


def test_fetch_without_apt_exits_2_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_module.shutil, "which", lambda name: None)
    result = cli.invoke(app, ["data", "fetch", "fashion-mnist", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "apt-get and dpkg not found" in text
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}" in text
    assert "--from FOLDER" in text and "fedmmkt data verify fashion-mnist FOLDER" in text
    assert not (tmp_path / "out").exists()


def test_fetch_when_apt_fails_exits_2(tmp_path, monkeypatch):
    fake_apt = tmp_path / "bin" / "apt-get"
    fake_apt.parent.mkdir()
    fake_apt.write_text("#!/bin/sh\necho 'E: Unable to locate package dataset-fashion-mnist' >&2\nexit 100\n")
    fake_apt.chmod(0o755)
    monkeypatch.setattr(fetch_module.shutil, "which", lambda name: str(fake_apt.parent / name))
    result = cli.invoke(app, ["data", "fetch", "fashion-mnist", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Unable to locate package" in result.output and "exit 100" in result.output
    assert "fedmmkt data fetch fashion-mnist DIR --from FOLDER" in " ".join(result.output.split())


def test_unknown_dataset(tmp_path):
    result = cli.invoke(app, ["data", "fetch", "cifar-10", str(tmp_path)])
    assert result.exit_code == 2 and "fetchable: fashion-mnist" in result.output


def test_output_too_large_is_refused_before_resizing(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_idx, "MAX_PAYLOAD", 40 * 512 * 512 - 1)
    with pytest.raises(DataError, match="40 images of 512x512 .*set max_samples_per_class"):
        dataset(write_folder(tmp_path / "idx"), image_size=512, resize="nearest").load(seed=0)


def test_the_fashion_recipe_validates_and_loads_32x32_splits(tmp_path):
    """examples/fashion.yaml against a stand-in for data/fashion-mnist (CI has no real data): it validates,
    its splits are 28x28 padded to 32x32, and its tiny generator's VAE and UNet divide that size."""
    from pathlib import Path

    from fedmmkt_plugins.generators.sd_lora import SDLoraConfig

    from fedmmkt_core.recipe import load_recipe

    recipe_path = Path(__file__).resolve().parents[1] / "examples" / "fashion.yaml"
    root = write_folder(tmp_path / "fashion", gz=True, per_split=(400, 100), classes=10, size=28)
    override = f"data.dataset.params.root={root}"
    result = CliRunner().invoke(app, ["validate", str(recipe_path), "--set", override])
    assert result.exit_code == 0, result.output
    recipe = load_recipe(recipe_path, [override])
    splits = recipe.build("dataset", recipe.data.dataset).load(seed=0)
    assert splits.train.images.shape[1:] == (32, 32, 1) and splits.task.image_size == 32
    assert splits.task.class_names[0] == "T-shirt/top" and splits.public is not None
    tiny = SDLoraConfig.model_validate(recipe.generator.params).tiny
    assert 32 % (2 ** (len(tiny.vae_widths) - 1) * 2 ** (len(tiny.unet_channels) - 1)) == 0
