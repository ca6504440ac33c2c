"""The JSON and binary tensor codecs round-trip every datatype and refuse malformed bodies."""

from __future__ import annotations

import contextlib
import json
import re

import numpy as np
import orjson
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
    if dtype.kind == "f":  # NaN and the infinities included: JSON carries them as Triton writes them
        elements = st.floats(width=dtype.itemsize * 8)
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
    _assert_same(decoded, array)
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
    assert back.shape == array.shape
    _assert_same(back, array)


def _assert_same(got: np.ndarray, expected: np.ndarray) -> None:
    if expected.dtype.kind == "f":
        np.testing.assert_array_equal(got, expected)  # NaN where NaN was
    else:
        assert got.tolist() == expected.tolist()


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


def _fp32(data: bytes, datatype: bytes = b"FP32", rest: bytes = b"") -> bytes:
    """A request of one input 'x' of shape [1] with `data` as written, then `rest` of the document."""
    entry = b'{"name": "x", "datatype": "%s", "shape": [1], "data": %s}' % (datatype, data)
    return b'{"inputs": [%s]%s}' % (entry, rest)


def test_non_finite_json_data_is_written_and_read_as_triton_does() -> None:
    """NaN, Infinity and -Infinity tokens (rapidjson's kWriteNanAndInfFlag), not null: Python's json and
    tritonclient read them, and so does our decoder, on a small body (orjson) and a big one (simdjson)."""
    y = np.array([[np.inf, -np.inf, 0.5, np.nan]], np.float32)
    request = codec.decode_request(_fp32(b"[1]"))
    body = codec.encode_response(model_name="m", model_version="1", request=request, outputs={"y": y}).body()
    assert b'"data":[Infinity,-Infinity,0.5,NaN]' in body
    np.testing.assert_array_equal(json.loads(body)["outputs"][0]["data"], y.reshape(-1))
    np.testing.assert_array_equal(codec.decode_response(body)["y"], y)
    for rows in (1, 5000):  # 5000 rows: past bulk_json.BULK_BYTES
        x = np.tile(y, (rows, 1))
        encoded = codec.encode_request({"x": x}, binary=False)
        np.testing.assert_array_equal(codec.decode_request(encoded.body()).inputs["x"], x)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_fp32(b"[NaN, 1"), "request body is not valid JSON: unexpected character"),  # orjson's message
        (_fp32(b"[NaN]", rest=b', "id": "\\ud800"'), "request body is not valid JSON"),  # lone surrogate
        (_fp32(b"[NaN]", rest=b', "id": 5'), "request 'id' must be a string, got 5"),
        (_fp32(b"[NaN, NaN]"), "input 'x' has 2 values; shape [1] needs 1"),
        (_fp32(b"[NaN]", b"INT32"), "input 'x' is INT32; data must be integers"),
        (_fp32(b"[Infinity]", b"BYTES"), "input 'x' is BYTES; data must be strings, got inf"),
    ],
)
def test_non_finite_tokens_keep_every_other_check(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        codec.decode_request(body)


def test_non_finite_tokens_are_read_in_documents_up_to_a_megabyte_only() -> None:
    """Python's json reads the tokens 3.6 times slower than orjson, on the loop that serves the line."""
    from appliance.protocol import nonfinite

    def body(count: int) -> bytes:
        data = b"[" + b"0.123456, " * count + b"NaN]"
        return b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [%d], "data": %s}]}' % (
            count + 1,
            data,
        )

    whole = nonfinite.FALLBACK_LIMIT_BYTES // 10
    with pytest.raises(
        InvalidInput, match="NaN and Infinity are read in JSON documents of up to 1048576 bytes"
    ):
        codec.decode_request(body(whole + 100))
    assert np.isnan(codec.decode_request(body(whole - 100)).inputs["x"][-1])


def test_an_integer_past_64_bits_beside_a_token_is_a_float_as_orjson_reads_it() -> None:
    request = codec.decode_request(_fp32(b"[NaN]", rest=b', "parameters": {"timeout": 1' + b"0" * 400 + b"}"))
    with pytest.raises(InvalidInput, match="parameter 'timeout' must be a non-negative integer, got inf"):
        request.timeout_us  # noqa: B018


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1]", "response must be a JSON object, got list"),
        (b'"ok"', "response must be a JSON object, got str"),
        (b'{"outputs": 5}', "response 'outputs' must be a list, got int"),
        (b'{"outputs": [5]}', "each input must be a JSON object, got 5"),
        (b"{", "response is not valid JSON"),
        (b'{"error": "model is busy"}', "model is busy"),
    ],
)
def test_a_malformed_response_is_invalid_input(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        codec.decode_response(body)
    with pytest.raises(InvalidInput, match="response header length is 99; the answer has"):
        codec.decode_response(body, 99)


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_arbitrary_json_answers_raise_invalid_input_only(document: object) -> None:
    try:
        body = orjson.dumps(document)
    except (TypeError, orjson.JSONEncodeError):
        return
    for candidate in (body, orjson.dumps({"outputs": document}), orjson.dumps({"outputs": [document]})):
        with contextlib.suppress(InvalidInput):
            codec.decode_response(candidate)


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("000", 0), ("0" * 30 + "86", 86), (" 7\t", 7), ("9" * 19, 10**19 - 1)]
)
def test_decimal_counts_take_leading_zeros_as_http_does(text: str, value: int) -> None:
    assert codec.decimal(text, "Content-Length") == value


@pytest.mark.parametrize("text", ["", "1" + "0" * 19, "+1", "0x1", "\u00b2", "1 2"])
def test_decimal_counts_refuse_anything_else(text: str) -> None:
    with pytest.raises(InvalidInput, match=r"^Content-Length .* is not a non-negative integer in ASCII"):
        codec.decimal(text, "Content-Length")
