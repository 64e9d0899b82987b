"""Suites for components checked on their own: client models, aggregators, partitioners, datasets, loggers."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from ..data import DistillSet, ImageSet, TaskSpec
from ..errors import ClientFailure
from ..interfaces import Aggregator, ClientModel, ClientReply, Dataset, Logger, Partitioner
from .base import _ComponentTests
from .samples import digits_sample


class ClientModelTests(_ComponentTests):
    """A client model builds, predicts, learns on real data, and restores its weights exactly."""

    kind = "client_model"
    train_rounds: ClassVar[int] = 3

    def built(self, seed: int = 0) -> tuple[ClientModel, ImageSet, TaskSpec]:
        data, task = digits_sample()
        model = self.make()
        assert isinstance(model, ClientModel)
        model.build(task, seed=seed)
        return model, data, task

    def test_predict_logits_shape_and_dtype(self) -> None:
        model, data, task = self.built()
        logits = model.predict_logits(data.images[:7])
        assert logits.shape == (7, task.num_classes)
        assert logits.dtype == np.float32
        assert np.isfinite(logits).all()

    def test_training_beats_chance_and_lowers_loss(self) -> None:
        model, data, task = self.built()
        train, held = data.subset(range(200)), data.subset(range(200, 300))
        losses = [model.fit(train, None, seed=r)["loss"] for r in range(self.train_rounds)]
        assert losses[-1] < losses[0]
        accuracy = (model.predict_logits(held.images).argmax(1) == held.labels).mean()
        assert accuracy > 2.0 / task.num_classes

    def test_fit_with_distillation(self) -> None:
        model, data, task = self.built()
        soft = np.full((20, task.num_classes), 1.0 / task.num_classes, dtype=np.float32)
        metrics = model.fit(data.subset(range(50)), DistillSet(data.images[50:70], soft, 1.0, 2.0), seed=0)
        assert np.isfinite(metrics["loss"])

    def test_weights_round_trip_restores_predictions(self) -> None:
        model, data, task = self.built(seed=1)
        model.fit(data.subset(range(100)), None, seed=0)
        other = self.make()
        assert isinstance(other, ClientModel)
        other.build(task, seed=2)
        other.set_weights(model.get_weights())
        np.testing.assert_allclose(other.predict_logits(data.images[:20]), model.predict_logits(data.images[:20]))

    def test_weights_are_numpy_and_mismatch_is_rejected(self) -> None:
        model, _, _ = self.built()
        weights = model.get_weights()
        assert weights and all(isinstance(v, np.ndarray) for v in weights.values())
        with pytest.raises(Exception):  # noqa: B017 - any clear error
            model.set_weights({**weights, "unexpected.tensor": np.zeros(3, dtype=np.float32)})

    def test_same_seed_same_training(self) -> None:
        results = []
        for _ in range(2):
            model, data, _ = self.built(seed=3)
            model.fit(data.subset(range(100)), None, seed=4)
            results.append(model.predict_logits(data.images[:10]))
        np.testing.assert_array_equal(results[0], results[1])


class AggregatorTests(_ComponentTests):
    """An aggregator returns row-stochastic soft labels and refuses malformed replies."""

    kind = "aggregator"

    def replies(self, seed: int = 0, clients: int = 4, samples: int = 6, classes: int = 3) -> list[ClientReply]:
        rng = np.random.default_rng(seed)
        return [
            ClientReply(k, rng.normal(size=(samples, classes)).astype(np.float32), 10 * (k + 1), np.full(classes, 5))
            for k in range(clients)
        ]

    def test_output_is_row_stochastic(self) -> None:
        aggregator = self.make()
        assert isinstance(aggregator, Aggregator)
        q = aggregator.aggregate(0, self.replies())
        assert q.shape == (6, 3)
        assert (q >= 0).all()
        np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)

    def test_identical_clients_agree_with_each_one(self) -> None:
        aggregator = self.make()
        one = self.replies(clients=1)[0]
        copies = [ClientReply(k, one.logits.copy(), 10, np.full(3, 5)) for k in range(3)]
        q = aggregator.aggregate(0, copies)
        assert (q.argmax(axis=1) == one.logits.argmax(axis=1)).all()

    def test_deterministic(self) -> None:
        aggregator = self.make()
        np.testing.assert_array_equal(aggregator.aggregate(1, self.replies()), aggregator.aggregate(1, self.replies()))

    def test_rejects_non_finite_or_misshaped_logits(self) -> None:
        aggregator = self.make()
        bad = self.replies()
        bad[1].logits[0, 0] = np.nan
        with pytest.raises((ClientFailure, ValueError)):
            aggregator.aggregate(0, bad)
        odd = self.replies()
        odd[2] = ClientReply(2, np.zeros((5, 3), dtype=np.float32), 10)
        with pytest.raises((ClientFailure, ValueError)):
            aggregator.aggregate(0, odd)


class PartitionerTests(_ComponentTests):
    """A partitioner gives every client samples, no sample twice, and repeats itself for a seed."""

    kind = "partitioner"

    def test_disjoint_and_non_empty(self) -> None:
        partitioner = self.make()
        assert isinstance(partitioner, Partitioner)
        labels = digits_sample(400)[0].labels
        parts = partitioner.checked_partition(labels, 5, np.random.default_rng(0))
        assert len(parts) == 5
        joined = np.concatenate(parts)
        assert len(np.unique(joined)) == len(joined)
        assert all(len(p) > 0 for p in parts)

    def test_same_seed_same_partition(self) -> None:
        partitioner = self.make()
        assert isinstance(partitioner, Partitioner)
        labels = digits_sample(400)[0].labels
        first = partitioner.checked_partition(labels, 4, np.random.default_rng(7))
        second = partitioner.checked_partition(labels, 4, np.random.default_rng(7))
        assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))

    def test_more_clients_than_samples_is_a_clear_error(self) -> None:
        from ..errors import DataError

        partitioner = self.make()
        assert isinstance(partitioner, Partitioner)
        with pytest.raises(DataError):
            partitioner.checked_partition(np.arange(3) % 2, 10, np.random.default_rng(0))


class DatasetTests(_ComponentTests):
    """A dataset yields uint8 images, disjoint splits and the same splits for the same seed."""

    kind = "dataset"

    def test_splits_are_well_formed_and_deterministic(self) -> None:
        dataset = self.make()
        assert isinstance(dataset, Dataset)
        first, second = dataset.load(seed=0), dataset.load(seed=0)
        task = first.task
        for split in (first.train, first.test):
            assert split.images.dtype == np.uint8
            assert split.images.shape[1:] == (task.image_size, task.image_size, task.channels)
            assert split.labels.min() >= 0 and split.labels.max() < task.num_classes
        np.testing.assert_array_equal(first.train.labels, second.train.labels)
        np.testing.assert_array_equal(first.test.images, second.test.images)

    def test_class_names_without_loading_agree_with_load(self) -> None:
        """``class_names()`` (None allowed) gives the names :meth:`Dataset.load` gives, in the same order."""
        dataset = self.make()
        names = dataset.class_names()
        if names is not None:
            assert tuple(names) == tuple(dataset.load(seed=0).task.class_names), "class_names() disagrees with load()"


class LoggerTests(_ComponentTests):
    """A logger accepts a run's lifecycle without error."""

    kind = "logger"

    def test_lifecycle(self, tmp_path) -> None:
        logger = self.make()
        assert isinstance(logger, Logger)
        logger.start(tmp_path, {"federation": {"rounds": 2}})
        for r in range(2):
            logger.log_round(
                r,
                {
                    "round": r + 1,
                    "client_accuracy_mean": 0.5,
                    "client_accuracy_min": 0.4,
                    "bytes_up_per_client": 10.0,
                    "bytes_down_per_client": 20.0,
                    "failures": [],
                    "seconds_round": 0.1,
                },
            )
        logger.finish({"rounds_completed": 2, "wall_seconds": 0.2})
