"""The imagefolder dataset on real digits written as PNG files, and its errors naming the file."""

import json

import numpy as np
import pytest
from fedmmkt_plugins.datasets.imagefolder import ImageFolderConfig, ImageFolderDataset
from PIL import Image

from fedmmkt_core.errors import DataError
from fedmmkt_core.testing import DatasetTests, digits_sample


def write_folder(root, per_class=12, classes=3):
    data, _ = digits_sample(600)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        for i, image in enumerate(data.images[data.labels == label][:per_class]):
            Image.fromarray(image[..., 0]).save(folder / f"{i:03d}.png")
    return root


def dataset(root, **params):
    return ImageFolderDataset(ImageFolderConfig.model_validate({"root": str(root), **params}))


def test_loads_classes_captions_and_splits(tmp_path):
    root = write_folder(tmp_path / "imgs")
    (root / "captions.jsonl").write_text(json.dumps({"file": "class_1/000.png", "caption": "a thin one"}) + "\n")
    splits = dataset(root, image_size=8, channels=1).load(seed=0)
    assert splits.task.class_names == ("class_0", "class_1", "class_2")
    total = len(splits.train) + len(splits.test) + (len(splits.oracle) if splits.oracle else 0)
    assert total == 36
    assert splits.train.images.shape[1:] == (8, 8, 1) and splits.train.images.dtype == np.uint8
    everything = splits.train.captions + splits.test.captions + (splits.oracle.captions if splits.oracle else [])
    assert "a thin one" in everything and "a photo of a class_2" in everything


def test_rgb_resize(tmp_path):
    splits = dataset(write_folder(tmp_path / "imgs"), image_size=16, channels=3).load(seed=0)
    assert splits.test.images.shape[1:] == (16, 16, 3)


def test_corrupt_image_is_named(tmp_path):
    root = write_folder(tmp_path / "imgs")
    (root / "class_2" / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot read image .*class_2/bad\.png"):
        dataset(root).load(seed=0)


def test_empty_class_folder_is_named(tmp_path):
    root = write_folder(tmp_path / "imgs")
    (root / "class_9").mkdir()
    with pytest.raises(DataError, match=r"class folder .*class_9 has no images"):
        dataset(root).load(seed=0)


def test_bad_captions_line_is_named(tmp_path):
    root = write_folder(tmp_path / "imgs")
    (root / "captions.jsonl").write_text(
        '{"file": "class_0/000.png", "caption": "ok"}\n{"file": "nope.png", "caption": "x"}\n'
    )
    with pytest.raises(DataError, match=r"captions\.jsonl:2: no image 'nope.png'"):
        dataset(root).load(seed=0)


def test_single_class_is_rejected(tmp_path):
    root = write_folder(tmp_path / "imgs", classes=1)
    with pytest.raises(DataError, match="at least two class"):
        dataset(root).load(seed=0)


class TestImageFolderConformance(DatasetTests):
    name = "imagefolder"

    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path):
        type(self).params = {"root": str(write_folder(tmp_path / "imgs")), "image_size": 8, "channels": 1}
