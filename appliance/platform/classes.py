"""Triton's classification extension at the pool gateway: nodes compute the outputs, the gateway ranks.

A node's class strings could not be checked: an int8 and an fp32 node write different values, and
canaries, second opinions and referees compare tensors (checks.py). So no node is asked for classes:
`job_body` takes parameters.classification off the request a node is sent, and the node computes, signs
and is checked on the raw tensors exactly as for any job. `answered` ranks the verified tensors with the
box's own code (classification.classified) and writes the buyer Triton's answer, JSON or binary as
asked, with labels from the catalogue, never a node's (nodes are strangers).

Bounds, on the event loop that serves every buyer. The strings are held to MAX_CLASSES, the bound a node
holds the same request to as a pool job: a stranger's answers cost the gateway's loop as a pool job
costs a node's. What the class caps do not bound is the sort (0.3 ms for 4,096 FP32 elements, 190 ms
for a row of 1,000,000, on 2 shared cores): an answer ranks at most MAX_RANKED_ELEMENTS elements in
all, and one of more than INLINE_ELEMENTS is ranked on a worker thread (numpy sorts without the GIL:
the loop went on, never held over 1.5 ms, while a thread ranked a million).
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

from appliance import tensors
from appliance.errors import InvalidInput
from appliance.platform.attempts import Answer, Job
from appliance.protocol import bulk_json, classification, codec, nonfinite
from appliance.protocol.tensor_data import json_data
from appliance.server.errors import error_response
from appliance.tensors import DYNAMIC, TensorSpec

MAX_CLASSES = classification.MAX_ANSWERED_CLASSES["pool"]  # strings per answer (256)
MAX_RANKED_ELEMENTS = classification.MAX_CLASSIFIED_ELEMENTS  # Triton's bound per row, here per answer
INLINE_ELEMENTS = 4096  # ranked on the loop up to this many elements (at most ~1.3 ms, 256 classes)
# A request header this large (its JSON tensors) is written again for the node on a worker thread: about
# 8 ms a MB of JSON, against 0.1 ms for a binary request's header.
THREAD_HEADER_BYTES = bulk_json.BULK_BYTES
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
    _bounded(classes, elements)
    return Ranking(is_batched, labels, declared)


def _bounded(classes: int, elements: int) -> None:
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


async def sent(
    body: bytes, header_length: int | None, decoded: codec.InferenceRequest
) -> tuple[bytes, int | None]:
    """`job_body`, on a worker thread for a large header."""
    if (len(body) if header_length is None else header_length) < THREAD_HEADER_BYTES:
        return job_body(body, header_length, decoded)
    return await asyncio.to_thread(job_body, body, header_length, decoded)


def job_body(
    body: bytes, header_length: int | None, decoded: codec.InferenceRequest
) -> tuple[bytes, int | None]:
    """The request a node is sent, and its header length: the buyer's, with no output asking for classes
    and each output named once (a node answers a name twice twice, which no answer may hold).

    Binary tensor data is sent on as it came. Inputs given as JSON are written again from the arrays the
    gateway decoded (as the box writes tensors: NaN and Infinity as tokens), so that the node decodes
    exactly them: the job's input digest is still of what the node runs. Everything else in the header
    (id, parameters, binary_data flags) is kept."""
    header = memoryview(body)[:header_length] if header_length is not None else memoryview(body)
    document = nonfinite.loads(header, bulk_json.loads)  # the codec read it: valid, and an object
    for raw in document["inputs"]:
        if "data" in raw:
            raw["data"] = json_data(decoded.inputs[raw["name"]])
    outputs: dict[str, Any] = {}
    for raw in document["outputs"]:
        parameters = {k: v for k, v in (raw.get("parameters") or {}).items() if k != "classification"}
        outputs.setdefault(raw["name"], {**raw, "parameters": parameters})
    document["outputs"] = list(outputs.values())
    written = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if header_length is None:
        return written, None
    return written + body[header_length:], len(written)


async def answered(answer: Answer, job: Job, decoded: codec.InferenceRequest, ranking: Ranking) -> Response:
    """The buyer's answer from the node's verified 200: each output asked as classes ranked, the others as
    the node computed them, in the buyer's order and encoding, with parameters.pool_node and pool_job_id.
    Not the node's pool_signature, which signs the tensors, not these classes (the receipt keeps it).

    InvalidInput (400) for what only the answer shows too large to rank; 502 for an answer without an
    output the buyer asked for, or with an output asked as classes in a datatype the model does not give."""
    proof = answer.proof
    node = answer.node.name
    if proof is None:  # the dispatcher verifies every 200: only verified tensors are ranked
        return error_response(502, f"node {node} sent an answer that was not verified")
    received = proof.outputs
    asked = {r.name: r.class_count for r in decoded.outputs or () if r.class_count}
    for requested in decoded.outputs or ():
        array = received.get(requested.name)
        if array is None:
            return error_response(502, f"node {node} answered without output {requested.name!r}")
        spec = ranking.outputs.get(requested.name)
        got = tensors.oip_datatype(array.dtype)
        if requested.name in asked and spec is not None and got != spec.datatype:
            return error_response(
                502,
                f"node {node} answered output {requested.name!r} as {got}; the model gives {spec.datatype}",
            )
    elements = sum(received[name].size for name in asked)
    _bounded(0, elements)  # the classes are bounded by classified, as it counts them
    version = proof.document.get("model_version")
    head: dict[str, Any] = {
        "model_name": job.model,
        "model_version": version if isinstance(version, str) else "",
    }
    if decoded.id is not None:
        head["id"] = decoded.id
    head["parameters"] = {"pool_node": node, "pool_job_id": job.id}
    write = functools.partial(_written, decoded, received, ranking, head)
    return write() if elements <= INLINE_ELEMENTS else await asyncio.to_thread(write)


def _written(
    decoded: codec.InferenceRequest, received: dict[str, np.ndarray], ranking: Ranking, head: dict[str, Any]
) -> Response:
    outputs = classification.classified(
        decoded, received, is_batched=ranking.is_batched, labels=ranking.labels, max_classes=MAX_CLASSES
    )
    blobs: list[bytes | memoryview] = []
    entries = []
    for requested in decoded.outputs or ():
        binary = decoded.binary_output if requested.binary is None else requested.binary
        entries.append(
            codec.tensor_entry(requested.name, outputs[requested.name], binary=binary, blobs=blobs)
        )
    header = orjson.dumps({**head, "outputs": entries}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return Response(header, media_type=codec.JSON_TYPE)
    headers = {codec.HEADER_LENGTH: str(len(header))}
    return Response(b"".join([header, *blobs]), media_type=codec.BINARY_TYPE, headers=headers)
