"""data.public's classes are matched to the clients' by name, whatever their order: an imagefolder whose
class folders are the digits' names (sorted alphabetically: eight, five, four, nine, one, ...) is the
server's public data for `digits`, its labels renumbered to the digits' order."""

import numpy as np
import pytest
from fedmmkt_cli.main import app
from fedmmkt_plugins.datasets.digits import DIGIT_NAMES
from fedmmkt_plugins.datasets.imagefolder import ImageFolderDataset
from PIL import Image
from typer.testing import CliRunner

from fedmmkt_core.data import class_index_map
from fedmmkt_core.errors import DataError, RecipeError
from fedmmkt_core.loading import load_server_data
from fedmmkt_core.recipe import parse_recipe

RECIPE = """\
fedmmkt: 1
name: public-by-name
seed: 0
data:
  dataset: {{name: digits}}
  partitioner: {{name: iid}}
  public: {{name: imagefolder, params: {{root: '{root}', image_size: 8, channels: 1, oracle_fraction: 0.0}}}}
clients:
  - {{name: cnn, count: 2}}
federation: {{rounds: 1}}
algorithm: {{name: local}}
loggers: []
"""


def write_words(root, names, per_class=3, corrupt=False):
    """One folder per class word; image i of digit d is filled with the grey level 20 * d + i."""
    for name in names:
        folder = root / name
        folder.mkdir(parents=True)
        digit = DIGIT_NAMES.index(name) if name in DIGIT_NAMES else 12
        for i in range(per_class):
            if corrupt:  # validate must not read it
                (folder / f"{i}.png").write_bytes(b"not a png")
            else:
                Image.fromarray(np.full((8, 8), 20 * digit + i, np.uint8)).save(folder / f"{i}.png")
    return root


def test_an_imagefolder_named_by_class_words_is_digits_public_data_with_labels_in_digits_order(tmp_path):
    root = write_words(tmp_path / "words", DIGIT_NAMES)
    listed = ImageFolderDataset(ImageFolderDataset.Config.model_validate({"root": str(root)})).class_names()
    assert listed[:5] == ("eight", "five", "four", "nine", "one")  # the folders' own order differs
    data = load_server_data(parse_recipe(RECIPE.format(root=root)))
    public = data.public
    assert len(public) == 30
    grey = public.images[:, 0, 0, 0].astype(int)
    assert sorted(grey.tolist()) == sorted(20 * d + i for d in range(10) for i in range(3))  # every image once
    # by hand: the images from folders eight (alphabetically first), zero (last), three and one
    for level, digit in ((160, 8), (161, 8), (0, 0), (62, 3), (21, 1)):
        assert public.labels[grey == level].tolist() == [digit], level
    np.testing.assert_array_equal(public.labels, grey // 20)  # every image: the digit its folder names
    assert data.task.class_names == DIGIT_NAMES  # the clients' task is untouched
    result = CliRunner().invoke(app, ["validate", str(_recipe_file(tmp_path, root))])
    assert result.exit_code == 0, result.output


def _recipe_file(tmp_path, root):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(root=root))
    return path


def test_a_missing_or_extra_class_is_an_error_naming_them(tmp_path, monkeypatch):
    names = [n for n in DIGIT_NAMES if n != "three"] + ["tres"]
    root = write_words(tmp_path / "words", names, corrupt=True)  # validate lists folders, reads no image
    result = CliRunner().invoke(app, ["validate", str(_recipe_file(tmp_path, root))], terminal_width=300)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "data.public" in text and "missing ['three']" in text and "extra ['tres']" in text, text
    assert "cannot read image" not in text
    with pytest.raises(RecipeError, match=r"missing \['three'\], extra \['tres'\]"):
        parse_recipe(RECIPE.format(root=root))
    # a dataset that cannot list its classes without loading: the same error when the run loads it
    monkeypatch.setattr(ImageFolderDataset, "class_names", lambda self: None)
    root = write_words(tmp_path / "loaded", names)
    recipe = parse_recipe(RECIPE.format(root=root))
    with pytest.raises(
        DataError, match=r"data.public \('imagefolder'\) has classes .*missing \['three'\], extra \['tres'\]"
    ):
        load_server_data(recipe)


def test_class_index_map_by_hand():
    np.testing.assert_array_equal(class_index_map(["b", "c", "a"], ["a", "b", "c"], "x"), [1, 2, 0])
    with pytest.raises(DataError, match=r"x has classes \['a', 'a', 'b'\].*missing \['c'\], repeated \['a'\]"):
        class_index_map(["a", "a", "b"], ["a", "b", "c"], "x")


def test_class_names_listed_without_loading_are_the_loaded_ones(tmp_path):
    from fedmmkt_plugins.datasets.digits import DigitsDataset
    from fedmmkt_plugins.datasets.typeset_digits import TypesetDigitsDataset

    root = write_words(tmp_path / "words", ["two", "one", "nine"])
    folder = ImageFolderDataset(ImageFolderDataset.Config.model_validate({"root": str(root), "image_size": 8}))
    typeset = TypesetDigitsDataset(TypesetDigitsDataset.Config.model_validate({"per_class": 3}))
    for dataset in (folder, DigitsDataset(), typeset):
        assert dataset.class_names() == dataset.load(seed=0).task.class_names
