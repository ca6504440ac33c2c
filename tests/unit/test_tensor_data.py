"""Large numeric tensors are written as JSON a slice at a time: the same bytes as one orjson call over the
whole array (nonfinite.fragment's where it holds NaN or an infinity), with the GIL free between slices."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from appliance import tensors
from appliance.protocol import codec, nonfinite, tensor_data
from appliance.protocol.tensor_data import SLICE_ELEMENTS, json_data

NUMPY = orjson.OPT_SERIALIZE_NUMPY
DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
FLOATS = [np.float16, np.float32, np.float64]
# Around the slice boundaries: one past a single slice, an exact multiple, a short last slice.
SIZES = [SLICE_ELEMENTS + 1, 2 * SLICE_ELEMENTS, 3 * SLICE_ELEMENTS + 7]


def one_call(array: np.ndarray) -> bytes:
    """What json_data wrote before slices: one orjson call over the whole flat array, or
    nonfinite.fragment's text where it holds NaN or an infinity."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return orjson.dumps(nonfinite.fragment(flat))
    return orjson.dumps(flat, option=NUMPY)


def written(array: np.ndarray) -> bytes:
    return orjson.dumps(json_data(array), option=NUMPY)


def integers(dtype: type, size: int) -> np.ndarray:
    """Every width's extremes first, then values across its whole range."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(size)
    values = rng.integers(info.min, info.max, size=size, dtype=dtype, endpoint=True)
    values[:2] = [info.min, info.max]
    return values


def floats(dtype: type, size: int) -> np.ndarray:
    """Normal values, then ones of every exponent, subnormals, -0.0 and the extremes."""
    info = np.finfo(dtype)
    rng = np.random.default_rng(size)
    values = rng.standard_normal(size).astype(dtype)
    exponents = rng.integers(info.minexp, info.maxexp - 1, size=size // 2)
    with np.errstate(over="ignore", under="ignore"):
        values[: size // 2] = (rng.uniform(1, 2, size // 2) * 2.0 ** exponents.astype(float)).astype(dtype)
    values[-4:] = [-0.0, info.smallest_subnormal, -info.max, info.tiny]
    return values


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_integers_and_bools_are_written_as_one_call_writes_them(dtype: type, size: int) -> None:
    array = np.random.default_rng(size).random(size) > 0.5 if dtype is np.bool_ else integers(dtype, size)
    assert isinstance(json_data(array), orjson.Fragment)
    assert written(array) == one_call(array)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
def test_floats_are_written_as_one_call_writes_them(dtype: type, size: int) -> None:
    array = floats(dtype, size)
    assert written(array) == one_call(array)


def non_finite_patterns(size: int) -> Iterator[tuple[str, np.ndarray]]:
    """Where NaN and the infinities sit: at either end, on each side of a slice boundary, in one
    slice only, everywhere."""
    edges = [0, SLICE_ELEMENTS - 1, SLICE_ELEMENTS, size - 1]
    for name, where in [
        ("edges", edges),
        ("first-only", [5]),
        ("last-only", [size - 2]),
        ("every-7th", list(range(0, size, 7))),
    ]:
        array = np.linspace(-3, 3, size)
        array[where] = np.resize([np.nan, np.inf, -np.inf], len(where))
        yield name, array
    yield "all-nan", np.full(size, np.nan)
    yield "all-infinite", np.where(np.arange(size) % 2, np.inf, -np.inf)


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: np.dtype(d).name)
def test_non_finite_values_keep_their_tokens_in_every_slice(dtype: type) -> None:
    for name, pattern in non_finite_patterns(2 * SLICE_ELEMENTS + 3):
        array = pattern.astype(dtype)
        text = written(array)
        assert text == one_call(array), name
        assert b"null" not in text, name


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a.reshape(8, -1).T,  # transposed
        lambda a: a[::2],  # strided
        lambda a: a[::-1],  # negative strides
        lambda a: np.asfortranarray(a.reshape(4, 2, -1)),
        lambda a: a.reshape(2, 4, -1)[:, 1:3, ::3],
    ],
    ids=["transposed", "strided", "reversed", "fortran", "sliced-3d"],
)
def test_non_contiguous_arrays_are_written_row_major(view: Any) -> None:
    array = view(np.arange(8 * 3 * SLICE_ELEMENTS, dtype=np.float32) / 7)
    assert array.size > SLICE_ELEMENTS and not array.flags.c_contiguous
    assert written(array) == one_call(array)
    np.testing.assert_array_equal(np.asarray(orjson.loads(written(array)), np.float32), array.reshape(-1))


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(0, np.float32),
        np.zeros((0, SLICE_ELEMENTS + 1), np.int64),  # empty, however wide
        np.array(2.5, np.float32),  # 0-d
        np.array(np.nan, np.float64),
        np.arange(SLICE_ELEMENTS, dtype=np.float32),  # one whole slice
    ],
    ids=["empty", "empty-wide", "0-d", "0-d-nan", "one-slice"],
)
def test_small_arrays_keep_the_one_call_path(array: np.ndarray) -> None:
    is_finite = bool(np.isfinite(array).all())
    with counted_calls() as calls:
        data = json_data(array)
    # The array itself, which orjson writes within the document; nonfinite's text where it holds a token
    assert calls == ([] if is_finite else [array.size])
    assert isinstance(data, np.ndarray if is_finite else orjson.Fragment)
    assert written(array) == one_call(array)


@settings(max_examples=200, deadline=None)
@given(
    array=st.sampled_from(["BOOL", "UINT8", "INT32", "UINT64", "INT64", "FP16", "FP32", "FP64"]).flatmap(
        lambda datatype: hnp.arrays(
            tensors.numpy_dtype(datatype),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9),
            elements=st.floats(width=tensors.numpy_dtype(datatype).itemsize * 8)
            if datatype.startswith("FP")
            else None,
        )
    ),
    slice_elements=st.integers(1, 7),
)
def test_any_array_in_any_slices_is_written_as_one_call_writes_it(
    array: np.ndarray, slice_elements: int
) -> None:
    with mock.patch.object(tensor_data, "SLICE_ELEMENTS", slice_elements):
        assert written(array) == one_call(array)
        assert written(array.T) == one_call(array.T)


def test_a_response_document_is_the_same_bytes() -> None:
    """The whole answer, written around the slices' fragment, as it was written around the array."""
    outputs = {
        "y": floats(np.float32, 2 * SLICE_ELEMENTS + 1).reshape(1, -1),
        "k": integers(np.int64, 3 * SLICE_ELEMENTS),
        "small": np.array([np.inf, 1.5], np.float32),
    }
    request = codec.InferenceRequest(inputs={}, id="r-1")
    sliced = codec.encode_response(model_name="m", model_version="1", request=request, outputs=outputs)
    with mock.patch.object(tensor_data, "SLICE_ELEMENTS", sys.maxsize):
        whole = codec.encode_response(model_name="m", model_version="1", request=request, outputs=outputs)
    assert sliced.parts == whole.parts and sliced.header_length is whole.header_length is None


