"""The typed messages at the worker boundary (workers.messages): msgpack round trips,
garbage refused both ways."""

import pytest

from workers.messages import MessageError, Prediction, StepRequest, StepResult, decode, encode


def test_messages_round_trip_and_reject_garbage():
    request = StepRequest(1, 2, 5, [7, 8], [8, 9], [-1, 0], [0], 2, 3, 0, [4], 64, {"temperature": 0.7})
    assert decode(encode(request)) == request
    result = StepResult(2, [9, 3], [0.5, 1.0], [[1, 2]], 7, [[4]], [[-0.1]], 0.01, 3.5)
    assert decode(encode(result)) == result
    for bad in (b"\x00\x01", encode(Prediction(1, [2], [])).replace(b"Prediction", b"Predictiom")):
        with pytest.raises(MessageError):
            decode(bad)


def test_a_message_that_cannot_be_encoded_is_a_message_error():
    request = StepRequest(1, 2, 5, [7, 8], [8, 9], [-1, 0], [0], 2, 3, 0, [4], 64, {"top_k": 2**64})
    with pytest.raises(MessageError, match="cannot encode a StepRequest"):
        encode(request)
