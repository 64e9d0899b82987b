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

Each upload is then a Gaussian mechanism with noise multiplier ``noise_multiplier``; the ε a client
has spent after its uploads comes from the RDP accountant of Google's ``dp-accounting`` (no
subsampling amplification is claimed: the synthetic queries are public and client sampling is not
secret).

The client does its own accounting and does not trust the server to follow the protocol: it keeps a
:class:`PrivacyLedger` of every noised upload it made (written before the upload leaves, kept with
its state, so uploads of failed or re-run rounds count), computes its ε from that ledger and reports
it with every reply, and refuses (:class:`PrivacyRefused`) an upload that would take it past
``max_epsilon`` and any request that would leak more than noised logits (``return_weights``). The run
reports the largest ε any client reported.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .errors import MissingDependencyError


class PrivacyRefused(Exception):
    """A client under DP refuses a request: it would exceed its budget or leak more than noised logits."""


class SoftLabelPrivacy(BaseModel):
    """Clip-and-noise on every uploaded logit matrix, with ε accounting (recipe section ``privacy``)."""

    model_config = ConfigDict(extra="forbid")

    clip_norm: float = Field(5.0, gt=0, description="each logit row is scaled down to at most this L2 norm")
    noise_multiplier: float = Field(
        gt=0, description="noise std as a multiple of the upload's L2 sensitivity 2·clip_norm·√n"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the reported (ε, δ) guarantee")
    max_epsilon: float | None = Field(
        None,
        gt=0,
        description="each client's budget: it refuses an upload that would take its ε (at delta) past this",
    )

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
        return gaussian_epsilon({self.noise_multiplier: int(rounds)}, self.delta)

    def epsilon_spent(self, uploads_per_client: Iterable[int]) -> float:
        """The largest ε over clients, given how many rounds each uploaded in."""
        return max((self.epsilon(count) for count in set(uploads_per_client)), default=0.0)


class SitePrivacy(BaseModel):
    """A site's own privacy settings, checked against the recipe's: the stricter of the two wins.

    From the client's environment (``FEDMMKT_DP_NOISE_MULTIPLIER``, ``FEDMMKT_DP_DELTA``,
    ``FEDMMKT_DP_MAX_EPSILON``) and, on Flower, its node config (``dp-noise-multiplier``,
    ``dp-delta``, ``dp-max-epsilon``); where both are set, the stricter value. A site that sets a
    noise multiplier runs under DP even when the recipe has no privacy section.

    ``class_mean_min_images`` (``FEDMMKT_CLASS_MEAN_MIN_IMAGES``, node config ``class-mean-min-images``):
    the site's own floor for class-mean feedback; the client never uploads the mean of a class with fewer
    private images, whatever the server asks (a floor above the client's largest class withholds them all).
    """

    model_config = ConfigDict(extra="forbid")

    noise_multiplier: float | None = Field(None, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)
    max_epsilon: float | None = Field(None, gt=0)
    class_mean_min_images: int | None = Field(None, ge=1)

    ENV: ClassVar[dict[str, str]] = {
        "noise_multiplier": "FEDMMKT_DP_NOISE_MULTIPLIER",
        "delta": "FEDMMKT_DP_DELTA",
        "max_epsilon": "FEDMMKT_DP_MAX_EPSILON",
        "class_mean_min_images": "FEDMMKT_CLASS_MEAN_MIN_IMAGES",
    }
    NODE_CONFIG: ClassVar[dict[str, str]] = {
        "noise_multiplier": "dp-noise-multiplier",
        "delta": "dp-delta",
        "max_epsilon": "dp-max-epsilon",
        "class_mean_min_images": "class-mean-min-images",
    }

    @classmethod
    def read(cls, node_config: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None):
        """The site's settings from its environment and node config (the stricter where both are set)."""
        environ = os.environ if environ is None else environ
        sources = [(environ, cls.ENV, "environment variable"), (node_config or {}, cls.NODE_CONFIG, "node config key")]
        merged = cls()
        for values, keys, what in sources:
            found = {}
            for field, key in keys.items():
                raw = values.get(key)
                if raw is None or raw == "":
                    continue
                try:
                    found[field] = float(raw)  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    from .errors import UserError

                    raise UserError(f"{what} {key}={raw!r} is not a number") from None
            try:
                merged = merged.stricter(cls(**found))
            except ValueError as exc:
                from .errors import UserError

                raise UserError(f"site privacy settings ({what}s {sorted(keys.values())}): {exc}") from None
        return merged

    def stricter(self, other: SitePrivacy) -> SitePrivacy:
        return SitePrivacy(
            noise_multiplier=_pick(max, self.noise_multiplier, other.noise_multiplier),
            delta=_pick(min, self.delta, other.delta),
            max_epsilon=_pick(min, self.max_epsilon, other.max_epsilon),
            class_mean_min_images=_pick(max, self.class_mean_min_images, other.class_mean_min_images),
        )

    def apply(self, recipe: SoftLabelPrivacy | None) -> SoftLabelPrivacy | None:
        """The settings this client runs under: the stricter of the recipe's and the site's."""
        if recipe is None and self.noise_multiplier is None:
            if self.max_epsilon is not None:  # without noise ε is unbounded: nothing may go up
                raise PrivacyRefused(
                    f"the site's budget max_epsilon={self.max_epsilon:g} needs DP, and neither the recipe (no privacy "
                    "section) nor the site (no noise multiplier) sets it"
                )
            return None
        base = recipe if recipe is not None else SoftLabelPrivacy(noise_multiplier=self.noise_multiplier)
        return base.model_copy(
            update={
                "noise_multiplier": _pick(max, base.noise_multiplier, self.noise_multiplier),
                "delta": _pick(min, base.delta, self.delta),
                "max_epsilon": _pick(min, base.max_epsilon, self.max_epsilon),
            }
        )


def _pick(choose, a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return choose(values) if values else None


def gaussian_epsilon(uploads: dict[float, int], delta: float) -> float:
    """ε at ``delta`` of composed Gaussian mechanisms: ``uploads`` maps a noise multiplier to how
    many uploads used it (RDP accountant of ``dp-accounting``)."""
    uploads = {z: n for z, n in uploads.items() if n > 0}
    if not uploads:
        return 0.0
    try:
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant
    except ImportError:
        raise MissingDependencyError("dp_accounting", "Install it with: pip install 'fedmmkt[privacy]'") from None
    accountant = RdpAccountant()
    for z, count in sorted(uploads.items()):
        accountant.compose(dp_accounting.GaussianDpEvent(float(z)), int(count))
    return float(accountant.get_epsilon(delta))


class PrivacyLedger:
    """Every noised upload one client made, kept by the client: what its ε is computed from.

    With a ``path`` the ledger lives in a JSON file next to the client's weights and every
    :meth:`record` re-reads it, appends and writes it back under a file lock *before* the upload
    leaves, so an upload is counted even when its round fails, is re-run after a resume, or another
    process (an abandoned worker, a second ClientApp) uploaded meanwhile. Files outside the weight
    files' pattern: resuming or discarding rounds never removes entries. Without a path it is kept in
    memory (``entries``; Flower nodes without a state folder store them in their run's state).
    """

    def __init__(self, path: Path | None = None, entries: list[dict[str, Any]] | None = None):
        self.path = Path(path) if path is not None else None
        self._entries: list[dict[str, Any]] = list(entries or [])

    @property
    def entries(self) -> list[dict[str, Any]]:
        if self.path is not None:
            self._entries = self._read()
        return list(self._entries)

    def _read(self) -> list[dict[str, Any]]:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # never guess: a damaged ledger stops uploads
            reason = f"{type(exc).__name__}: {exc}"
            raise PrivacyRefused(f"the privacy ledger {self.path} is unreadable ({reason})") from None
        uploads = data.get("uploads") if isinstance(data, dict) else None
        if not isinstance(uploads, list) or not all(
            isinstance(e, dict) and isinstance(e.get("noise_multiplier"), int | float) for e in uploads
        ):
            raise PrivacyRefused(f"the privacy ledger {self.path} is damaged (no list of uploads)")
        return uploads

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def epsilon(self, delta: float, extra: Iterable[float] = ()) -> float:
        """ε at ``delta`` of every recorded upload (plus uploads with the noise multipliers ``extra``)."""
        counts: dict[float, int] = {}
        for z in [float(e["noise_multiplier"]) for e in self.entries] + [float(z) for z in extra]:
            counts[z] = counts.get(z, 0) + 1
        return gaussian_epsilon(counts, delta)

    def record(self, spec: SoftLabelPrivacy, **details: Any) -> tuple[int, float]:
        """Charge one upload under ``spec``: refuse it (:class:`PrivacyRefused`) when it would take ε
        past ``spec.max_epsilon``, else write it to the ledger. Returns ``(index, ε)``: the upload's
        position in the ledger (the client-side counter its noise may be keyed to) and the ε spent
        with it."""
        from .rundir import atomic_write_text

        with self._locked():
            entries = self._read() if self.path is not None else self._entries
            counts: dict[float, int] = {}
            for e in entries:
                counts[float(e["noise_multiplier"])] = counts.get(float(e["noise_multiplier"]), 0) + 1
            before = gaussian_epsilon(counts, spec.delta)
            counts[spec.noise_multiplier] = counts.get(spec.noise_multiplier, 0) + 1
            after = gaussian_epsilon(counts, spec.delta)
            if spec.max_epsilon is not None and after > spec.max_epsilon:
                raise PrivacyRefused(
                    f"privacy budget: this upload would bring ε to {after:.4g} > max_epsilon={spec.max_epsilon:g} "
                    f"(δ={spec.delta:g}; {len(entries)} uploads so far, ε {before:.4g})"
                )
            entry = {"noise_multiplier": spec.noise_multiplier, "clip_norm": spec.clip_norm, **details}
            entries = [*entries, entry]
            if self.path is not None:
                atomic_write_text(self.path, json.dumps({"uploads": entries}, indent=1, sort_keys=True) + "\n")
            self._entries = entries
            return len(entries) - 1, after
