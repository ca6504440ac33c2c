"""A real node signs every job answer with the key its birth announces, over what a platform recomputes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from pool_brokers import Broker
from pool_recorder import Names, ask, pool_section, validate

from appliance.pool import signing
from appliance.protocol import codec


def statement_from(answer: Any, inputs: dict[str, np.ndarray], job_id: str) -> tuple[signing.Statement, str]:
    """The statement as a platform rebuilds it: digests of its own inputs and of the decoded outputs."""
    length = answer.user.get(codec.HEADER_LENGTH)
    header_length = int(length) if length else None
    header = orjson.loads(answer.payload[:header_length] if header_length else answer.payload)
    proof = header["parameters"]["pool_signature"]
    outputs = codec.decode_response(answer.payload, header_length)
    statement = signing.Statement(
        job_id=job_id,
        model_sha256=proof["model_sha256"],
        input_sha256=signing.tensor_digest(inputs),
        output_sha256=signing.tensor_digest(outputs),
        queue_ms=proof["queue_ms"],
        compute_ms=proof["compute_ms"],
        node=proof["node"],
        session=proof["session"],
    )
    return statement, proof["signature"]


@pytest.mark.asyncio
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_every_answer_is_signed_with_the_birth_key_over_recomputable_digests(
    serve: Any, pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any, binary: bool
) -> None:
    recorder = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names)):
        birth = await recorder.node("birth")
        public_key = signing.parse_public_key(birth["public_key"])
        # Values that are not short decimals: the JSON answer must still hash like the binary one.
        x = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
        encoded = codec.encode_request(
            {"x": x}, binary=binary, binary_output=binary, parameters={"timeout": 30_000_000}
        )
        user = {} if encoded.header_length is None else {codec.HEADER_LENGTH: str(encoded.header_length)}
        answer = await ask(recorder, names, "infer/batchable", encoded.body(), user=user, expiry_s=30)
        validate("job_response", answer.document)
        job_id = signing.job_id(answer.correlation, None, None)
        assert job_id.startswith("hex:")  # the test's CorrelationData is 16 random bytes
        statement, signature = statement_from(answer, {"x": x}, job_id)
        assert signing.verify(public_key, statement, signature)
        proof = answer.document["parameters"]["pool_signature"]
        assert proof["job_id"] == job_id and proof["node"] == names.node
        assert proof["model_sha256"] == birth["models"]["batchable"]["sha256"]
        assert proof["session"] == birth["session"]
        assert proof["compute_ms"] > 0
        # Break it on purpose: another input, another job id, or a changed output does not verify.
        other = {"x": x + np.float32(1)}
        assert not signing.verify(public_key, statement_from(answer, other, job_id)[0], signature)
        assert not signing.verify(public_key, statement_from(answer, {"x": x}, "hex:00")[0], signature)
        length = answer.user.get(codec.HEADER_LENGTH)
        y = codec.decode_response(answer.payload, int(length) if length else None)["y"].copy()
        y[0, 0] += np.float32(1e-3)
        changed = signing.Statement(
            **{**statement.fields(), "output_sha256": signing.tensor_digest({"y": y})}
        )
        assert not signing.verify(public_key, changed, signature)
