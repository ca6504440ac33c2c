"""The simdjson path for big JSON tensors decodes exactly what the orjson path does, and refuses the same."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from unittest import mock

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tests_support import JSON_VALUES

from appliance import tensors
from appliance.errors import InvalidInput
from appliance.protocol import bulk_json, codec

NUMERIC = ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]


@contextlib.contextmanager
def bulk(enabled: bool) -> Iterator[None]:
    """Every document through simdjson (threshold 0), or none of them."""
    with mock.patch.object(bulk_json, "BULK_BYTES", 0 if enabled else 1 << 62):
        yield


def decode_both(body: bytes) -> tuple[object, object]:
    """What each path makes of the body: the request, or the InvalidInput message."""
    outcomes = []
    for enabled in (False, True):
        with bulk(enabled):
            try:
                outcomes.append(codec.decode_request(body))
            except InvalidInput as exc:
                outcomes.append(str(exc))
    return outcomes[0], outcomes[1]


@st.composite
def numeric_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = tensors.numpy_dtype(draw(st.sampled_from(NUMERIC)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    elements = None
    if dtype.kind == "f":
        elements = st.floats(allow_nan=False, allow_infinity=False, width=dtype.itemsize * 8)
    return draw(hnp.arrays(dtype, shape, elements=elements))


def test_a_big_image_arrives_as_one_array_not_a_list_of_floats() -> None:
    image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    body = codec.encode_request({"image": image}, binary=False).body()
    assert len(body) > bulk_json.BULK_BYTES
    document = bulk_json.loads(body)
    assert isinstance(document["inputs"][0]["data"], np.ndarray)
    decoded = codec.decode_request(body).inputs["image"]
    assert decoded.dtype == np.float32 and np.array_equal(decoded, image)


@settings(max_examples=300, deadline=None)
@given(array=numeric_arrays(), nested=st.booleans())
def test_both_paths_decode_the_same_request(array: np.ndarray, nested: bool) -> None:
    data = array.tolist() if nested else array.reshape(-1).tolist()
    document = {
        "id": "r",
        "parameters": {"priority": 2, "binary_data_output": True},
        "inputs": [
            {
                "name": "t",
                "datatype": tensors.oip_datatype(array.dtype),
                "shape": list(array.shape),
                "data": data,
            }
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
    }
    plain, fast = decode_both(orjson.dumps(document))
    assert isinstance(plain, codec.InferenceRequest) and isinstance(fast, codec.InferenceRequest)
    assert (fast.id, fast.parameters, fast.outputs) == (plain.id, plain.parameters, plain.outputs)
    got, want = fast.inputs["t"], plain.inputs["t"]
    assert got.dtype == want.dtype and got.shape == want.shape and got.tolist() == want.tolist()


@pytest.mark.parametrize(
    ("data", "datatype"),
    [
        ([1.5, 2], "INT32"),
        ([300, 1], "UINT8"),
        ([-1, 1], "UINT64"),
        ([2**64, 1], "UINT64"),
        ([1, 0], "BOOL"),
        ([1, "a"], "FP32"),
        ([True, False], "FP32"),
        ([None, 1], "FP64"),
        ([1e300, 1], "FP32"),
        ([70000, 1], "FP16"),
        ([1, 2, 3], "FP32"),
        ("text", "FP32"),
    ],
)
def test_both_paths_refuse_bad_data_with_the_same_message(data: object, datatype: str) -> None:
    document = {"inputs": [{"name": "x", "datatype": datatype, "shape": [2], "data": data}]}
    plain, fast = decode_both(json.dumps(document).encode())  # the standard library writes 2**64 too
    assert isinstance(plain, str) and fast == plain


@pytest.mark.parametrize(
    ("data", "shape"),
    [
        (["ab", "\u03b2eta", ""], [3]),
        ([["a", "b"], ["c", "d"]], [2, 2]),
        (["a", 1], [2]),
        (["\ud800", "a"], [2]),  # a lone surrogate, escaped by json.dumps
        ([["a"], "b"], [2]),
    ],
)
def test_both_paths_decode_bytes_data_the_same(data: object, shape: list[int]) -> None:
    document = {"inputs": [{"name": "t", "datatype": "BYTES", "shape": shape, "data": data}]}
    body = json.dumps(document).encode()
    plain, fast = decode_both(body)
    if isinstance(plain, str):
        assert fast == plain
    else:
        assert isinstance(fast, codec.InferenceRequest)
        assert fast.inputs["t"].tolist() == plain.inputs["t"].tolist()


def test_big_bytes_data_arrives_as_bytes_not_strings_then_bytes() -> None:
    """A 2-byte element costs 51 bytes as a str and 35 as bytes: the fast path keeps only the bytes."""
    body = orjson.dumps(
        {"inputs": [{"name": "t", "datatype": "BYTES", "shape": [30_000], "data": ["ab"] * 30_000}]}
    )
    assert len(body) > bulk_json.BULK_BYTES
    data = bulk_json.loads(body)["inputs"][0]["data"]
    assert isinstance(data, list) and data[:2] == [b"ab", b"ab"]
    assert codec.decode_request(body).inputs["t"].tolist() == [b"ab"] * 30_000


def test_ragged_nested_data_is_refused_on_both_paths() -> None:
    # simdjson flattens nested arrays, so the fast path counts values instead of failing on the shape
    body = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3]]}]}
    )
    plain, fast = decode_both(body)
    assert isinstance(plain, str) and "does not fit FP32" in plain
    assert isinstance(fast, str) and "has 3 values; shape [2, 2] needs 4" in fast


def test_invalid_big_json_gets_orjsons_message() -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2,' + b" " * 100_000
    plain, fast = decode_both(body)
    assert isinstance(plain, str) and plain.startswith("request body is not valid JSON") and fast == plain


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES, st.sampled_from(NUMERIC))
def test_arbitrary_json_data_never_crashes_the_fast_path(data: object, datatype: str) -> None:
    try:
        body = orjson.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [1], "data": data}]})
    except (TypeError, orjson.JSONEncodeError):
        return
    with bulk(True), contextlib.suppress(InvalidInput):
        codec.decode_request(body)
