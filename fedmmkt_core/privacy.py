"""Differential privacy for the uploaded soft labels: clipping, Gaussian noise, and the ε spent.

The unit protected is a client's whole local dataset (client-level DP, the notion FL uses): two
neighbouring inputs are any two datasets of one client. Each round's upload is the client's logits
on ``n`` synthetic images; every row is clipped to L2 norm ``clip_norm``, so replacing the dataset
moves the upload by at most ``Δ = 2 · clip_norm · √n`` (Frobenius norm), and each coordinate gets
Gaussian noise of standard deviation ``noise_multiplier · Δ``. The client adds the noise itself, from
randomness only it holds (:meth:`fedmmkt_core.client.ClientRuntime.noise_rng`): the server never sees
the clean logits and cannot regenerate the noise (local DP), so the guarantee does not need a trusted
server. Nothing else a client knows goes up under DP (class counts, sample counts and training
metrics are withheld), so the ε below covers every upload of the training protocol.

Each round is then a Gaussian mechanism with noise multiplier ``noise_multiplier``; the ε a client
has spent after the rounds it took part in comes from the RDP accountant of Google's
``dp-accounting`` (no subsampling amplification is claimed: the synthetic queries are public and
client sampling is not secret). The run reports the largest ε over clients each round.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import MissingDependencyError


class SoftLabelPrivacy(BaseModel):
    """Clip-and-noise on every uploaded logit matrix, with ε accounting (recipe section ``privacy``)."""

    model_config = ConfigDict(extra="forbid")

    clip_norm: float = Field(5.0, gt=0, description="each logit row is scaled down to at most this L2 norm")
    noise_multiplier: float = Field(
        gt=0, description="noise std as a multiple of the upload's L2 sensitivity 2·clip_norm·√n"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the reported (ε, δ) guarantee")

    def privatize(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clip each row and add Gaussian noise drawn from ``rng`` (the client's own randomness)."""
        values = np.asarray(logits, dtype=np.float64)
        norms = np.linalg.norm(values, axis=1, keepdims=True)
        clipped = values * np.minimum(1.0, self.clip_norm / np.maximum(norms, 1e-12))
        noisy = clipped + rng.normal(0.0, self.noise_std(len(values)), size=values.shape)
        return noisy.astype(np.float32)

    def noise_std(self, num_rows: int) -> float:
        return self.noise_multiplier * 2.0 * self.clip_norm * float(np.sqrt(max(num_rows, 1)))

    def epsilon(self, rounds: int) -> float:
        """ε spent by a client that uploaded in ``rounds`` rounds, at this δ (RDP accountant)."""
        if rounds <= 0:
            return 0.0
        try:
            import dp_accounting
            from dp_accounting.rdp import RdpAccountant
        except ImportError:
            raise MissingDependencyError("dp_accounting", "Install it with: pip install 'fedmmkt[privacy]'") from None
        accountant = RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(self.noise_multiplier), int(rounds))
        return float(accountant.get_epsilon(self.delta))

    def epsilon_spent(self, uploads_per_client: Iterable[int]) -> float:
        """The largest ε over clients, given how many rounds each uploaded in."""
        return max((self.epsilon(count) for count in set(uploads_per_client)), default=0.0)
