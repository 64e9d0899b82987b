"""The plugin author's contract: the generated reference, the conformance suites' failure output and
set-up errors, the transformers wrapper and FedMMKT's variant hooks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fedmmkt_cli.reference import COMMAND, generate

from fedmmkt_core.errors import RecipeError
from fedmmkt_core.testing import AlgorithmTests
from fedmmkt_core.testing.runs import TINY_GENERATOR_RECIPE, run_tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_reference_page_is_generated_from_the_code():
    page = ROOT / "docs" / "reference.md"
    assert page.read_text() == generate(), f"docs/reference.md is out of date: regenerate it with `{COMMAND}`"


def test_reference_page_covers_every_hook_and_kind():
    from fedmmkt_core.hookspecs import HOOK_KINDS
    from fedmmkt_core.interfaces import KINDS

    page = generate()
    for hook in HOOK_KINDS:
        assert f"`{hook}(register)`" in page
    for cls in KINDS.values():
        assert f"### `fedmmkt_core.interfaces.{cls.__name__}`" in page
    for method in ("ServerContext.exchange(", "ServerContext.seed_for(", "FedMMKT.distill_targets("):
        assert method in page
    assert "ClientModel.fit(train: ImageSet, distill: DistillSet | None, seed: int) -> dict[str, float]" in page


BROKEN_PLUGIN = """\
import numpy as np
from fedmmkt_core.hookspecs import hookimpl
from fedmmkt_core.interfaces import Aggregator


class FourColumns(Aggregator):
    def aggregate(self, round_index, replies):
        return np.full((6, 4), 0.25)  # the suite's replies have 3 classes


@hookimpl
def register_aggregators(register):
    register("four-columns", FourColumns)
"""

BROKEN_TEST = """\
from fedmmkt_core.testing import AggregatorTests


class TestFourColumns(AggregatorTests):
    name = "four-columns"
"""


def _pytest_on_broken_plugin(tmp_path: Path, *options: str) -> str:
    (tmp_path / "broken_plugin.py").write_text(BROKEN_PLUGIN)
    (tmp_path / "test_broken.py").write_text(BROKEN_TEST)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    env.update(FEDMMKT_PLUGINS="broken_plugin", PYTHONPATH=str(tmp_path))
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", *options]
    command += ["test_broken.py", "-k", "row_stochastic"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr  # the check fails, nothing else does
    return done.stdout


def test_a_failing_conformance_check_prints_the_values_it_compared(tmp_path):
    # the installed package's pytest11 entry point registers fedmmkt_core.testing for assertion rewriting
    output = _pytest_on_broken_plugin(tmp_path)
    assert "assert (6, 4) == (6, 3)" in output
    # without the plugin the same failure is a bare AssertionError: the entry point is what helps
    bare = _pytest_on_broken_plugin(tmp_path / "", "-p", "no:fedmmkt")
    assert "(6, 4) == (6, 3)" not in bare and "AssertionError" in bare


class _NeedsAGenerator(AlgorithmTests):
    name = "fedmmkt"
    params = {"samples_per_class": 2}


def test_algorithm_tests_default_recipe_gives_a_generator_to_algorithms_that_need_one():
    overrides = _NeedsAGenerator()._overrides()
    assert overrides["algorithm"] == {"name": "fedmmkt", "params": {"samples_per_class": 2}}
    assert overrides["generator"] == TINY_GENERATOR_RECIPE["generator"]

    class Local(AlgorithmTests):
        name = "local"

    assert Local()._overrides() == {"algorithm": {"name": "local", "params": {}}}


def test_an_invalid_algorithm_tests_recipe_names_the_attribute_not_a_line(tmp_path):
    class Broken(_NeedsAGenerator):
        recipe = {"federation.roundz": 2}

    with pytest.raises(RecipeError) as info:
        Broken()._run(tmp_path)
    message = str(info.value)
    assert "Broken.recipe" in message and "AlgorithmTests" in message
    assert "federation.roundz: unknown key" in message
    assert "line 1" not in message

    class Missing(_NeedsAGenerator):
        recipe = {}  # the generator left out on purpose

    with pytest.raises(RecipeError, match=r"Missing\.recipe[\s\S]*generator: algorithm 'fedmmkt' needs a generator"):
        Missing()._run(tmp_path)

    class NotADict(_NeedsAGenerator):
        recipe = [("generator", "sd-lora")]  # type: ignore[assignment]

    with pytest.raises(TypeError, match=r"NotADict\.recipe must be a dict of recipe key paths"):
        NotADict()._overrides()


def test_run_tiny_recipe_errors_leave_out_the_tiny_recipes_lines(tmp_path):
    with pytest.raises(RecipeError) as info:
        run_tiny_recipe(tmp_path, {"algorithm": {"name": "fedmmkt"}})
    assert "line 1" not in str(info.value) and "TINY_RECIPE" in str(info.value)


def test_a_transformers_model_wrapped_by_hf_classifier_module_is_a_client(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fedmmkt_plugins.clients.torch_classifier import TorchClassifier, hf_classifier_module

    from fedmmkt_core.testing import digits_sample

    class ConvNextV2Client(TorchClassifier):  # the CONTRIBUTING example
        def make_network(self, task):
            config = transformers.ConvNextV2Config(
                num_channels=task.channels,
                num_stages=2,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                patch_size=2,
                num_labels=task.num_classes,
            )
            return hf_classifier_module(transformers.ConvNextV2ForImageClassification(config), task)

    data, task = digits_sample(80)
    client = ConvNextV2Client(ConvNextV2Client.Config(epochs=2))
    client.build(task, seed=0)
    assert np.isfinite(client.fit(data, None, seed=0)["loss"])
    assert client.predict_logits(data.images[:5]).shape == (5, task.num_classes)
    weights = client.get_weights()
    assert all(name.startswith("model.convnextv2.") or name.startswith("model.classifier.") for name in weights)
    again = ConvNextV2Client(ConvNextV2Client.Config())
    again.build(task, seed=1)
    again.set_weights(weights)
    np.testing.assert_array_equal(again.predict_logits(data.images[:5]), client.predict_logits(data.images[:5]))


def test_a_fedmmkt_variant_overrides_one_documented_hook():
    from fedmmkt_plugins.algorithms.feddf import FedDF
    from fedmmkt_plugins.algorithms.fedmmkt import FedMMKT

    class HardTargets(FedMMKT):  # the CONTRIBUTING example
        """FedMMKT whose clients distil the ensemble's top class, one-hot (no prompt knowledge)."""

        def distill_targets(self, soft_labels, class_ids, replies):
            one_hot = np.eye(soft_labels.shape[1], dtype=np.float32)[soft_labels.argmax(axis=1)]
            return one_hot, None

    soft = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]], np.float32)
    targets, trusted = HardTargets().distill_targets(soft, np.array([1, 1]), {})
    np.testing.assert_array_equal(targets, [[1, 0, 0], [0, 1, 0]])
    assert trusted is None
    targets, trusted = FedDF().distill_targets(soft, np.array([1, 1]), {})
    np.testing.assert_array_equal(targets, soft)
    assert trusted is None
