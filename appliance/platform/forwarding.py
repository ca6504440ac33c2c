"""What a node is sent for a buyer's job, and what the buyer gets back, where either differs from the
buyer's own request and the node's own answer.

Most jobs travel as the buyer sent them and come back as the node answered (api._response adds
parameters.pool_node and pool_job_id). Three kinds do not:

- Classification (classes.py): no node is asked for classes, which no check could compare; the node
  computes the tensors and the gateway ranks them.
- JSON a node would not parse: a node parses at most pool.wire.MAX_JSON_BYTES of a stranger's JSON
  (a parse holds its GIL, and its line waits). The gateway has parsed the buyer's request already, so
  it sends such inputs to the node as binary tensor data, written from the arrays it decoded: the job's
  input digest is of exactly what the node runs.
- JSON answers a node would not write: a node writes at most pool.wire.MAX_JSON_OUTPUT_ELEMENTS tensor
  elements as JSON for a stranger. Where the buyer's JSON outputs could pass that (their declared shapes
  say so, or leave it open), the node is asked for binary outputs and the gateway writes the buyer's JSON.

In each case `job_body` is what the node is sent, with every input as binary tensor data (JSON written
again from decoded numbers is longer: "1" comes back "1.0", FP16's "0.1" "0.099975586", and could pass
the node's bound where the buyer's did not), and `answered` writes the buyer's answer from the tensors
the gateway verified (never from anything else the node wrote).
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
from appliance.platform import classes
from appliance.platform.attempts import Answer, Job
from appliance.pool.wire import MAX_JSON_BYTES, MAX_JSON_OUTPUT_ELEMENTS
from appliance.protocol import bulk_json, classification, codec, nonfinite
from appliance.server.errors import error_response
from appliance.tensors import DYNAMIC, TensorSpec

# A request header this large (its JSON tensors) is written again for the node on a worker thread: about
# 8 ms a MB of JSON, against 0.1 ms for a binary request's header.
THREAD_HEADER_BYTES = bulk_json.BULK_BYTES
# The buyer's answer is written on a worker thread past this many elements (ranked, or written as JSON).
INLINE_ELEMENTS = 4096


@dataclass(frozen=True, slots=True)
class Forward:
    """How a job differs on its way: inputs sent binary, outputs asked binary, classes ranked here."""

    binary_inputs: bool = False
    binary_outputs: bool = False
    ranking: classes.Ranking | None = None

    @property
    def is_rewritten(self) -> bool:
        return self.binary_inputs or self.binary_outputs or self.ranking is not None


def planned(
    body: bytes,
    header_length: int | None,
    decoded: codec.InferenceRequest,
    outputs: list[TensorSpec] | None,
    rows: int,
    ranking: classes.Ranking | None,
    *,
    is_batched: bool,
) -> Forward:
    """How the job travels: see the module docstring. `outputs` are the model's declared outputs (None:
    its births name none; needed only where `asks_json` or classes are asked), `rows` the job's,
    `is_batched` whether the model batches (its outputs' open first dimension is then the rows)."""
    json_bytes = len(body) if header_length is None else header_length
    binary_inputs = json_bytes > MAX_JSON_BYTES
    binary_outputs = ranking is not None or (
        asks_json(decoded) and _json_answer_may_pass(decoded, outputs, rows, is_batched)
    )
    return Forward(binary_inputs, binary_outputs, ranking)


def asks_json(decoded: codec.InferenceRequest) -> bool:
    """Whether the buyer asks any output answered as JSON (every output, when it names none)."""
    if not decoded.outputs:
        return not decoded.binary_output
    return any(not (decoded.binary_output if r.binary is None else r.binary) for r in decoded.outputs)


def _json_answer_may_pass(
    decoded: codec.InferenceRequest, outputs: list[TensorSpec] | None, rows: int, is_batched: bool
) -> bool:
    """Whether the elements the buyer asks as JSON could be more than a node writes as JSON for a
    stranger: more by the declared shapes (an open first dimension counted as the job's rows where the
    model batches), or unknown (another open dimension, an output the births do not declare, text, which
    a node bounds by its bytes)."""
    declared = {spec.name: spec for spec in outputs or ()}
    wanted = decoded.outputs or [codec.RequestedOutput(name) for name in declared]
    if not wanted:  # no output asked and none declared: the answer's size is unknown
        return not decoded.binary_output
    elements = 0
    for requested in wanted:
        binary = decoded.binary_output if requested.binary is None else requested.binary
        if binary:
            continue
        spec = declared.get(requested.name)
        if spec is None or spec.datatype == "BYTES":  # text: bounded in bytes at the node, unknown here
            return True
        has_rows = is_batched and len(spec.shape) > 0 and spec.shape[0] == DYNAMIC
        if DYNAMIC in (spec.shape[1:] if has_rows else spec.shape):
            return True
        dims = (rows, *spec.shape[1:]) if has_rows else spec.shape
        elements += tensors.element_count(dims)
    return elements > MAX_JSON_OUTPUT_ELEMENTS


async def sent(
    body: bytes, header_length: int | None, decoded: codec.InferenceRequest, forward: Forward
) -> tuple[bytes, int | None]:
    """`job_body`, on a worker thread for a large header."""
    if (len(body) if header_length is None else header_length) < THREAD_HEADER_BYTES:
        return job_body(body, header_length, decoded, forward)
    return await asyncio.to_thread(job_body, body, header_length, decoded, forward)


def job_body(
    body: bytes, header_length: int | None, decoded: codec.InferenceRequest, forward: Forward
) -> tuple[bytes, int | None]:
    """The request a node is sent, and its header length: the buyer's, with no output asking for classes,
    each output named once, every input as binary tensor data written from the arrays the gateway
    decoded (so that the node decodes exactly them: the job's input digest is of what the node runs),
    and outputs asked as binary where `forward.binary_outputs`. Everything else in the header (id,
    parameters) is kept. InvalidInput for a header orjson will not write again (nested past its 254
    levels, which the codec reads)."""
    header = memoryview(body)[:header_length] if header_length is not None else memoryview(body)
    document = nonfinite.loads(header, bulk_json.loads)  # the codec read it: valid, and an object
    blobs: list[bytes | memoryview] = []
    for raw in document["inputs"]:
        raw.pop("data", None)
        blob = tensors.to_bytes(decoded.inputs[raw["name"]])
        raw["parameters"] = {**(raw.get("parameters") or {}), "binary_data_size": len(blob)}
        blobs.append(blob)
    answers: dict[str, Any] = {}
    for raw in document.get("outputs") or ():
        parameters = {k: v for k, v in (raw.get("parameters") or {}).items() if k != "classification"}
        if forward.binary_outputs:
            parameters["binary_data"] = True
        answers.setdefault(raw["name"], {**raw, "parameters": parameters})
    if "outputs" in document:
        document["outputs"] = list(answers.values())
    if forward.binary_outputs:
        parameters = document.get("parameters") if isinstance(document.get("parameters"), dict) else {}
        document["parameters"] = {**parameters, "binary_data_output": True}
    try:
        written = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:  # orjson's recursion limit: parameters nested deeper than it writes
        raise InvalidInput(
            f"the request cannot be sent on to a node: {exc} (parameters nested too deeply)"
        ) from None
    return b"".join([written, *blobs]), len(written)


async def answered(answer: Answer, job: Job, decoded: codec.InferenceRequest, forward: Forward) -> Response:
    """The buyer's answer from the node's verified 200: each output the buyer asked for (every one the
    node answered when it asked none), ranked where it asked classes, in the buyer's order and encoding,
    with parameters.pool_node and pool_job_id. Not the node's pool_signature, which signs the tensors
    the node sent, not what the buyer gets (the receipt keeps it).

    InvalidInput (400) for classes that only the answer shows too many to rank; 502 for an answer without
    an output the buyer asked for, or with an output asked as classes in a datatype the model does not
    give."""
    proof = answer.proof
    node = answer.node.name
    if proof is None:  # the dispatcher verifies every 200: only verified tensors are written
        return error_response(502, f"node {node} sent an answer that was not verified")
    received = proof.outputs
    ranking = forward.ranking
    asked = {r.name: r.class_count for r in decoded.outputs or () if r.class_count}
    for requested in decoded.outputs or ():
        array = received.get(requested.name)
        if array is None:
            return error_response(502, f"node {node} answered without output {requested.name!r}")
        spec = ranking.outputs.get(requested.name) if ranking is not None else None
        got = tensors.oip_datatype(array.dtype)
        if requested.name in asked and spec is not None and got != spec.datatype:
            return error_response(
                502,
                f"node {node} answered output {requested.name!r} as {got}; the model gives {spec.datatype}",
            )
    if ranking is not None:
        classes.bounded(0, sum(received[name].size for name in asked))  # classes: classified counts them
    version = proof.document.get("model_version")
    head: dict[str, Any] = {
        "model_name": job.model,
        "model_version": version if isinstance(version, str) else "",
    }
    if decoded.id is not None:
        head["id"] = decoded.id
    head["parameters"] = {"pool_node": node, "pool_job_id": job.id}
    write = functools.partial(_written, decoded, received, ranking, head)
    elements = sum(array.size for array in received.values())
    return write() if elements <= INLINE_ELEMENTS else await asyncio.to_thread(write)


def _written(
    decoded: codec.InferenceRequest,
    received: dict[str, np.ndarray],
    ranking: classes.Ranking | None,
    head: dict[str, Any],
) -> Response:
    outputs = received
    if ranking is not None:
        outputs = classification.classified(
            decoded,
            received,
            is_batched=ranking.is_batched,
            labels=ranking.labels,
            max_classes=classes.MAX_CLASSES,
        )
    blobs: list[bytes | memoryview] = []
    entries = []
    for requested in codec.wanted_outputs(decoded, outputs):
        binary = decoded.binary_output if requested.binary is None else requested.binary
        entries.append(
            codec.tensor_entry(requested.name, outputs[requested.name], binary=binary, blobs=blobs)
        )
    header = orjson.dumps({**head, "outputs": entries}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return Response(header, media_type=codec.JSON_TYPE)
    headers = {codec.HEADER_LENGTH: str(len(header))}
    return Response(b"".join([header, *blobs]), media_type=codec.BINARY_TYPE, headers=headers)
