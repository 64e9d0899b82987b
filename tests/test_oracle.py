"""The evaluation oracle on real digits: accurate, cached, and its CAS / Fréchet distance behave."""

import numpy as np
import pytest
from fedmmkt_plugins.datasets.digits import DigitsConfig, DigitsDataset
from fedmmkt_plugins.evaluation.oracle import EvaluationOracle, frechet_distance

from fedmmkt_core.errors import DataError


@pytest.fixture(scope="module")
def splits():
    return DigitsDataset(DigitsConfig(oracle_fraction=0.2)).load(seed=0)


def test_oracle_is_accurate_cached_and_scores_images(splits, tmp_path):
    oracle = EvaluationOracle(splits.oracle, splits.task, tmp_path, seed=0)
    assert not oracle.from_cache and oracle.cache_path.is_file()
    accuracy = oracle.accuracy(splits.test)
    assert accuracy > 0.85
    assert oracle.cas(splits.test.images, splits.test.labels) == pytest.approx(accuracy)
    assert oracle.cas(splits.test.images, (splits.test.labels + 1) % 10) < 0.1  # wrong prompts
    again = EvaluationOracle(splits.oracle, splits.task, tmp_path, seed=0)
    assert again.from_cache
    np.testing.assert_array_equal(again.predict(splits.test.images), oracle.predict(splits.test.images))

    noise = np.random.default_rng(0).integers(0, 256, size=splits.test.images.shape, dtype=np.uint8)
    real = oracle.frechet_distance(splits.train.images[:300], splits.test.images)
    fake = oracle.frechet_distance(noise, splits.test.images)
    assert real < fake


def test_oracle_trained_under_other_conditions_is_not_reused(splits, tmp_path, monkeypatch):
    from fedmmkt_plugins.evaluation import oracle as module

    first = EvaluationOracle(splits.oracle, splits.task, tmp_path, seed=0, epochs=1)
    conditions = module.build_conditions("cpu")
    monkeypatch.setattr(module, "build_conditions", lambda device: {**conditions, "cpu": "another instruction set"})
    other = EvaluationOracle(splits.oracle, splits.task, tmp_path, seed=0, epochs=1)
    assert not other.from_cache and other.cache_path != first.cache_path


def test_frechet_distance_by_hand():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 2))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # identical covariances, means 3 apart on one axis: distance = 9
    assert frechet_distance(a, a + np.array([3.0, 0.0])) == pytest.approx(9.0, abs=1e-6)
    # N(0, I) vs N(0, 4I) in 2-D: Tr(I + 4I - 2*2I) = 2
    assert frechet_distance(rng.normal(size=(200000, 2)), 2 * rng.normal(size=(200000, 2))) == pytest.approx(
        2.0, abs=0.05
    )


def test_no_oracle_split_is_a_clear_error(splits, tmp_path):
    with pytest.raises(DataError, match="oracle_fraction"):
        EvaluationOracle(None, splits.task, tmp_path, seed=0)


def test_selection_and_report_oracles_split_the_oracle_data_class_by_class():
    from fedmmkt_plugins.evaluation.oracle import oracle_half

    from fedmmkt_core.data import ImageSet

    labels = np.array([0, 1, 0, 1, 0, 1, 2])
    images = np.arange(7, dtype=np.uint8).repeat(4).reshape(7, 2, 2, 1)
    split = ImageSet(images, labels)
    selection, report = oracle_half(split, "selection"), oracle_half(split, "report")
    assert selection.images[:, 0, 0, 0].tolist() == [0, 1, 4, 5, 6]  # 1st and 3rd of each class
    assert report.images[:, 0, 0, 0].tolist() == [2, 3]  # the 2nd
    assert sorted(selection.images[:, 0, 0, 0].tolist() + report.images[:, 0, 0, 0].tolist()) == list(range(7))
    with pytest.raises(ValueError):
        oracle_half(split, "test")
