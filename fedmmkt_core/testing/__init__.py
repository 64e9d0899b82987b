"""Conformance test suites for plugins. Subclass one per component and set its attributes::

    from fedmmkt_core.testing import ClientModelTests

    class TestMyModel(ClientModelTests):
        name = "my-model"            # registered name (checked through the plugin registry)
        params = {"width": 8}       # recipe params for a tiny, CPU-fast instance

pytest collects the inherited ``test_*`` methods. Everything runs on a CPU on real data (a slice of
scikit-learn's digits), so the suites fit in CI.
"""

from __future__ import annotations

from .components import AggregatorTests, ClientModelTests, DatasetTests, LoggerTests, PartitionerTests
from .generation import AlignmentLossTests, GeneratorTests
from .runs import AlgorithmTests, BackendTests, run_tiny_recipe
from .samples import digits_sample, tiny_generator_task

__all__ = [
    "AggregatorTests",
    "AlgorithmTests",
    "AlignmentLossTests",
    "BackendTests",
    "ClientModelTests",
    "DatasetTests",
    "GeneratorTests",
    "LoggerTests",
    "PartitionerTests",
    "digits_sample",
    "run_tiny_recipe",
    "tiny_generator_task",
]
