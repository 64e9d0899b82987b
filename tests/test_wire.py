"""Messages: safetensors round trip, bounded decoding, validation."""

import numpy as np
import pytest

from fedmmkt_core.wire import EVALUATE_AFTER_FIT, Message, MessageError, check_reply_fields, traffic_nbytes


def test_round_trip_and_size():
    message = Message("predict", {"round": 2}, {"images": np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)})
    data = message.encode()
    back = Message.decode(data)
    assert back.type == "predict" and back.config == {"round": 2}
    np.testing.assert_array_equal(back.arrays["images"], message.arrays["images"])
    assert message.nbytes == len(data) and len(data) > 128


def test_truncated_and_oversized_are_refused():
    data = Message("x", {}, {"a": np.zeros(100, dtype=np.float32)}).encode()
    with pytest.raises(MessageError):
        Message.decode(data[:50])
    with pytest.raises(MessageError, match="exceeds"):
        Message.decode(data, max_bytes=100)
    with pytest.raises(MessageError):
        Message.decode(b"\xff" * 16)


def test_array_validation():
    message = Message("r", {}, {"logits": np.array([[1.0, np.nan]], dtype=np.float32)})
    with pytest.raises(MessageError, match="dtype"):
        message.array("logits", np.float64)
    with pytest.raises(MessageError, match="shape"):
        message.array("logits", np.float32, (1, 3))
    with pytest.raises(MessageError, match="NaN"):
        message.array("logits", np.float32, (None, 2), finite=True)
    with pytest.raises(MessageError, match="no array"):
        message.array("missing")


def test_config_must_be_plain_json():
    with pytest.raises(MessageError):
        Message("x", {"bad": float("nan")}).encode()


def test_zero_dimensional_arrays_keep_their_shape():
    # np.ascontiguousarray would turn () into (1,): BatchNorm counters must survive the wire
    back = Message.decode(Message("x", {}, {"count": np.array(7, dtype=np.int64)}).encode())
    assert back.arrays["count"].shape == () and int(back.arrays["count"]) == 7


def test_an_evaluation_riding_on_a_fit_exchange_is_not_counted_as_traffic():
    logits = {"logits": np.ones((5, 3), np.float16)}
    reply = Message("fit_reply", {"num_samples": 40, "loss": 0.5, "accuracy": 0.75, "num_test": 12}, logits)
    assert traffic_nbytes(reply) == Message("fit_reply", {"num_samples": 40, "loss": 0.5}, logits).nbytes
    assert traffic_nbytes(reply) < reply.nbytes
    request = Message("fit", {"seed": 3, EVALUATE_AFTER_FIT: True})
    assert traffic_nbytes(request) == Message("fit", {"seed": 3}).nbytes
    evaluate_reply = Message("evaluate_reply", {"accuracy": 0.75, "num_test": 12})  # not a fit: counted whole
    assert traffic_nbytes(evaluate_reply) == evaluate_reply.nbytes
    check_reply_fields(reply)
    with pytest.raises(MessageError, match="accuracy"):
        check_reply_fields(Message("fit_reply", {"accuracy": 1.5}))
