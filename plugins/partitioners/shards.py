"""Pathological non-IID partition (McMahan et al. 2017): sort by label, deal out shards."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fedmmkt_core.errors import DataError
from fedmmkt_core.interfaces import ComponentConfig, Partitioner


class ShardsConfig(ComponentConfig):
    shards_per_client: int = Field(2, ge=1, description="each client gets this many label-sorted shards")


class ShardsPartitioner(Partitioner):
    """Sort samples by label, cut into ``clients x shards_per_client`` shards, deal them at random."""

    Config = ShardsConfig
    config: ShardsConfig

    def partition(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        num_shards = num_clients * self.config.shards_per_client
        if num_shards > len(labels):
            raise DataError(f"{num_shards} shards requested but only {len(labels)} training samples")
        order = np.argsort(labels, kind="stable")
        shards = np.array_split(order, num_shards)
        dealt = rng.permutation(num_shards).reshape(num_clients, self.config.shards_per_client)
        return [np.concatenate([shards[s] for s in row]) for row in dealt]
