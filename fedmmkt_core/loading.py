"""Loading a recipe's data, split by side of the trust boundary.

:func:`load_server_data` gives the server what it may hold (task, evaluation split, oracle split, its
own public data); only the client side (:class:`fedmmkt_core.client.ClientFactory`) ever cuts out a
client's training partition. Both are deterministic for one recipe seed, on every machine.
"""

from __future__ import annotations

import numpy as np

from .data import DataSplits, ImageSet, ServerData, class_index_map, concatenate_sets
from .errors import UserError
from .interfaces import Dataset, Partitioner
from .recipe import Recipe
from .seeding import derive_seed
from .server_folder import read_server_folder


def load_splits(recipe: Recipe) -> DataSplits:
    """The clients' dataset cut into the protocol's splits, with ``data.public`` as the public split."""
    dataset = recipe.build("dataset", recipe.data.dataset)
    assert isinstance(dataset, Dataset)
    splits = dataset.load(seed=recipe.seed)
    if recipe.data.public is not None:
        splits.public = load_public(recipe, splits.task.class_names)
    return splits


def load_public(recipe: Recipe, class_names: tuple[str, ...]) -> ImageSet:
    """Every image of the ``data.public`` dataset (all of its splits): the server's pre-training data."""
    assert recipe.data.public is not None
    dataset = recipe.build("dataset", recipe.data.public)
    assert isinstance(dataset, Dataset)
    public = dataset.load(seed=derive_seed(recipe.seed, "public"))
    # classes matched by name: labels renumbered to the clients' order (an imagefolder's are sorted by name)
    mapping = class_index_map(public.task.class_names, class_names, f"data.public ('{recipe.data.public.name}')")
    parts = [s for s in (public.train, public.test, public.oracle, public.public, public.validation) if s is not None]
    joined = concatenate_sets([s for s in parts if len(s)])
    return ImageSet(joined.images, mapping[joined.labels], joined.captions)


def partition(recipe: Recipe, labels: np.ndarray) -> list[np.ndarray]:
    """Indices of each client's share of the training split (the recipe's partitioner and seed)."""
    partitioner = recipe.build("partitioner", recipe.data.partitioner)
    assert isinstance(partitioner, Partitioner)
    rng = np.random.default_rng(derive_seed(recipe.seed, "partition"))
    return partitioner.checked_partition(labels, recipe.num_clients, rng)


def load_data(recipe: Recipe) -> tuple[DataSplits, list[np.ndarray]]:
    """Every split and the partition: for simulations and benchmarks that play every side at once."""
    splits = load_splits(recipe)
    return splits, partition(recipe, splits.train.labels)


def evaluation_split(recipe: Recipe, splits: DataSplits) -> ImageSet:
    """The split clients are evaluated on (``data.evaluate_on``)."""
    if recipe.data.evaluate_on == "test":
        return splits.test
    if splits.validation is None:
        raise UserError(
            "data.evaluate_on is 'validation' but the dataset has no validation split: set "
            "data.dataset.params.validation_fraction above 0"
        )
    return splits.validation


def load_server_data(recipe: Recipe) -> ServerData:
    """What the server holds: no client training data, no partition. With ``data.server_folder`` read from
    that folder alone (the dataset is never loaded); else cut from the recipe's dataset."""
    if recipe.data.server_folder is not None:
        return read_server_folder(recipe.data.server_folder, recipe.data.evaluate_on)
    return cut_server_data(recipe)


def cut_server_data(recipe: Recipe) -> ServerData:
    """The server's splits cut from the recipe's dataset (what ``fedmmkt partition`` writes to OUT/server)."""
    splits = load_splits(recipe)
    return ServerData(splits.task, evaluation_split(recipe, splits), splits.oracle, splits.public)
