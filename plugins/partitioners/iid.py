"""IID partition: a uniform random split of the samples."""

from __future__ import annotations

import numpy as np

from fedmmkt_core.interfaces import Partitioner


class IIDPartitioner(Partitioner):
    """Shuffle, then cut into equal parts."""

    def partition(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        return list(np.array_split(rng.permutation(len(labels)), num_clients))
