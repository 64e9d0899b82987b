"""The trust boundary in code: what an algorithm (server side) can reach holds no client training data,
and the client side holds only its own share."""

from __future__ import annotations

import numpy as np
import pytest
from fedmmkt_plugins.algorithm_local import LocalOnly
from test_fedmmkt import RECIPE

from fedmmkt_core.client import ClientFactory
from fedmmkt_core.context import ServerContext
from fedmmkt_core.errors import UserError
from fedmmkt_core.hookspecs import hookimpl
from fedmmkt_core.loading import load_data
from fedmmkt_core.plugins import PluginManager
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.runner import Runner

seen: list[ServerContext] = []


class SnoopingAlgorithm(LocalOnly):
    """A server-side algorithm that keeps the context it is handed, to see what it could read."""

    def setup(self, ctx: ServerContext) -> None:
        seen.append(ctx)


def reachable_arrays(root: object, limit: int = 20_000) -> list[np.ndarray]:
    """Every numpy array reachable from ``root`` through public attributes, mappings and sequences."""
    found, stack, visited = [], [root], set()
    while stack and len(visited) < limit:
        node = stack.pop()
        if id(node) in visited or isinstance(node, (str, bytes, int, float, bool, type(None), type)):
            continue
        visited.add(id(node))
        if isinstance(node, np.ndarray):
            found.append(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend(node)
        elif hasattr(node, "__dict__") or hasattr(type(node), "__dataclass_fields__"):
            skip = ("model_fields", "model_computed_fields")  # deprecated on instances
            names = [n for n in dir(node) if not n.startswith("_") and n not in skip]
            for name in names:
                try:
                    value = getattr(node, name)
                except Exception:
                    continue
                if not callable(value) or isinstance(value, np.ndarray):
                    stack.append(value)
    return found


def test_an_algorithm_cannot_reach_client_training_data(tmp_path):
    class Snoop:
        @hookimpl
        def register_algorithms(self, register):
            register("snoop", SnoopingAlgorithm)

    registry = PluginManager().add_plugin(Snoop(), package="test-snoop")
    recipe_text = RECIPE.replace(
        "algorithm: {name: fedmmkt, params: {samples_per_class: 4, eval_samples_per_class: 4}}",
        "algorithm: {name: snoop}",
    ).replace("rounds: 2", "rounds: 1")
    recipe = parse_recipe(recipe_text, registry=registry)
    seen.clear()
    Runner(recipe, tmp_path / "run").run()
    (ctx,) = seen
    splits, _ = load_data(recipe)
    private = {img.tobytes() for img in splits.train.images}
    shared = {img.tobytes() for s in (splits.test, splits.oracle, splits.public) for img in s.images}
    private -= shared  # identical 8x8 digits can occur in two splits
    assert len(private) > 500

    def leaked(root: object) -> int:
        images = [a for a in reachable_arrays(root) if a.dtype == np.uint8 and a.ndim == 4]
        return sum(img.tobytes() in private for array in images for img in array)

    assert leaked(ctx) == 0
    assert leaked({"control": [splits]}) > 500  # the walk does find training images where they are
    assert not hasattr(ctx, "splits") and not hasattr(ctx, "partitions") and not hasattr(ctx, "client_runtime")
    assert len(ctx.data.evaluation) == len(splits.test)


def test_the_client_factory_holds_only_that_clients_share():
    recipe = parse_recipe(RECIPE)
    splits, partitions = load_data(recipe)
    factory = ClientFactory(recipe)
    for client_id in range(recipe.num_clients):
        runtime = factory.build(client_id)
        np.testing.assert_array_equal(runtime.train.images, splits.train.images[partitions[client_id]])
        np.testing.assert_array_equal(runtime.test.images, splits.test.images)
    other = recipe.model_copy(deep=True)
    assert len(factory.build(0).train) != len(splits.train) and other.num_clients == 3


def test_clients_can_be_evaluated_on_the_validation_split_carved_from_their_side():
    text = RECIPE.replace("  partitioner:", "  evaluate_on: validation\n  partitioner:")
    with pytest.raises(UserError, match="no validation split"):
        ClientFactory(parse_recipe(text)).build(0)
    recipe = parse_recipe(text.replace("public_fraction: 0.2,", "public_fraction: 0.2, validation_fraction: 0.1,"))
    splits, partitions = load_data(recipe)
    assert splits.validation is not None and len(splits.validation) > 100
    train = {img.tobytes() for img in splits.train.images}
    test = {img.tobytes() for img in splits.test.images}
    validation = [img.tobytes() for img in splits.validation.images]
    assert sum(v in train for v in validation) < 5 and sum(v in test for v in validation) < 5  # disjoint but duplicates
    runtime = ClientFactory(recipe).build(0)
    np.testing.assert_array_equal(runtime.test.images, splits.validation.images)
    np.testing.assert_array_equal(runtime.train.images, splits.train.images[partitions[0]])


def test_the_protocol_splits_are_disjoint_and_cover_the_dataset():
    """Train / test / oracle / public / validation never share a sample: every image carries its index."""
    from fedmmkt_core.data import ImageSet, TaskSpec
    from fedmmkt_core.splits import SplitConfig, protocol_splits

    count = 1000
    images = np.zeros((count, 8, 8, 1), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(count) % 256, np.arange(count) // 256
    labels = np.arange(count) % 10
    task = TaskSpec(tuple(str(c) for c in range(10)), image_size=8, channels=1)
    config = SplitConfig(test_fraction=0.2, oracle_fraction=0.15, public_fraction=0.1, validation_fraction=0.1)
    splits = protocol_splits(ImageSet(images, labels), task, config, seed=3)
    parts = [splits.train, splits.test, splits.oracle, splits.public, splits.validation]
    ids = [set((p.images[:, 0, 0, 0].astype(int) + 256 * p.images[:, 0, 1, 0].astype(int)).tolist()) for p in parts]
    assert all(len(i) == len(p) for i, p in zip(ids, parts, strict=True))  # no sample twice within a split
    assert sum(len(i) for i in ids) == count and set().union(*ids) == set(range(count))  # disjoint, complete
    assert [len(p) for p in parts] == [450, 200, 150, 100, 100]
