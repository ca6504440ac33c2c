"""Buyers' JSON that a node would not take from a stranger: the gateway sends large JSON inputs to the
node as binary tensor data and asks large answers of it as binary, then writes the buyer's JSON itself
(platform/forwarding.py), on real parts (mosquitto, an `appliance serve` node, the gateway), plus the
decisions and the job body on their own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import modelzoo
import numpy as np
import orjson
import pytest
from gateway_harness import run_gateway, run_nodes, until
from pool_brokers import Broker
from pool_recorder import Names

from appliance.platform import forwarding
from appliance.pool import signing
from appliance.pool.wire import MAX_JSON_BYTES, MAX_JSON_OUTPUT_ELEMENTS
from appliance.protocol import codec
from appliance.tensors import TensorSpec

WIDTH = 4096  # of any_width's rows: 16 of them are 64K elements, over both of a node's JSON bounds


def document(x: np.ndarray, **parameters: Any) -> dict[str, Any]:
    return {
        "parameters": parameters,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
    }


@pytest.mark.asyncio
async def test_large_json_travels_binary_and_the_buyer_gets_json(
    tmp_path: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    """A JSON request of 16 x 4096 FP32 to y = 2x, s = sum(x) (over a node's MAX_JSON_BYTES) asking its
    answer as JSON (over
    MAX_JSON_OUTPUT_ELEMENTS) is answered 200, in JSON, with what the model computes: the node was sent
    binary tensor data of the same inputs (their digest) and asked binary outputs. A small JSON request
    asking binary outputs travels as it came."""
    repo = tmp_path / "repo"
    manifest = f"[batching]\nmax_batch_size = 16\n[inputs.x]\nshape = [-1, {WIDTH}]\n"
    modelzoo.write(repo, "wide", modelzoo.any_width(), manifest=manifest)
    watcher = await recorder_factory(broker, names, f"{names.root}/{names.site}/+/cmd/#")
    x = np.random.default_rng(7).standard_normal((16, WIDTH)).astype(np.float32)
    big = orjson.dumps(document(x))
    assert len(big) > MAX_JSON_BYTES and x.size > MAX_JSON_OUTPUT_ELEMENTS
    # 16 KB of JSON asking binary outputs: nothing a node would not take (y's width is open in the births,
    # so a JSON answer of it would be asked binary)
    small = orjson.dumps(document(np.zeros((1, WIDTH), np.float32), binary_data_output=True))
    with run_nodes(tmp_path, repo, broker, names, 1) as nodes, run_gateway(broker, names) as gateway:
        offered = lambda: (gateway.node(nodes[0].name) or {}).get("models", {}).get("wide", {})  # noqa: E731
        await until(lambda: offered().get("is_offer_usable"), what="wide offered")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60.0) as client:
            answer = await client.post("/v2/models/wide/infer", content=big)
            assert answer.status_code == 200, answer.text
            assert answer.headers["content-type"].startswith("application/json")
            body = answer.json()
            outputs = {output["name"]: output for output in body["outputs"]}
            assert list(outputs) == ["y", "s"]  # every output, in the model's order, as none was named
            for output in outputs.values():
                assert "binary_data_size" not in output.get("parameters", {})
            assert outputs["y"]["shape"] == [16, WIDTH]
            np.testing.assert_array_equal(
                np.array(outputs["y"]["data"], np.float32).reshape(16, WIDTH), x * 2
            )
            assert set(body["parameters"]) == {"pool_node", "pool_job_id"}
            plain = await client.post("/v2/models/wide/infer", content=small)
            assert plain.status_code == 200, plain.text
    sent = await watcher.expect(lambda m: "/cmd/infer/wide" in m.topic)
    length = sent.user.get(codec.HEADER_LENGTH)
    assert length is not None and int(length) < 1024  # the header alone: the tensor went binary
    job = codec.decode_request(sent.payload, int(length))
    assert job.binary_output and signing.tensor_digest(job.inputs) == signing.tensor_digest({"x": x})
    after = watcher.messages.index(sent) + 1
    as_came = await watcher.expect(lambda m: "/cmd/infer/wide" in m.topic, since=after)
    assert as_came.payload == small and codec.HEADER_LENGTH not in as_came.user


def test_what_travels_binary_is_decided_by_what_a_node_takes_as_json() -> None:
    inputs = json.dumps(document(np.zeros((1, 4), np.float32))).encode()
    decoded = codec.decode_request(inputs)
    small = [TensorSpec("y", "FP32", (-1, 4))]
    assert not forwarding.planned(inputs, None, decoded, small, 1, None, is_batched=True).is_rewritten
    at = [TensorSpec("y", "FP32", (-1, MAX_JSON_OUTPUT_ELEMENTS))]
    assert not forwarding.planned(
        inputs, None, decoded, at, 1, None, is_batched=True
    ).binary_outputs  # 1 row: just at it
    assert forwarding.planned(
        inputs, None, decoded, at, 2, None, is_batched=True
    ).binary_outputs  # 2 rows: over it
    assert forwarding.planned(
        inputs, None, decoded, [TensorSpec("y", "FP32", (-1, -1))], 1, None, is_batched=True
    ).binary_outputs
    assert forwarding.planned(
        inputs, None, decoded, None, 1, None, is_batched=True
    ).binary_outputs  # none declared
    # An open first dimension is rows only where the model batches; else the answer's size is open.
    boxes = [TensorSpec("y", "FP32", (-1, 4))]
    assert not forwarding.planned(inputs, None, decoded, boxes, 1, None, is_batched=True).binary_outputs
    assert forwarding.planned(inputs, None, decoded, boxes, 1, None, is_batched=False).binary_outputs
    text = [TensorSpec("y", "BYTES", (-1, 1))]  # a node bounds text answered as JSON by its bytes
    assert forwarding.planned(inputs, None, decoded, text, 1, None, is_batched=True).binary_outputs
    binary = codec.decode_request(orjson.dumps({**document(np.zeros((1, 4), np.float32)),
                                                "parameters": {"binary_data_output": True}}))  # fmt: skip
    assert not forwarding.planned(
        inputs, None, binary, None, 1, None, is_batched=True
    ).is_rewritten  # nothing as JSON
    padded = inputs[:-1] + b" " * MAX_JSON_BYTES + b"}"
    assert forwarding.planned(
        padded, None, codec.decode_request(padded), small, 1, None, is_batched=True
    ).binary_inputs


def test_a_json_request_goes_to_the_node_as_binary_with_the_same_tensors() -> None:
    """NaN and infinities, BYTES and an input that came binary already: all written from what the gateway
    decoded, in input order, with the header length of the new header; the rest of the header kept."""
    z = np.array([[7, -1]], np.int64)
    text = np.array([b"a", "č".encode()], dtype=object)
    request = {
        "id": "r-1",
        "parameters": {"priority": 0},
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1.5, float("nan"), float("-inf")]},
            {"name": "z", "datatype": "INT64", "shape": [1, 2], "parameters": {"binary_data_size": 16}},
            {"name": "t", "datatype": "BYTES", "shape": [2], "data": ["a", "č"]},
        ],
        "outputs": [{"name": "y"}],
    }
    header = json.dumps(request).encode()  # Python's json writes NaN and -Infinity, as Triton
    decoded = codec.decode_request(header + z.tobytes(), len(header))
    forward = forwarding.Forward(binary_inputs=True, binary_outputs=True)
    sent, length = forwarding.job_body(header + z.tobytes(), len(header), decoded, forward)
    assert length is not None
    job = codec.decode_request(sent, length)
    assert signing.tensor_digest(job.inputs) == signing.tensor_digest(decoded.inputs)
    np.testing.assert_array_equal(job.inputs["t"], text)
    written = orjson.loads(sent[:length])
    assert all("data" not in raw and raw["parameters"]["binary_data_size"] >= 0 for raw in written["inputs"])
    assert [raw["name"] for raw in written["inputs"]] == ["x", "z", "t"]
    assert (job.id, job.binary_output, [o.binary for o in job.outputs or []]) == ("r-1", True, [True])
    assert written["parameters"] == {"priority": 0, "binary_data_output": True}
