"""The hf-disk dataset on real digits saved with ``save_to_disk``, and its errors naming what is wrong."""

import os
import subprocess
import sys

import numpy as np
import pytest
from fedmmkt_plugins.datasets.hf_disk import HFDiskConfig, HFDiskDataset

import fedmmkt_core.testing.base
from fedmmkt_core.errors import DataError
from fedmmkt_core.plugins import Registration, Registry, get_registry
from fedmmkt_core.testing import DatasetTests, digits_sample

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
hf = pytest.importorskip("datasets")

NAMES = ["zero", "one", "two"]


def digits_rows(per_class=12, classes=3, offset=0):
    data, _ = digits_sample(600)
    images, labels = [], []
    for label in range(classes):
        picked = data.images[data.labels == label][offset : offset + per_class]
        images += [image[..., 0] for image in picked]
        labels += [label] * len(picked)
    return images, labels


def save_digits(path, per_class=12, classes=3, rgb=False, **columns):
    images, labels = digits_rows(per_class, classes)
    if rgb:
        images = [np.stack([image, image // 2, 255 - image], axis=-1) for image in images]
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=NAMES[:classes]), **columns.pop("f", {})})
    hf.Dataset.from_dict({"image": images, "label": labels, **columns}, features=features).save_to_disk(str(path))
    return path


def dataset(path, **params):
    return HFDiskDataset(HFDiskConfig.model_validate({"path": str(path), **params}))


def everything(splits):
    parts = [splits.train, splits.test, splits.oracle, splits.public]
    return [part for part in parts if part is not None]


def pixels(splits):
    return sorted(image.tobytes() for part in everything(splits) for image in part.images)


def test_class_names_from_classlabel_and_template_captions(tmp_path):
    splits = dataset(save_digits(tmp_path / "ds"), image_size=8, channels=1).load(seed=0)
    assert splits.task.class_names == ("zero", "one", "two")
    assert (splits.task.image_size, splits.task.channels) == (8, 1)
    assert sum(len(part) for part in everything(splits)) == 36
    assert splits.train.images.shape[1:] == (8, 8, 1) and splits.train.images.dtype == np.uint8
    captions = [c for part in everything(splits) for c in part.captions]
    assert "a photo of a two" in captions


def test_pixels_survive_when_no_resize_is_needed(tmp_path):
    images, _ = digits_rows()
    splits = dataset(save_digits(tmp_path / "ds"), image_size=8, channels=1, test_fraction=0.5).load(seed=0)
    known = {image.tobytes() for image in images}
    assert all(image[..., 0].tobytes() in known for image in splits.test.images)


def test_datasetdict_split(tmp_path):
    train_images, train_labels = digits_rows(per_class=12)
    test_images, test_labels = digits_rows(per_class=5, offset=20)
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=NAMES)})
    hf.DatasetDict(
        {
            "train": hf.Dataset.from_dict({"image": train_images, "label": train_labels}, features=features),
            "test": hf.Dataset.from_dict({"image": test_images, "label": test_labels}, features=features),
        }
    ).save_to_disk(str(tmp_path / "dd"))
    assert sum(len(p) for p in everything(dataset(tmp_path / "dd", image_size=8).load(seed=0))) == 36
    assert sum(len(p) for p in everything(dataset(tmp_path / "dd", split="test", image_size=8).load(seed=0))) == 15


def test_missing_split_lists_the_splits(tmp_path):
    images, labels = digits_rows()
    part = hf.Dataset.from_dict({"image": images, "label": labels})
    hf.DatasetDict({"train": part, "test": part}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"split 'validation' not found in .*dd; available splits: test, train"):
        dataset(tmp_path / "dd", split="validation").load(seed=0)


@pytest.mark.parametrize("param", ["image_column", "label_column", "caption_column"])
def test_missing_column_names_column_folder_and_columns(tmp_path, param):
    root = save_digits(tmp_path / "ds")
    with pytest.raises(DataError, match=r"column 'nope' not found in .*ds; columns: image, label"):
        dataset(root, **{param: "nope"}).load(seed=0)


def test_caption_column_and_other_column_names(tmp_path):
    images, labels = digits_rows()
    captions = [f"digit number {i}" for i in range(len(labels))]
    features = hf.Features({"img": hf.Image(), "y": hf.ClassLabel(names=NAMES), "text": hf.Value("string")})
    data = {"img": images, "y": labels, "text": captions}
    hf.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "ds"))
    params = {"image_column": "img", "label_column": "y", "caption_column": "text", "image_size": 8}
    splits = dataset(tmp_path / "ds", **params).load(seed=0)
    assert sorted(c for part in everything(splits) for c in part.captions) == sorted(captions)


def test_empty_caption_is_named(tmp_path):
    images, labels = digits_rows()
    captions = ["fine"] * len(labels)
    captions[4] = " "
    hf.Dataset.from_dict({"image": images, "label": labels, "text": captions}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"row 4 has an empty or non-text caption in column 'text'"):
        dataset(tmp_path / "ds", caption_column="text").load(seed=0)


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_grey_and_rgb_sources_become_the_channels_asked_for(tmp_path, rgb, channels):
    splits = dataset(save_digits(tmp_path / "ds", rgb=rgb), image_size=16, channels=channels).load(seed=0)
    assert splits.task.channels == channels
    for part in everything(splits):
        assert part.images.shape[1:] == (16, 16, channels) and part.images.dtype == np.uint8
    if channels == 3:
        pixels = splits.train.images.astype(int)
        assert (pixels[..., 0] != pixels[..., 2]).any() == rgb  # a grey source gives equal channels


