"""Triton's classification extension at the pool gateway: nodes compute the outputs, the gateway ranks.

A node's class strings could not be checked: an int8 and an fp32 node write different values, and
canaries, second opinions and referees compare tensors (checks.py). So no node is asked for classes:
forwarding.job_body takes parameters.classification off the request a node is sent, and the node
computes, signs and is checked on the raw tensors exactly as for any job. forwarding.answered ranks the
verified tensors with the box's own code (classification.classified) and writes the buyer Triton's
answer, JSON or binary as asked, with labels from the catalogue, never a node's (nodes are strangers).
Here: what a request's classes will be (`planned`), checked before any node sees it.

Bounds, on the event loop that serves every buyer. The strings are held to MAX_CLASSES, the bound a node
holds the same request to as a pool job: a stranger's answers cost the gateway's loop as a pool job
costs a node's. What the class caps do not bound is the sort (0.3 ms for 4,096 FP32 elements, 190 ms
for a row of 1,000,000, on 2 shared cores): an answer ranks at most MAX_RANKED_ELEMENTS elements in
all, and one of more than forwarding.INLINE_ELEMENTS is ranked on a worker thread (numpy sorts
without the GIL: the loop went on, never held over 1.5 ms, while a thread ranked a million).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance import tensors
from appliance.errors import InvalidInput
from appliance.protocol import classification, codec
from appliance.tensors import DYNAMIC, TensorSpec

MAX_CLASSES = classification.MAX_ANSWERED_CLASSES["pool"]  # strings per answer (256)
MAX_RANKED_ELEMENTS = classification.MAX_CLASSIFIED_ELEMENTS  # Triton's bound per row, here per answer
UNRANKED = ("BOOL", "BYTES")


@dataclass(frozen=True, slots=True)
class Ranking:
    """How one job's classes are made: row by row or whole (`is_batched`), with the catalogue's labels,
    against the outputs the model declares (empty: its births name none)."""

    is_batched: bool
    labels: tuple[str, ...]
    outputs: dict[str, TensorSpec]


def planned(
    model: str,
    decoded: codec.InferenceRequest,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec] | None,
    labels: tuple[str, ...],
    rows: int,
    *,
    batches: bool | None = None,
) -> Ranking:
    """Check a request that asks for classes against the model's outputs before any node sees it (400s
    as the box gives them), and say how its answer will be ranked.

    A batched model's outputs are ranked row by row, as the box ranks them: one whose births say
    max_batch_size > 0 (`batches`), or, where they do not say, one with an input whose first dimension
    is dynamic (the rows credit counts). Where an output's declared shape is static the classes and
    elements it will rank are known now and bounded now; a dynamic one is bounded once answered."""
    is_batched = (
        batches if batches is not None else any(spec.shape and spec.shape[0] == DYNAMIC for spec in inputs)
    )
    declared = {spec.name: spec for spec in outputs or ()}
    classes = elements = 0
    counted: set[str] = set()
    for requested in decoded.outputs or ():
        name = requested.name
        if outputs is not None and name not in declared:
            raise InvalidInput(
                f"unknown output {name!r}; model {model!r} has {', '.join(map(repr, declared))}"
            )
        spec = declared.get(name)
        if not requested.class_count or spec is None or name in counted:
            continue
        counted.add(name)
        if spec.datatype in UNRANKED:
            raise InvalidInput(
                f"output {name!r} is {spec.datatype}; classification ranks numeric outputs only "
                "(integers and floats)"
            )
        has_rows = is_batched and len(spec.shape) > 0
        dims = spec.shape[1:] if has_rows else spec.shape
        if DYNAMIC in dims:
            continue  # known once answered
        row_count = (rows if spec.shape[0] == DYNAMIC else spec.shape[0]) if has_rows else 1
        per_row = tensors.element_count(dims)
        classes += row_count * min(requested.class_count, per_row)
        elements += row_count * per_row
    bounded(classes, elements)
    return Ranking(is_batched, labels, declared)


def bounded(classes: int, elements: int) -> None:
    if classes > MAX_CLASSES:
        raise InvalidInput(
            f"classification would answer {classes} classes (rows x classification, over the outputs); "
            f"at most {MAX_CLASSES} through the pool gateway: ask for fewer classes or rows"
        )
    if elements > MAX_RANKED_ELEMENTS:
        raise InvalidInput(
            f"classification would rank {elements} elements (over the rows and outputs asked as classes); "
            f"the pool gateway ranks at most {MAX_RANKED_ELEMENTS} per request: ask for fewer rows"
        )
