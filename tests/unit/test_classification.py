"""Triton's classification extension in the codec: parameters.classification read and checked, an
output ranked into "<value>:<index>[:<label>]" strings row by row (batched) or whole, and the answer
carrying, in JSON and binary alike, exactly the tensors `classification.classified` returns."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from shm_objects import shm_object
from tritonclient.http import InferResult

from appliance.dataplane.regions import SharedMemory
from appliance.errors import InvalidInput
from appliance.pool import signing
from appliance.protocol import classification, codec

SCORES = np.array([[1.0, 5.0, 10.0, 4.0], [2.0, 8.0, 0.5, 3.0]], np.float32)


def texts(array: np.ndarray) -> list[Any]:
    """The strings of a BYTES tensor (bytes from the codec and binary data, str from tritonclient's JSON)."""

    def text(item: str | bytes) -> str:
        return item if isinstance(item, str) else item.decode()

    return np.vectorize(text, otypes=[object])(array).tolist()


def request(outputs: list[dict[str, Any]], regions: SharedMemory | None = None) -> codec.InferenceRequest:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0.0]}], "outputs": outputs}
    return codec.decode_request(orjson.dumps(body), regions=regions)


def test_a_batched_output_is_ranked_row_by_row_with_flat_indices_in_each_row() -> None:
    classes = classification.top_classes("y", SCORES, 2, is_batched=True)
    assert classes.dtype == object and classes.shape == (2, 2)
    assert texts(classes) == [["10.000000:2", "5.000000:1"], ["8.000000:1", "3.000000:3"]]
    rows = np.arange(12, dtype=np.float32).reshape(2, 3, 2)  # the rest of the dimensions, flattened
    assert texts(classification.top_classes("y", rows, 1, is_batched=True)) == [
        ["5.000000:5"],
        ["11.000000:5"],
    ]


def test_an_output_of_a_model_without_batching_is_ranked_whole() -> None:
    classes = classification.top_classes("y", SCORES, 3, is_batched=False)
    assert classes.shape == (3,)
    assert texts(classes) == ["10.000000:2", "8.000000:5", "5.000000:1"]


def test_k_is_at_most_the_elements_of_a_row() -> None:
    assert classification.top_classes("y", SCORES, 1000, is_batched=True).shape == (2, 4)
    assert classification.top_classes("y", SCORES, 1000, is_batched=False).shape == (8,)
    assert classification.top_classes("y", np.zeros((0, 4), np.float32), 2, is_batched=True).shape == (0, 2)
    assert texts(classification.top_classes("y", np.array(7.0, np.float32), 3, is_batched=True)) == [
        "7.000000:0"
    ]


def test_labels_are_appended_where_the_model_has_a_non_empty_one_for_the_index() -> None:
    labels = ["cat", "dog", ""]  # index 2: an empty label; index 3: none
    assert texts(classification.top_classes("y", SCORES, 4, is_batched=True, labels=labels)) == [
        ["10.000000:2", "5.000000:1:dog", "4.000000:3", "1.000000:0:cat"],
        ["8.000000:1:dog", "3.000000:3", "2.000000:0:cat", "0.500000:2"],
    ]
    unicode = classification.top_classes("y", SCORES[:1], 1, is_batched=True, labels=["", "", "čaj"])
    assert unicode.tolist() == [["10.000000:2:čaj".encode()]]


def test_equal_values_come_in_index_order_and_nan_after_every_number() -> None:
    scores = np.array([3.0, np.nan, 3.0, -np.inf, 3.0, np.nan, np.inf], np.float64)
    assert texts(classification.top_classes("y", scores, 7, is_batched=False)) == [
        "inf:6", "3.000000:0", "3.000000:2", "3.000000:4", "-inf:3", "nan:1", "nan:5",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        ([0, 2**64 - 1, 7], np.uint64, ["18446744073709551615:1", "7:2", "0:0"]),
        ([-128, 127, 0], np.int8, ["127:1", "0:2", "-128:0"]),
        ([-(2**63), 2**63 - 1, -1], np.int64, ["9223372036854775807:1", "-1:2", "-9223372036854775808:0"]),
        ([0.25, -0.0, 65504.0], np.float16, ["65504.000000:2", "0.250000:0", "-0.000000:1"]),
    ],
)
def test_integers_are_written_as_integers_and_floats_as_c_writes_them(
    values: list[Any], dtype: type, expected: list[str]
) -> None:
    assert texts(classification.top_classes("y", np.array(values, dtype), 3, is_batched=False)) == expected


@pytest.mark.parametrize(
    ("array", "datatype"),
    [
        (np.array([[b"a", b"b"]], dtype=object), "BYTES"),
        (np.array([[True, False]]), "BOOL"),
    ],
)
def test_an_output_without_values_to_rank_is_refused(array: np.ndarray, datatype: str) -> None:
    message = f"^output 'y' is {datatype}; classification ranks numeric outputs only"
    with pytest.raises(InvalidInput, match=message):
        classification.top_classes("y", array, 1, is_batched=True)


