"""Messages between server and clients: a type, a small JSON config and named numpy arrays.

Encoded as one safetensors blob (the config rides in its metadata), so no pickle ever touches a
peer's bytes. Sizes are checked before anything is allocated, and every message's encoded size is
what the toolkit reports as bytes on the wire.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
_META_KEY = "fedmmkt"


class MessageError(ValueError):
    """A message is malformed, too large, or does not carry what its type requires."""


@dataclass
class Message:
    """What travels between server and a client."""

    type: str
    config: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    _encoded: bytes | None = field(default=None, repr=False, compare=False)

    def encode(self) -> bytes:
        """safetensors bytes; cached, so treat a message as immutable once encoded."""
        if self._encoded is None:
            from safetensors.numpy import save

            arrays = {name: np.asarray(value, order="C") for name, value in self.arrays.items()}
            try:
                meta = json.dumps({"type": self.type, "config": self.config}, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise MessageError(f"'{self.type}' message config is not plain finite JSON: {exc}") from exc
            self._encoded = save(arrays, metadata={_META_KEY: meta})
        return self._encoded

    @property
    def nbytes(self) -> int:
        """Size of the encoded message: the figure reported as bytes on the wire."""
        return len(self.encode())

    @classmethod
    def decode(cls, data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
        """Parse bytes from a peer, refusing anything oversized or malformed."""
        from safetensors.numpy import load

        if len(data) > max_bytes:
            raise MessageError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
        if len(data) < 8:
            raise MessageError("message is truncated (no header)")
        (header_len,) = struct.unpack("<Q", data[:8])
        if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
            raise MessageError(f"message header length {header_len} is impossible for {len(data)} bytes")
        try:
            strict = {"parse_constant": _refuse_constant, "parse_float": _finite}
            header = json.loads(data[8 : 8 + header_len], **strict)
            meta = json.loads(header.get("__metadata__", {}).get(_META_KEY, "null"), **strict)
        except RecursionError:
            raise MessageError("message header is nested too deeply") from None
        except (ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
            raise MessageError(f"message header is not valid JSON: {type(exc).__name__}: {exc}") from None
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("type"), str)
            or not isinstance(meta.get("config"), dict)
        ):
            raise MessageError("message has no fedmmkt type/config metadata")
        try:
            arrays = load(bytes(data))
        except Exception as exc:  # safetensors raises its own error types
            raise MessageError(f"message body is not valid safetensors: {exc}") from exc
        return cls(meta["type"], meta["config"], arrays, _encoded=bytes(data))

    def number(self, key: str, low: float, high: float, required: bool = True, integer: bool = False) -> float | None:
        """A config value checked to be a finite number (``integer``: a whole one) in [low, high];
        ``None`` when it is absent and not ``required``."""
        if key not in self.config:
            if required:
                raise MessageError(f"'{self.type}' message has no '{key}'")
            return None
        value = self.config[key]
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            want = "a whole number" if integer else "a number"
            raise MessageError(f"'{key}' must be {want}, got {type(value).__name__}")
        if not math.isfinite(value) or not low <= value <= high:
            raise MessageError(f"'{key}' is {value!r}, outside [{low:g}, {high:g}]")
        return value

    def array(
        self,
        name: str,
        dtype: np.dtype | type | None = None,
        shape: tuple[int | None, ...] | None = None,
        finite: bool = False,
    ) -> np.ndarray:
        """A named array, checked for dtype, shape (``None`` = any size) and finiteness."""
        if name not in self.arrays:
            raise MessageError(f"'{self.type}' message has no array '{name}'")
        value = self.arrays[name]
        if dtype is not None and value.dtype != np.dtype(dtype):
            raise MessageError(f"array '{name}' has dtype {value.dtype}, expected {np.dtype(dtype)}")
        if shape is not None:
            if value.ndim != len(shape) or any(
                s is not None and s != v for s, v in zip(shape, value.shape, strict=True)
            ):
                want = tuple("*" if s is None else s for s in shape)
                raise MessageError(f"array '{name}' has shape {value.shape}, expected {want}")
        if finite and value.dtype.kind == "f" and not np.isfinite(value).all():
            raise MessageError(f"array '{name}' has NaN or infinite values")
        return value

    def weights(self, prefix: str = "weights/") -> dict[str, np.ndarray]:
        """Arrays whose names start with ``prefix``, with the prefix removed."""
        return {k[len(prefix) :]: v for k, v in self.arrays.items() if k.startswith(prefix)}


# Config fields of replies the core and the built-in algorithms read: (low, high, required, integer).
EPSILON_FIELD = (0.0, 1e9, False, False)  # privacy_epsilon: the ε a client under DP reports (its own ledger)
NOISE_FIELD = (0.0, 1e6, False, False)  # privacy_noise_multiplier: the noise it ran under (a stricter site's)
ACCURACY_FIELD = (0.0, 1.0, False, False)  # accuracy on the split clients are evaluated on
NUM_TEST_FIELD = (0, 2**40, False, True)
REPLY_FIELDS: dict[str, dict[str, tuple[float, float, bool, bool]]] = {
    "fit_reply": {
        "loss": (-1e6, 1e6, False, False),
        "num_samples": (0, 2**40, False, True),
        "privacy_epsilon": EPSILON_FIELD,
        "privacy_noise_multiplier": NOISE_FIELD,
        "accuracy": ACCURACY_FIELD,  # only when the fit message asked to EVALUATE_AFTER_FIT
        "num_test": NUM_TEST_FIELD,
    },
    "predict_reply": {
        "num_samples": (0, 2**40, False, True),
        "privacy_epsilon": EPSILON_FIELD,
        "privacy_noise_multiplier": NOISE_FIELD,
    },
    "evaluate_reply": {
        "accuracy": (*ACCURACY_FIELD[:2], True, False),
        "num_test": NUM_TEST_FIELD,
        "privacy_epsilon": EPSILON_FIELD,
        "privacy_noise_multiplier": NOISE_FIELD,
    },
}


# A fit message whose config sets this key true asks the client to evaluate the model it has just trained
# and put ``accuracy`` and ``num_test`` in its fit reply: the round's evaluation rides on the fit exchange
# (one exchange per round instead of two; on Flower each exchange costs seconds of process start and polling).
EVALUATE_AFTER_FIT = "evaluate"
EVALUATION_FIELDS = ("accuracy", "num_test")


def traffic_nbytes(message: Message) -> int:
    """Bytes the message counts as traffic: its encoded size without the evaluation it carries (the
    :data:`EVALUATE_AFTER_FIT` request and its answer), as an ``evaluate`` exchange is not counted either."""
    riders = (EVALUATE_AFTER_FIT, *EVALUATION_FIELDS) if message.type in ("fit", "fit_reply") else ()
    if not any(key in message.config for key in riders):
        return message.nbytes
    config = {k: v for k, v in message.config.items() if k not in riders}
    return Message(message.type, config, message.arrays).nbytes


def check_reply_fields(message: Message) -> None:
    """Check the config fields of :data:`REPLY_FIELDS` for the message's type (a MessageError if not)."""
    for key, (low, high, required, integer) in REPLY_FIELDS.get(message.type, {}).items():
        message.number(key, low, high, required=required, integer=integer)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not plain finite JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows to {value}")
    return value


def with_prefix(arrays: dict[str, np.ndarray], prefix: str = "weights/") -> dict[str, np.ndarray]:
    return {prefix + k: v for k, v in arrays.items()}
