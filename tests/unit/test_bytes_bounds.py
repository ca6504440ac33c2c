"""BYTES binary data is decoded only as far as its declared shape: more elements, or bytes after the
last, are refused as soon as they are found (tensors.decode_bytes_tensor, which every transport's
binary data goes through: HTTP and MQTT bodies, gRPC raw_input_contents, shared-memory regions).

Regression: a pool job's [1] input carrying 8 MiB of zero-length elements was walked whole, 2 Mi
elements made in Python (3.6 s holding the GIL), before its count was compared with the shape."""

from __future__ import annotations

import tracemalloc

import numpy as np
import orjson
import pytest

from appliance import tensors
from appliance.errors import InvalidInput
from appliance.protocol import codec

BLOB_BYTES = 8 * 1024 * 1024  # 2 Mi zero-length elements
EMPTY = (0).to_bytes(4, "little")


def peak_bytes_decoding(data: bytes, shape: list[int]) -> tuple[int, str]:
    """The most memory the decode held at once, and its refusal: a list of one reference per element
    walked would be 8 bytes each, 16 MiB for 2 Mi elements (empty bytes objects are one shared one)."""
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput) as refused:
            tensors.decode_bytes_tensor(data, shape)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, str(refused.value)


def test_more_elements_than_the_shape_holds_are_refused_without_walking_them() -> None:
    peak, message = peak_bytes_decoding(bytes(BLOB_BYTES), [1])
    assert message == (
        f"BYTES tensor has more data than shape [1] holds: {BLOB_BYTES - 4} bytes remain after its 1 elements"
    )
    assert peak < 64 * 1024, peak  # one element made, not 2 Mi


def test_bytes_after_the_last_element_are_refused() -> None:
    with pytest.raises(InvalidInput, match="2 bytes remain after its 2 elements"):
        tensors.decode_bytes_tensor((1).to_bytes(4, "little") + b"a" + EMPTY + b"zz", [2])
    with pytest.raises(InvalidInput, match="shape \\[0\\] holds: 4 bytes remain after its 0 elements"):
        tensors.decode_bytes_tensor(EMPTY, [0])


def test_data_that_fits_the_shape_exactly_is_decoded() -> None:
    data = tensors.encode_bytes_tensor(np.array([b"", b"bolt", "\u00e9"], dtype=object))
    assert tensors.decode_bytes_tensor(data, [3]).tolist() == [b"", b"bolt", "\u00e9".encode()]
    assert tensors.decode_bytes_tensor(data, [1, 3]).shape == (1, 3)
    assert tensors.decode_bytes_tensor(b"", [0]).shape == (0,)
    with pytest.raises(InvalidInput, match="has 3 elements; shape \\[4\\] needs 4"):
        tensors.decode_bytes_tensor(data, [4])


def test_a_request_body_of_too_many_elements_is_a_400_naming_the_input() -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": BLOB_BYTES},
                }
            ]
        }
    )
    with pytest.raises(
        InvalidInput, match="input 'text': BYTES tensor has more data than shape \\[1\\] holds"
    ):
        codec.decode_request(header + bytes(BLOB_BYTES), len(header))
    # One part per input (gRPC's raw_input_contents): the same decoder, the same refusal.
    payload = codec.Payload([memoryview(EMPTY * 3)], is_split=True)
    with pytest.raises(InvalidInput, match="8 bytes remain after its 1 elements"):
        tensors.from_buffer(payload.take("text", 12), "BYTES", [1])
