"""The JSON and binary tensor codecs round-trip every datatype and refuse malformed bodies."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tests_support import JSON_VALUES

from appliance import tensors
from appliance.errors import InvalidInput
from appliance.protocol import codec

NUMERIC = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    datatype = draw(st.sampled_from([*NUMERIC, "BYTES"]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    if datatype == "BYTES":
        items = draw(
            st.lists(st.binary(max_size=8), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
        )
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = tensors.numpy_dtype(datatype)
    elements = None
    if dtype.kind == "f":
        elements = st.floats(allow_nan=False, allow_infinity=False, width=dtype.itemsize * 8)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@settings(max_examples=300, deadline=None)
@given(array=arrays(), binary=st.booleans(), binary_output=st.booleans())
def test_request_and_response_round_trip(array: np.ndarray, binary: bool, binary_output: bool) -> None:
    if array.dtype == object and not binary:
        array = (
            np.vectorize(lambda b: b.decode("latin-1").encode(), otypes=[object])(array)
            if array.size
            else array
        )
    encoded = codec.encode_request({"t": array}, binary=binary, binary_output=binary_output, request_id="r")
    request = codec.decode_request(encoded.body(), encoded.header_length)
    decoded = request.inputs["t"]
    assert decoded.shape == array.shape and decoded.dtype == array.dtype
    assert decoded.tolist() == array.tolist()
    assert request.binary_output == (binary_output and True)
    if array.dtype == object and not binary_output and not all(_is_utf8(b) for b in array.reshape(-1)):
        with pytest.raises(InvalidInput, match="not UTF-8"):
            codec.encode_response(model_name="m", model_version="1", request=request, outputs={"t": decoded})
        return
    response = codec.encode_response(
        model_name="m", model_version="1", request=request, outputs={"t": decoded}
    )
    back = codec.decode_response(response.body(), response.header_length)["t"]
    if array.dtype == object and not binary_output:
        back = (
            np.vectorize(lambda s: s.encode() if isinstance(s, str) else s, otypes=[object])(back)
            if back.size
            else back
        )
    assert back.shape == array.shape and back.tolist() == array.tolist()


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.none() | st.integers(-5, 250))
def test_arbitrary_bytes_never_crash_the_decoder(body: bytes, header_length: int | None) -> None:
    with contextlib.suppress(InvalidInput):
        codec.decode_request(body, header_length)


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_arbitrary_json_documents_are_refused_cleanly(document: object) -> None:
    import orjson

    try:
        body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": document}]})
    except (TypeError, orjson.JSONEncodeError):
        return
    with contextlib.suppress(InvalidInput):
        codec.decode_request(body)


@pytest.mark.parametrize(
    ("data", "datatype", "message"),
    [
        ([1.5, 2], "INT32", "must be integers"),
        ([300], "UINT8", "outside UINT8's range"),
        ([1, 0], "BOOL", "true/false"),
        ([1, "a"], "BYTES", "must be strings"),
        ([[1, 2], [3]], "FP32", "does not fit FP32"),
        ([True, False], "FP32", "must be numbers"),
    ],
)
def test_json_data_that_does_not_fit_the_datatype(data: list, datatype: str, message: str) -> None:
    import orjson

    body = orjson.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [2], "data": data}]})
    with pytest.raises(InvalidInput, match=message):
        codec.decode_request(body)


def test_bytes_tensor_truncation_is_named() -> None:
    with pytest.raises(InvalidInput, match="element 0 declares 10 bytes, 2 remain"):
        tensors.decode_bytes_tensor((10).to_bytes(4, "little") + b"ab", [1])
    with pytest.raises(InvalidInput, match="has 1 elements; shape \\[2\\] needs 2"):
        tensors.decode_bytes_tensor((1).to_bytes(4, "little") + b"a", [2])


def test_binary_inputs_are_views_of_the_body_and_outputs_views_of_the_array() -> None:
    """Zero-copy both ways: a write on one side shows on the other, which a copy would not."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    encoded = codec.encode_request({"x": x, "b": np.array([True, False])}, binary=True)
    assert encoded.header_length is not None
    body = bytearray(encoded.body())
    request = codec.decode_request(body, encoded.header_length)
    start = encoded.header_length
    body[start : start + 4] = np.float32(42.0).tobytes()  # the first element of x, in the body
    body[start + x.nbytes + 1] = 1  # the second element of b
    assert request.inputs["x"][0, 0] == 42.0
    assert request.inputs["b"].tolist() == [True, True]

    raw = bytearray(x.tobytes())
    view = tensors.from_buffer(raw, "FP32", [2, 4])
    raw[-4:] = np.float32(-7.0).tobytes()
    assert view[1, 3] == -7.0

    outputs = np.arange(6, dtype=np.int64).reshape(3, 2)
    blob = tensors.to_bytes(outputs)
    outputs[2, 1] = 99
    assert np.frombuffer(blob, np.int64)[-1] == 99
    response = codec.encode_response(
        model_name="m",
        model_version="1",
        request=codec.decode_request(*_binary_output_request()),
        outputs={"y": outputs},
    )
    outputs[0, 0] = -5  # the response's binary part is the array's memory, not a snapshot of it
    assert np.frombuffer(response.parts[1], np.int64)[0] == -5


def _binary_output_request() -> tuple[bytes, int | None]:
    encoded = codec.encode_request({"x": np.zeros((1, 4), np.float32)}, binary=False, binary_output=True)
    return encoded.body(), encoded.header_length
