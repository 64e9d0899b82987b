"""Label-skewed non-IID partition: each class is spread over clients by Dirichlet(alpha) shares."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fedmmkt_core.errors import DataError
from fedmmkt_core.interfaces import ComponentConfig, Partitioner


class DirichletConfig(ComponentConfig):
    alpha: float = Field(0.5, gt=0, description="concentration: small = very skewed, large = close to IID")
    min_samples_per_client: int = Field(2, ge=1, description="redraw until every client has this many")
    max_tries: int = Field(1000, ge=1)


class DirichletPartitioner(Partitioner):
    """The usual per-class Dirichlet split (Hsu et al. 2019), redrawn until no client is too small."""

    Config = DirichletConfig
    config: DirichletConfig

    def partition(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        cfg = self.config
        if num_clients * cfg.min_samples_per_client > len(labels):
            raise DataError(
                f"{num_clients} clients x min_samples_per_client={cfg.min_samples_per_client} exceeds "
                f"the {len(labels)} training samples"
            )
        classes = np.unique(labels)
        for _ in range(cfg.max_tries):
            parts: list[list[int]] = [[] for _ in range(num_clients)]
            for label in classes:
                idx = rng.permutation(np.flatnonzero(labels == label))
                shares = rng.dirichlet(np.full(num_clients, cfg.alpha))
                cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
                for client, chunk in enumerate(np.split(idx, cuts)):
                    parts[client].extend(chunk.tolist())
            if min(len(p) for p in parts) >= cfg.min_samples_per_client:
                return [np.asarray(p, dtype=np.int64) for p in parts]
        raise DataError(
            f"no Dirichlet(alpha={cfg.alpha}) draw in {cfg.max_tries} tries gave every one of {num_clients} clients "
            f"at least {cfg.min_samples_per_client} samples; raise alpha or lower min_samples_per_client"
        )
