"""Simulated pool nodes on a real broker: each publishes a birth (with its own Ed25519 key), state and an
offer for model `sim`, and answers the jobs it is sent as a test tells it to: honestly signed, with any
figures signed, or with whatever bytes under whatever CorrelationData a hostile node might send."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from pool_brokers import Broker
from pool_recorder import Names, Received, Recorder

from appliance.pool import identity, signing
from appliance.protocol import codec

MODEL, SHA = "sim", "5" * 64
SPEC = {"datatype": "FP32", "shape": [-1, 4]}
INFER = f"/v2/models/{MODEL}/infer"


def buyer_body(seed: int, rows: int = 1) -> bytes:
    x = np.random.default_rng(seed).random((rows, 4), dtype=np.float32)
    return codec.encode_request({"x": x}, binary=False, binary_output=False).body()


@dataclass
class SimNode:
    name: str
    recorder: Recorder
    base: str
    key: Any = field(default_factory=identity.generate)
    session: int = 7
    seen: int = 0  # messages already taken as jobs

    @classmethod
    async def start(
        cls, recorder_factory: Any, broker: Broker, names: Names, name: str, *, spare: float, **login: str
    ) -> SimNode:
        """Connected (as user `login["username"]` where given), subscribed to its cmd/, announced."""
        mine = Names(names.root, names.site, name)
        recorder = await recorder_factory(broker, mine, f"{mine.base}/cmd/#", **login)
        node = cls(name, recorder, mine.base)
        models = {MODEL: {"sha256": SHA, "precision": "fp32", "provider": "cpu", "slo_p99_ms": 100.0,
                          "inputs": [{"name": "x", **SPEC}], "outputs": [{"name": "y", **SPEC}]}}  # fmt: skip
        key = signing.public_key_text(node.key)
        recorder.publish(
            f"{node.base}/birth", {"session": node.session, "seq": 0, "models": models, "public_key": key}
        )
        recorder.publish(
            f"{node.base}/state", {"session": node.session, "seq": 1, "state": "online", "reason": ""}
        )
        offer = {"spare_ips_at_slo": spare, "max_ips_at_slo": spare, "served_ips": 0.0,
                 "accepts_pool_jobs": True, "slo_p99_ms": 100.0}  # fmt: skip
        report = {"session": node.session, "seq": 2, "valid_for_s": 600, "models": {MODEL: offer}}
        recorder.publish(f"{node.base}/capacity", report)
        return node

    async def job(self) -> Received:
        """The next job sent to this node."""
        found = await self.recorder.expect(lambda m: "/cmd/infer/" in m.topic, since=self.seen, timeout_s=60)
        self.seen = self.recorder.messages.index(found) + 1
        return found

    def reply(self, job: Received, payload: bytes, status: int, correlation: bytes | None = None) -> None:
        """Publish `payload` as an answer to `job` (under `correlation` instead of the job's, if given)."""
        self.recorder.publish(
            job.response_topic or "",
            payload,
            correlation=job.correlation if correlation is None else correlation,
            user={"status": str(status)},
        )

    def answer(self, job: Received, **claims: Any) -> None:
        """The job's right outputs (2x + 1), signed with this node's key over `claims` (its figures: a
        NaN is written as the token a Triton-style JSON writer uses; the key signs orjson's null)."""
        request = codec.decode_request(job.payload, None)
        outputs = {"y": request.inputs["x"] * 2 + 1}
        encoded = codec.encode_response(model_name=MODEL, model_version="1", request=request, outputs=outputs)
        fields = {
            "job_id": signing.job_id(job.correlation, None, request.id),
            "model_sha256": SHA,
            "input_sha256": signing.tensor_digest(request.inputs),
            "output_sha256": signing.tensor_digest(outputs),
            "queue_ms": 0.0,
            "compute_ms": 0.01,
            "node": self.name,
            "session": self.session,
        } | claims
        statement = signing.Statement(**fields)
        payload = signing.attach(
            encoded.body(), {**statement.fields(), "signature": signing.sign(self.key, statement)}
        )
        for name, value in claims.items():
            if isinstance(value, float) and math.isnan(value):
                payload = payload.replace(f'"{name}":null'.encode(), f'"{name}":NaN'.encode(), 1)
        self.reply(job, payload, 200)

    async def serve(self, **claims: Any) -> None:
        """Answer every job it is sent, at once, signed over `claims` (until cancelled)."""
        while True:
            self.answer(await self.job(), **claims)


def refusal(retry_after_s: float) -> bytes:
    return orjson.dumps({"error": "busy", "status": 503, "retry_after_s": retry_after_s})