def test_plain_labels_and_array_images(tmp_path):
    images, labels = digits_rows()
    names = {0: "10", 1: "2", 2: "7"}
    data = {"image": [image.astype(np.float32) / 255.0 for image in images], "label": [int(names[y]) for y in labels]}
    hf.Dataset.from_dict(data).save_to_disk(str(tmp_path / "ds"))
    splits = dataset(tmp_path / "ds", image_size=8, channels=1, test_fraction=0.5).load(seed=0)
    assert splits.task.class_names == ("2", "7", "10")  # sorted by value, then written as text
    known = {image.tobytes() for image in images}
    assert all(image[..., 0].tobytes() in known for image in splits.test.images)


def test_string_labels_are_sorted(tmp_path):
    images, labels = digits_rows()
    data = {"image": images, "label": [["cat", "ant", "bee"][y] for y in labels]}
    hf.Dataset.from_dict(data, features=hf.Features({"image": hf.Image(), "label": hf.Value("string")})).save_to_disk(
        str(tmp_path / "ds")
    )
    splits = dataset(tmp_path / "ds").load(seed=0)
    assert splits.task.class_names == ("ant", "bee", "cat")
    assert "a photo of a cat" in [c for part in everything(splits) for c in part.captions]


def test_undecodable_row_is_named(tmp_path):
    images, labels = digits_rows()
    rows = list(images)
    rows[7] = {"bytes": b"not a png at all", "path": None}
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=NAMES)})
    hf.Dataset.from_dict({"image": rows, "label": labels}, features=features).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"cannot decode the image in row 7 of column 'image'"):
        dataset(tmp_path / "ds").load(seed=0)


def test_bad_array_row_is_named(tmp_path):
    images, labels = digits_rows()
    arrays = [image.astype(np.int32) for image in images]
    arrays[3] = arrays[3] + 1000
    hf.Dataset.from_dict({"image": arrays, "label": labels}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"row 3 .*expected 0\.\.255"):
        dataset(tmp_path / "ds").load(seed=0)


def test_single_class_is_rejected(tmp_path):
    with pytest.raises(DataError, match="at least two classes"):
        dataset(save_digits(tmp_path / "ds", classes=1)).load(seed=0)


def test_max_samples_is_stratified_and_deterministic(tmp_path):
    images, labels = digits_rows(per_class=20)
    keep = [i for i, y in enumerate(labels) if y != 2 or i % 2 == 0]  # 20, 20, 10 rows
    data = {"image": [images[i] for i in keep], "label": [labels[i] for i in keep]}
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=NAMES)})
    hf.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "ds"))
    first = dataset(tmp_path / "ds", max_samples=25, image_size=8).load(seed=0)
    labels_used = np.concatenate([part.labels for part in everything(first)])
    assert np.bincount(labels_used).tolist() == [10, 10, 5]
    second = dataset(tmp_path / "ds", max_samples=25, image_size=8).load(seed=1)
    assert pixels(first) == pixels(second)


def test_folder_not_written_by_save_to_disk(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"cannot load .*plain with datasets\.load_from_disk"):
        dataset(tmp_path / "plain").load(seed=0)


def test_config_checks():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="path does not exist"):
        HFDiskConfig.model_validate({"path": "/no/such/folder/anywhere"})
    with pytest.raises(ValidationError):
        HFDiskConfig.model_validate({"path": ".", "channels": 2})


def test_class_names_without_loading_images(tmp_path, monkeypatch):
    labelled = dataset(save_digits(tmp_path / "labelled"))
    images, labels = digits_rows(per_class=4)
    words = [["seven", "apple", "kiwi"][y] for y in labels]
    hf.Dataset.from_dict({"image": images, "label": words}, features=hf.Features(
        {"image": hf.Image(), "label": hf.Value("string")})).save_to_disk(str(tmp_path / "plain"))  # fmt: skip
    plain = dataset(tmp_path / "plain", image_size=8, channels=1)
    monkeypatch.setattr(HFDiskDataset, "_images", lambda *a: pytest.fail("class_names() decoded images"))
    assert labelled.class_names() == ("zero", "one", "two")
    assert plain.class_names() == ("apple", "kiwi", "seven")  # sorted values, as load() gives them
    with pytest.raises(DataError, match="column 'kind' not found"):
        dataset(tmp_path / "plain", label_column="kind").class_names()


def test_module_import_does_not_import_datasets():
    code = (
        "import sys, fedmmkt_plugins.datasets.hf_disk; "
        "assert 'datasets' not in sys.modules and 'PIL' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class TestHFDiskConformance(DatasetTests):
    name = "hf-disk"

    @pytest.fixture(autouse=True)
    def _dataset(self, tmp_path, monkeypatch):
        type(self).params = {"path": str(save_digits(tmp_path / "ds")), "image_size": 8, "channels": 1}
        real = get_registry()
        if self.name in real.names("dataset"):
            assert real.get("dataset", self.name).cls is HFDiskDataset
            return
        registry = Registry()  # not in plugins/__init__.py yet: a private registry, the global one untouched
        for registration in real:
            registry.add(registration)
        registry.add(Registration("dataset", self.name, HFDiskDataset, "fedmmkt", "test"))
        monkeypatch.setattr(fedmmkt_core.testing.base, "get_registry", lambda refresh=False: registry)
