"""Triton's classification extension (docs/protocol/extension_classification.md): an output requested
with parameters.classification = k is answered as a BYTES tensor of its k highest-valued elements.

The data plane calls `classified` once per answer, off the event loop (ranking and writing the strings
is Python work proportional to what the request asks: a pool peer's request must not stall the line),
and before encoding: the encoders and a pool node's signature (pool/jobs.py) both take what it
returns, so a node signs exactly the tensors it sends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from appliance import tensors
from appliance.errors import InvalidInput


class Requested(Protocol):  # codec.RequestedOutput (codec reads MAX_CLASSES from here, so not imported)
    @property
    def name(self) -> str: ...
    @property
    def class_count(self) -> int: ...


class InferenceRequest(Protocol):  # codec.InferenceRequest
    @property
    def outputs(self) -> Sequence[Requested] | None: ...


# Triton refuses to rank more elements than this in one row (kMaxClassificationElements, its
# src/classification.cc).
MAX_CLASSIFIED_ELEMENTS = 1_000_000
# Classes answered per row: Triton has no such limit, but each is a string made in Python, and ImageNet's
# 1,000 classes all fit. A larger k is refused (400) at decode (codec), before any compute.
MAX_CLASSES = 1_000
# Classes one answer may hold, over its rows and outputs. Ranking runs on a worker thread, but the answer's
# strings are encoded (and, for a pool job, digested to be signed) on the event loop, about 1 us each: a
# line request may ask for up to ~4 ms of that (16 rows of the 16x16 defect map ranked whole), a pool
# job, whose sender is a stranger, for under 0.3 ms.
MAX_ANSWERED_CLASSES = {"line": 4096, "pool": 256}


def is_asked(request: InferenceRequest) -> bool:
    """Whether any requested output asks for its classes (then the data plane calls `classified`)."""
    return any(requested.class_count for requested in request.outputs or ())


def classified(
    request: InferenceRequest,
    outputs: Mapping[str, np.ndarray],
    *,
    is_batched: bool,
    labels: Sequence[str] = (),
    max_classes: int = MAX_ANSWERED_CLASSES["line"],
) -> dict[str, np.ndarray]:
    """The outputs as the answer carries them: each one the request asks classification of replaced by
    its top classes (`top_classes`), the rest as the model answered them. Raises InvalidInput for an
    output that cannot be ranked, and for more than `max_classes` classes in all."""
    asked = [(r.name, r.class_count) for r in request.outputs or () if r.class_count]
    count = sum(_classes(outputs[name], k, is_batched) for name, k in asked)
    if count > max_classes:
        raise InvalidInput(
            f"classification would answer {count} classes (rows x classification, over the outputs); "
            f"at most {max_classes} for a request of this priority: ask for fewer classes or rows"
        )
    answered = dict(outputs)
    for requested in request.outputs or ():
        if requested.class_count:
            answered[requested.name] = top_classes(
                requested.name,
                outputs[requested.name],
                requested.class_count,
                is_batched=is_batched,
                labels=labels,
            )
    return answered


def _classes(array: np.ndarray, class_count: int, is_batched: bool) -> int:
    """How many classes top_classes answers for `array`: rows x min(class_count, elements per row)."""
    has_rows = is_batched and array.ndim > 0
    rows = array.shape[0] if has_rows else 1
    per_row = tensors.element_count(array.shape[1:] if has_rows else array.shape)
    return rows * min(class_count, per_row)


def top_classes(
    name: str, array: np.ndarray, class_count: int, *, is_batched: bool, labels: Sequence[str] = ()
) -> np.ndarray:
    """An output's top classes as Triton's classification extension answers them: a BYTES tensor of
    "<value>:<index>" strings, ":<label>" appended where `labels` has a non-empty one for that index.

    A batched model's output (`is_batched`: its first dimension is the batch) is ranked row by row over
    the rest of its dimensions flattened, giving shape [rows, k]; any other over all its elements, giving
    [k]; k is class_count or the elements in a row, whichever is fewer. The index is the element's flat
    index within its row. Values are written as C's "%f" (floats) or "%d" (integers), as Triton writes
    them. Highest value first; equal values in index order, where Triton leaves their order unspecified;
    NaN below every number, where Triton's comparison leaves it anywhere. Raises InvalidInput for a BOOL
    or BYTES output, which has no values to rank, and for a row of more than MAX_CLASSIFIED_ELEMENTS.
    """
    datatype = tensors.oip_datatype(array.dtype)
    if datatype in ("BOOL", "BYTES"):
        raise InvalidInput(
            f"output {name!r} is {datatype}; classification ranks numeric outputs only (integers and floats)"
        )
    has_rows = is_batched and array.ndim > 0
    rows = array.shape[0] if has_rows else 1
    per_row = tensors.element_count(array.shape[1:] if has_rows else array.shape)
    if per_row > MAX_CLASSIFIED_ELEMENTS:
        raise InvalidInput(
            f"output {name!r} has {per_row} elements {'per row' if has_rows else 'in all'}; classification "
            f"ranks at most {MAX_CLASSIFIED_ELEMENTS} (as Triton)"
        )
    table = array.reshape(rows, per_row)
    # Ascending order of a key that reverses the values' order exactly: -x for floats (NaN stays NaN,
    # which numpy sorts last), ~x for integers (-x would overflow at INT_MIN and wrap for unsigned).
    key = -table if table.dtype.kind == "f" else ~table
    order = np.argsort(key, axis=1, kind="stable")[:, : min(class_count, per_row)]
    values = np.take_along_axis(table, order, axis=1)
    written = "%f" if table.dtype.kind == "f" else "%d"
    classes = np.empty(order.size, dtype=object)
    for position, (value, index) in enumerate(zip(values.flat, order.flat, strict=True)):
        text = f"{written % value}:{index}"
        label = labels[index] if index < len(labels) else ""
        classes[position] = (f"{text}:{label}" if label else text).encode()
    return classes.reshape(order.shape if has_rows else order.shape[1:])
