"""`appliance platform submit`: one job to the node with the most spare capacity for a model; its answer."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import orjson

from appliance.errors import ApplianceError, InvalidInput, ModelNotReady
from appliance.platform.client import PlatformClient, PoolUnreachable
from appliance.platform.view import NodeView, PoolView
from appliance.pool.topics import NodeTopics, node_filter
from appliance.pool.wire import HEADER_LENGTH, Inbound, Outbound
from appliance.protocol import codec, nonfinite


class JobFailed(ApplianceError):
    """The node answered the job with an error; `status` mirrors HTTP."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Result:
    node: NodeView
    outputs: dict[str, np.ndarray]
    latency_ms: float


def submit(
    client: PlatformClient,
    *,
    root: str,
    model: str,
    inputs: Mapping[str, np.ndarray],
    site: str = "+",
    timeout_s: float = 30.0,
) -> Result:
    """Pick the node (online, fresh report, most spare for `model`), send the job, wait for its answer.

    An unnamed input (key "") takes the model's only input name from the node's birth.
    Raises ModelNotReady when no node has spare capacity, JobFailed with the node's error, and
    PoolUnreachable when the broker or the node does not answer within `timeout_s`.
    """
    view = PoolView(root)
    client.on_message = lambda message, received_s: view.ingest(
        message.topic, message.payload, received_s, message.expiry_s
    )
    client.subscribe(*(node_filter(root, kind, site=site) for kind in ("birth", "state", "capacity")))
    client.sync(root)
    node = view.best(model, time.monotonic())
    if node is None:
        raise ModelNotReady(f"no online node under {root}/{site} reports spare capacity for model {model!r}")
    answer = _exchange(
        client, NodeTopics(root, node.site, node.node), model, _named(inputs, node, model), timeout_s
    )
    return Result(node, *answer)


def _named(inputs: Mapping[str, np.ndarray], node: NodeView, model: str) -> dict[str, np.ndarray]:
    if "" not in inputs:
        return dict(inputs)
    names = [spec["name"] for spec in node.inputs(model)]
    if len(names) != 1:
        raise InvalidInput(f"model {model!r} has inputs {names}; name each one as NAME=FILE.npy")
    return {names[0]: inputs[""]}


def _exchange(
    client: PlatformClient,
    topics: NodeTopics,
    model: str,
    inputs: Mapping[str, np.ndarray],
    timeout_s: float,
) -> tuple[dict[str, np.ndarray], float]:
    correlation = uuid.uuid4().hex
    # Under _reply/ (what the broker ACL lets nodes answer on), one level per job: a node takes the
    # levels before the last, <root>/_reply/<client id>, for this client when it counts jobs per sender.
    reply_topic = f"{topics.root}/_reply/{client.client_id}/{correlation}"
    answered = threading.Event()
    answers: list[Inbound] = []

    def on_message(message: Inbound, _: float) -> None:
        if message.topic == reply_topic and _correlation(message, client.is_v5) == correlation:
            answers.append(message)
            answered.set()

    client.on_message = on_message
    client.subscribe(reply_topic)
    request = codec.encode_request(inputs, binary=client.is_v5, binary_output=client.is_v5)
    message = Outbound(topics.command("infer", model), request.body(), expiry_s=max(1, round(timeout_s)))
    if client.is_v5:
        message.response_topic, message.correlation = reply_topic, correlation.encode()
        if request.header_length is not None:
            message.user[HEADER_LENGTH] = str(request.header_length)
    else:  # MQTT 3.1.1: where to answer travels in the JSON body
        document = orjson.loads(request.body()) | {"reply_to": reply_topic, "corr_id": correlation}
        message.payload = orjson.dumps(document)
    started_s = time.perf_counter()
    client.publish(message)
    if not answered.wait(timeout_s):
        raise PoolUnreachable(f"node {topics.site}/{topics.node} did not answer within {timeout_s:g} s")
    latency_ms = (time.perf_counter() - started_s) * 1e3
    answer = answers[0]
    raw_length = answer.user.get(HEADER_LENGTH)
    header_length = int(raw_length) if raw_length else None
    document = nonfinite.loads(answer.payload[:header_length] if header_length else answer.payload)
    if "error" in document:
        raise JobFailed(
            f"node {topics.site}/{topics.node}: {document['error']}", int(document.get("status", 500))
        )
    return codec.decode_response(answer.payload, header_length), latency_ms


def _correlation(message: Inbound, is_v5: bool) -> str | None:
    if is_v5 and message.correlation is not None:
        return message.correlation.decode(errors="replace")
    try:
        document = orjson.loads(message.payload)
    except orjson.JSONDecodeError:
        return None
    return document.get("corr_id") if isinstance(document, dict) else None
