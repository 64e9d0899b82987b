"""The trust boundary in code: what an algorithm (server side) can reach holds no client training data,
and the client side holds only its own share."""

from __future__ import annotations

import collections
import functools
import pathlib
import types
import weakref

import numpy as np
import pytest
from fedmmkt_plugins.algorithms.local import LocalOnly
from test_fedmmkt import RECIPE

from fedmmkt_core.client import ClientFactory
from fedmmkt_core.errors import UserError
from fedmmkt_core.hookspecs import hookimpl
from fedmmkt_core.interfaces import Logger
from fedmmkt_core.loading import load_data
from fedmmkt_core.plugins import PluginManager
from fedmmkt_core.recipe import parse_recipe
from fedmmkt_core.server.context import ServerContext
from fedmmkt_core.server.runner import Runner

seen: list[ServerContext] = []


class SnoopingAlgorithm(LocalOnly):
    """A server-side algorithm that keeps the context it is handed, to see what it could read."""

    def setup(self, ctx: ServerContext) -> None:
        seen.append(ctx)


# What the walker does not enter: values with nothing inside (a path is a string: its properties only
# build more paths), classes and modules (from a module every module is reachable, so walking one
# proves nothing about what the context holds), code.
LEAVES = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    bool,
    type(None),
    pathlib.PurePath,
    type,
    types.ModuleType,
    types.CodeType,
)


def reachable_arrays(root: object, limit: int = 400_000) -> tuple[list[np.ndarray], bool]:
    """Every numpy array (and uint8 torch tensor, as an array) reachable from ``root``, and whether the
    walk finished within ``limit`` objects.

    It follows everything an object holds: instance attributes, private ones included, slots, the public
    properties of the project's classes, the items (and keys) of mappings and sequences, a function's closure cells and
    defaults, a bound method's object, a partial's function and arguments, a weak reference's referent.
    It does not follow module globals, class attributes or the interpreter's registries (``gc``, frames):
    code that imports a module can reach anything in its process, which is why the in-process
    backend's separation is against what server code is *handed*, and a process boundary (Flower) is
    the separation against code that imports."""
    import torch

    found: list[np.ndarray] = []
    stack: list[object] = [root]
    visited: set[int] = set()
    alive: list[object] = []  # properties may build new objects: keep them so that no id is reused
    while stack:
        if len(visited) >= limit:
            return found, False
        node = stack.pop()
        if isinstance(node, LEAVES) or id(node) in visited:
            continue
        visited.add(id(node))
        alive.append(node)
        if isinstance(node, np.ndarray):
            found.append(node)
        elif isinstance(node, torch.Tensor):
            if node.dtype == torch.uint8:
                found.append(node.detach().cpu().numpy())
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set, frozenset, collections.deque)):
            stack.extend(node)
        elif isinstance(node, types.FunctionType):
            stack.extend(cell.cell_contents for cell in node.__closure__ or () if _filled(cell))
            stack.extend([node.__defaults__, node.__kwdefaults__])
        elif isinstance(node, types.MethodType):
            stack.extend([node.__self__, node.__func__])
        elif isinstance(node, functools.partial):
            stack.extend([node.func, node.args, node.keywords])
        elif isinstance(node, weakref.ref):
            stack.append(node())
        else:
            stack.extend(_held(node))
    return found, True


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


def _held(node: object) -> list[object]:
    """What an object holds: its ``__dict__`` (every name), its slots and, for the project's own classes
    (whose properties could hand out what the object does not hold), its public non-callable attributes."""
    held: list[object] = []
    try:
        held.extend(vars(node).values())
    except TypeError:
        pass
    for cls in type(node).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in [slots] if isinstance(slots, str) else slots:
            try:
                held.append(getattr(node, name))
            except Exception:
                continue
    if not type(node).__module__.startswith(("fedmmkt", "test")):
        return held  # a library's properties (rich's styles...) compute new objects without end
    skip = ("model_fields", "model_computed_fields")  # deprecated on pydantic instances
    for name in dir(node):
        if name.startswith("_") or name in skip:
            continue
        try:
            value = getattr(node, name)
        except Exception:
            continue
        if not callable(value) or isinstance(value, np.ndarray):
            held.append(value)
    return held


def private_training_images(recipe) -> set[bytes]:
    """The clients' training images that are in no split the server holds (identical 8x8 digits can
    occur in two splits)."""
    splits, _ = load_data(recipe)
    private = {img.tobytes() for img in splits.train.images}
    shared = {img.tobytes() for s in (splits.test, splits.oracle, splits.public) for img in s.images}
    return private - shared


def leaked(root: object, private: set[bytes]) -> int:
    """How many of the clients' training images (counted with repeats) a walk from ``root`` finds; the
    walk must finish, so that 0 means "none reachable", not "not looked at"."""
    arrays, complete = reachable_arrays(root)
    assert complete, "the walk stopped at its limit"
    images = [a for a in arrays if a.dtype == np.uint8 and a.ndim == 4]
    return sum(img.tobytes() in private for array in images for img in array)