@contextmanager
def counted_calls() -> Iterator[list[int]]:
    """The sizes of the arrays orjson.dumps is given, while the block runs."""
    calls: list[int] = []
    real = orjson.dumps

    def counting(value: Any, *args: Any, **kwargs: Any) -> bytes:
        text = real(value, *args, **kwargs)
        if isinstance(value, np.ndarray):
            calls.append(value.size)
        return text

    with mock.patch.object(orjson, "dumps", counting):
        yield calls


@pytest.mark.parametrize("dtype", [np.float32, np.int64], ids=["finite", "integers"])
def test_each_orjson_call_writes_one_slice(dtype: type) -> None:
    array = np.arange(5 * SLICE_ELEMENTS + 3).astype(dtype)
    with counted_calls() as calls:
        json_data(array)
    assert calls == [SLICE_ELEMENTS] * 5 + [3]


def test_each_orjson_call_writes_one_slice_with_tokens() -> None:
    array = np.arange(2 * SLICE_ELEMENTS + 1, dtype=np.float64)
    array[SLICE_ELEMENTS] = np.nan
    with counted_calls() as calls:
        json_data(array)
    assert calls == [SLICE_ELEMENTS, SLICE_ELEMENTS, 1]


def test_another_thread_runs_between_slices() -> None:
    """A thread that wants the GIL gets it while a large tensor is being written (after the first slice
    and before the last), which one orjson call over the whole array never lets happen. The other
    thread records how many slices it saw written; the switch interval is cut so that the GIL passes
    often, and the write is tried again (at most 5 times) should the OS not run that thread meanwhile."""
    array = np.random.default_rng(0).standard_normal(40 * SLICE_ELEMENTS).astype(np.float32)
    seen: set[int] = set()
    is_done = threading.Event()
    is_watching = threading.Event()

    def watch() -> None:
        while not is_done.is_set():
            seen.add(len(calls))
            is_watching.set()

    interval_s = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    watcher = threading.Thread(target=watch)
    try:
        with counted_calls() as calls:
            watcher.start()
            assert is_watching.wait(30)
            for _ in range(5):
                calls.clear()
                seen.clear()
                json_data(array)
                total = len(calls)
                if any(0 < count < total for count in seen):
                    break
    finally:
        is_done.set()
        watcher.join(30)
        sys.setswitchinterval(interval_s)
    assert total == 40
    assert any(0 < count < total for count in seen), sorted(seen)
