"""How a toolkit :class:`~fedmmkt_core.wire.Message` travels as Flower records, and Flower-level byte counts.

A message's safetensors bytes travel as one ``uint8`` Flower ``Array`` (stype ``fedmmkt.safetensors``)
in an ``ArrayRecord``: one encoding for every backend, one bounded decoder (:meth:`Message.decode`), no
pickle anywhere. Next to it a small ``ConfigRecord`` tells the ClientApp which round the message
belongs to and from which round the run started (what it needs to keep its weights on disk).
"""

from __future__ import annotations

import base64
from typing import Any

from fedmmkt_core.wire import DEFAULT_MAX_BYTES, Message, MessageError

RECORD = "fedmmkt"  # the ArrayRecord carrying the message
ROUND_RECORD = "fedmmkt.round"  # ConfigRecord: round (0-based) and start-round (rounds completed at start)
STYPE = "fedmmkt.safetensors"  # how the Array's bytes are serialized
MAX_ROUND = 1_000_000


def to_records(message: Message, round_index: int | None = None, start_round: int | None = None) -> Any:
    """A toolkit message as Flower records: its safetensors bytes as one uint8 Array (and the round)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    blob = message.encode()
    array = Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)
    records: dict[str, Any] = {RECORD: ArrayRecord(array_dict={"message": array})}
    if round_index is not None and start_round is not None:
        records[ROUND_RECORD] = ConfigRecord({"round": int(round_index), "start-round": int(start_round)})
    return RecordDict(records)


def from_records(content: Any, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Decode a toolkit message from Flower records (bounded, validated, no pickle)."""
    record = content.array_records.get(RECORD) if content is not None else None
    array = record.get("message") if record is not None else None
    if array is None or array.stype != STYPE or array.dtype != "uint8":
        raise MessageError(f"Flower message carries no '{RECORD}' array of stype '{STYPE}'")
    if len(array.data) > max_bytes:
        raise MessageError(f"message of {len(array.data)} bytes exceeds the limit of {max_bytes}")
    return Message.decode(bytes(array.data), max_bytes=max_bytes)


def round_from_records(content: Any) -> tuple[int, int] | None:
    """``(round, start_round)`` the server attached to a message, validated; None when absent."""
    record = content.config_records.get(ROUND_RECORD) if content is not None else None
    if record is None:
        return None
    values = []
    for key in ("round", "start-round"):
        value = record.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ROUND:
            raise MessageError(f"'{ROUND_RECORD}' field '{key}' must be an integer in 0..{MAX_ROUND}, got {value!r}")
        values.append(value)
    if values[1] > values[0]:
        raise MessageError(f"'{ROUND_RECORD}': start-round {values[1]} is after round {values[0]}")
    return values[0], values[1]


def flower_nbytes(message: Any) -> int:
    """Bytes of a Flower message as it is serialized for transport: every object (message, records,
    arrays, 5 MiB array chunks) deflated with its header. HTTP framing is not included."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def unb64(text: str) -> str:
    return base64.b64decode(text.encode("ascii")).decode("utf-8")