def snoop_registry(**algorithms: type) -> PluginManager:
    class Snoop:
        @hookimpl
        def register_algorithms(self, register):
            for name, cls in algorithms.items():
                register(name, cls)

        @hookimpl
        def register_loggers(self, register):
            register("snoop", SnoopingLogger)

    return PluginManager().add_plugin(Snoop(), package="test-snoop")


def test_an_algorithm_cannot_reach_client_training_data(tmp_path):
    registry = snoop_registry(snoop=SnoopingAlgorithm)
    recipe_text = RECIPE.replace(
        "algorithm: {name: fedmmkt, params: {samples_per_class: 4, eval_samples_per_class: 4}}",
        "algorithm: {name: snoop}",
    ).replace("rounds: 2", "rounds: 1")
    recipe = parse_recipe(recipe_text, registry=registry)
    seen.clear()
    Runner(recipe, tmp_path / "run").run()
    (ctx,) = seen
    splits, _ = load_data(recipe)
    private = private_training_images(recipe)
    assert len(private) > 500
    assert leaked(ctx, private) == 0
    assert leaked({"control": [splits]}, private) > 500  # the walk does find training images where they are
    assert not hasattr(ctx, "splits") and not hasattr(ctx, "partitions") and not hasattr(ctx, "client_runtime")
    assert not hasattr(ctx, "backend")  # server code reaches clients by messages only
    assert len(ctx.data.evaluation) == len(splits.test)


mid_round: list[dict[str, int]] = []
logger_walks: list[int] = []


class SnoopingLogger(Logger):
    """A logger that walks everything it holds, and what it is handed, whenever it is called."""

    def start(self, run_dir, resolved_recipe) -> None:
        logger_walks.append(leaked([self, run_dir, resolved_recipe], PRIVATE[0]))

    def log_round(self, round_index, metrics) -> None:
        logger_walks.append(leaked([self, round_index, metrics], PRIVATE[0]))

    def finish(self, summary) -> None:
        logger_walks.append(leaked([self, summary], PRIVATE[0]))


PRIVATE: list[set[bytes]] = []
RUNNERS: list[Runner] = []


class WalkingAlgorithm(LocalOnly):
    """Walks the context it was handed, every logger of the run and (as the control) the in-process
    backend's client side, in the middle of each round: after the clients trained and are resident,
    before they are evaluated."""

    def run_round(self, ctx: ServerContext, round_index: int) -> dict:
        from fedmmkt_plugins.backends import inprocess as backend_inprocess

        metrics = super().run_round(ctx, round_index)
        sides = dict(backend_inprocess._CLIENT_SIDES)
        (side,) = sides.values()  # this run's clients, reached by importing the backend's module
        mid_round.append(
            {
                "context": leaked(ctx, PRIVATE[0]),
                "loggers": sum(leaked(logger, PRIVATE[0]) for _, _, logger in RUNNERS[0].loggers),
                "resident": len(side.resident),
                "control": leaked(side.resident, PRIVATE[0]),
                # and it finds them behind a private attribute or in a closure
                "control_private": leaked(types.SimpleNamespace(_hidden=side), PRIVATE[0]),
                "control_closure": leaked(lambda: side, PRIVATE[0]),
            }
        )
        return metrics


def test_nothing_reachable_from_the_context_or_a_logger_holds_client_data_during_a_round(tmp_path):
    """Issue 23: with every client kept built (``resident_clients: 3``), a walk of everything reachable
    from the ServerContext, in the middle of a round, and of every logger finds none of the clients'
    training images; the same walk of the backend's private client registry finds them."""
    registry = snoop_registry(walker=WalkingAlgorithm)
    recipe_text = RECIPE.replace(
        "algorithm: {name: fedmmkt, params: {samples_per_class: 4, eval_samples_per_class: 4}}",
        "algorithm: {name: walker}\nbackend: {name: inprocess, params: {resident_clients: 3}}",
    ).replace("loggers: []", "loggers: [{name: snoop}, {name: csv}, {name: console}]")
    recipe = parse_recipe(recipe_text, registry=registry)
    PRIVATE[:] = [private_training_images(recipe)]
    assert len(PRIVATE[0]) > 500
    mid_round.clear()
    logger_walks.clear()
    runner = Runner(recipe, tmp_path / "run")
    RUNNERS[:] = [runner]
    try:
        runner.run()
    finally:
        RUNNERS.clear()
    assert len(mid_round) == 2  # both rounds walked
    for walk in mid_round:
        assert walk["resident"] == 3  # every client built and in memory while the context was walked
        assert walk["context"] == 0 and walk["loggers"] == 0
        assert walk["control"] > 500  # the walk finds the training images where they are
        assert walk["control_private"] > 500 and walk["control_closure"] > 500
    assert logger_walks == [0, 0, 0, 0]  # start, two rounds, finish


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