def test_a_row_larger_than_triton_ranks_is_refused() -> None:
    wide = np.zeros((1, classification.MAX_CLASSIFIED_ELEMENTS + 1), np.float32)
    with pytest.raises(InvalidInput, match=r"^output 'y' has 1000001 elements per row; .* at most 1000000"):
        classification.top_classes("y", wide, 1, is_batched=True)
    rows = np.zeros((2, classification.MAX_CLASSIFIED_ELEMENTS), np.float32)  # the limit is Triton's: per row
    assert classification.top_classes("y", rows, 1, is_batched=True).shape == (2, 1)
    with pytest.raises(InvalidInput, match=r"^output 'y' has 2000000 elements in all; .* at most 1000000"):
        classification.top_classes("y", rows, 1, is_batched=False)


@pytest.mark.parametrize("value", [-1, 1.5, "2", True, None, [2], classification.MAX_CLASSES + 1])
def test_classification_must_be_an_integer_up_to_the_class_limit(value: Any) -> None:
    """The limit bounds the strings one request makes (each one Python's work, off the loop but still
    holding the interpreter): a pool peer asking for a million classes is refused before any compute."""
    with pytest.raises(InvalidInput, match=r"^output 'y' classification must be an integer from 0 to 1000"):
        request([{"name": "y", "parameters": {"classification": value}}])
    assert request([{"name": "y", "parameters": {"classification": classification.MAX_CLASSES}}]).outputs


def test_classification_zero_or_absent_answers_the_tensor_itself() -> None:
    decoded = request([{"name": "y", "parameters": {"classification": 0}}, {"name": "s"}])
    assert [o.class_count for o in decoded.outputs or []] == [0, 0]
    outputs = {"y": SCORES, "s": SCORES[:, :1]}
    answered = classification.classified(decoded, outputs, is_batched=True)
    assert answered["y"] is SCORES and answered["s"] is outputs["s"]


def test_only_the_outputs_asked_as_classes_are_replaced() -> None:
    decoded = request([{"name": "y", "parameters": {"classification": 1}}, {"name": "s"}])
    outputs = {"y": SCORES, "s": SCORES[:, :1]}
    answered = classification.classified(decoded, outputs, is_batched=True, labels=["a", "b", "c"])
    assert texts(answered["y"]) == [["10.000000:2:c"], ["8.000000:1:b"]]
    assert answered["s"] is outputs["s"] and outputs["y"] is SCORES  # the model's outputs are kept


def test_an_output_asked_twice_with_different_classification_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"^output 'y' is requested twice, with classification 2 and 0"):
        request([{"name": "y", "parameters": {"classification": 2}}, {"name": "y"}])
    same = request([{"name": "y", "parameters": {"classification": 2}}] * 2)
    assert [o.class_count for o in same.outputs or []] == [2, 2]


@pytest.fixture
def regions() -> Iterator[SharedMemory]:
    with shm_object(4096) as obj:
        found = SharedMemory(max_regions=1, max_bytes=1 << 20)
        found.register("out", obj.key, 0, 4096)
        yield found
        found.close()


def test_classes_into_a_shared_memory_region_are_refused_before_compute(regions: SharedMemory) -> None:
    region = {"shared_memory_region": "out", "shared_memory_byte_size": 64, "classification": 2}
    with pytest.raises(InvalidInput, match=r"^output 'y' sets both shared_memory_region and classification"):
        request([{"name": "y", "parameters": region}], regions)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_the_answer_carries_exactly_what_classified_returns(binary: bool) -> None:
    """What the encoder sends and what a node signs come from one call: decoded, the answer digests as
    the classified tensors do, and tritonclient reads the strings Triton would send."""
    decoded = request([{"name": "y", "parameters": {"classification": 2, "binary_data": binary}}])
    answered = classification.classified(decoded, {"y": SCORES}, is_batched=True, labels=["", "dog"])
    encoded = codec.encode_response(model_name="m", model_version="1", request=decoded, outputs=answered)
    received = codec.decode_response(encoded.body(), encoded.header_length)
    assert signing.tensor_digest(received) == signing.tensor_digest({"y": answered["y"]})
    result = InferResult.from_response_body(encoded.body(), header_length=encoded.header_length)
    assert result.get_output("y")["datatype"] == "BYTES" and result.get_output("y")["shape"] == [2, 2]
    assert texts(result.as_numpy("y")) == [
        ["10.000000:2", "5.000000:1:dog"],
        ["8.000000:1:dog", "3.000000:3"],
    ]


def test_an_answer_holds_at_most_so_many_classes_a_pool_job_fewer() -> None:
    """The strings are encoded, and for a pool job digested, on the event loop: their number is bounded
    per answer, more tightly for a stranger's pool job than for the line."""
    decoded = request([{"name": "y", "parameters": {"classification": 3}}])
    rows = np.zeros((100, 8), np.float32)  # 300 classes
    assert classification.classified(decoded, {"y": rows}, is_batched=True)["y"].shape == (100, 3)
    pool = classification.MAX_ANSWERED_CLASSES["pool"]
    with pytest.raises(InvalidInput, match=rf"would answer 300 classes .* at most {pool} for a request of"):
        classification.classified(decoded, {"y": rows}, is_batched=True, max_classes=pool)
    assert (
        classification.classified(decoded, {"y": rows[:85]}, is_batched=True, max_classes=pool)["y"].size
        == 255
    )
