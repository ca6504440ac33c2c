"""What a node may claim in a signed answer, and who an answer can be held against.

verify.check on real signatures: an answer that cannot be verified is `Unverified` (noise: anyone on the
broker could have sent it), one the node's own key signed but that claims what no honest node can is
`Refused` (the node's word), and nothing else is ever raised.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import orjson
import pytest

from appliance.platform.verify import Refused, Unverified, check
from appliance.platform.view import NodeView
from appliance.pool import identity, signing
from appliance.protocol import codec

KEY = identity.generate()
X, Y = np.arange(4, dtype=np.float32).reshape(1, 4), np.ones((1, 4), np.float32)
INPUT_SHA = signing.tensor_digest({"x": X})


def node() -> NodeView:
    view = NodeView("s", "n1", needs_key=True, birth={"public_key": signing.public_key_text(KEY)})
    view.trusted_key = view.public_key
    return view


def answer(key: Any = KEY, signature: str | None = None, **claims: Any) -> bytes:
    """A JSON answer whose pool_signature the node's key signed over `claims` (NaN and infinities are
    written as the tokens a Triton-style JSON writer uses; the key signs orjson's null for them)."""
    body = codec.encode_request({"x": X}, binary=False, binary_output=False).body()
    encoded = codec.encode_response(
        model_name="m", model_version="1", request=codec.decode_request(body), outputs={"y": Y}
    )
    fields = {
        "job_id": "j/0/nonce", "model_sha256": "a" * 64, "input_sha256": INPUT_SHA,
        "output_sha256": signing.tensor_digest({"y": Y}), "queue_ms": 0.5, "compute_ms": 2.0,
        "node": "n1", "session": 3,
    } | claims  # fmt: skip
    statement = signing.Statement(**fields)
    signature = signature or signing.sign(key, statement)
    payload = signing.attach(encoded.body(), {**statement.fields(), "signature": signature})
    for name in ("queue_ms", "compute_ms"):
        value = fields[name]
        if isinstance(value, float) and not math.isfinite(value):
            token = b"NaN" if math.isnan(value) else (b"Infinity" if value > 0 else b"-Infinity")
            payload = payload.replace(f'"{name}":null'.encode(), f'"{name}":'.encode() + token, 1)
    return payload


def checked(payload: bytes, latency_ms: float | None = 50.0) -> Any:
    return check(
        node(), "j/0/nonce", payload, None, input_sha256=INPUT_SHA, files=None, latency_ms=latency_ms
    )


def test_claims_in_bounds_and_within_the_gateways_own_latency_are_accepted() -> None:
    assert checked(answer()).statement.session == 3
    # queue + compute may pass the measured latency by clock granularity: 1 ms + 1%
    assert checked(answer(queue_ms=0.0, compute_ms=51.4), latency_ms=50.0).statement.compute_ms == 51.4
    assert checked(answer(session=0, queue_ms=0, compute_ms=0)).statement.session == 0
    assert checked(answer(session=2**63 - 1)).statement.session == 2**63 - 1


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"session": 2**63}, "session 9223372036854775808 is outside 0..9223372036854775807"),
        ({"session": -1}, "session -1 is outside"),
        ({"queue_ms": math.nan}, "queue_ms nan is not a number of ms from 0 to 1e+09"),
        ({"compute_ms": math.inf}, "compute_ms inf is not a number of ms"),
        ({"queue_ms": -1e12, "compute_ms": 1e12}, "queue_ms -1e+12 is not a number of ms"),
        ({"compute_ms": 1e12}, "compute_ms 1e+12 is not a number of ms"),
        ({"compute_ms": 60_000.0}, "queue_ms + compute_ms = 60000.5 ms, longer than the 50.000 ms"),
        ({"queue_ms": 40.0, "compute_ms": 12.0}, "queue_ms + compute_ms = 52 ms, longer than"),
        ({"model_sha256": "a" * 65}, "model_sha256 is not 64 lowercase hex digits"),
        ({"model_sha256": "A" * 64}, "model_sha256 is not 64 lowercase hex digits"),
    ],
    ids=[
        "session-2^63", "session-negative", "queue-nan", "compute-inf", "negative-queue",
        "compute-huge", "compute-past-latency", "sum-past-latency", "sha-65", "sha-upper",
    ],
)  # fmt: skip
def test_what_no_honest_node_signs_is_refused_as_the_nodes_own_word(claims: dict[str, Any], why: str) -> None:
    with pytest.raises(Refused) as refused:
        checked(answer(**claims))
    assert not isinstance(refused.value, Unverified), refused.value
    assert why in str(refused.value)
    # None of its figures reach a receipt as they are; the detail quotes what it signed, and the
    # signature (verified) goes with it.
    assert refused.value.statement is None and len(refused.value.signature) == 88
    assert '"job_id":"j/0/nonce"' in str(refused.value)


def test_an_answer_that_cannot_be_verified_is_noise_whatever_it_claims() -> None:
    huge = b'"session":' + b"9" * 30  # read by Python's json (the NaN is why): no 64-bit integer
    noise = {
        "another key": answer(identity.generate(), session=2**63, compute_ms=1e12),
        "a signature too long to be one": answer(signature="A" * 200),
        "a file name no digest has": answer(model_sha256="a" * 300),
        "a session JSON cannot sign": answer(queue_ms=math.nan).replace(b'"session":3', huge),
        "a lone surrogate": answer().replace(b'"' + b"a" * 64 + b'"', b'"\\ud800"', 1),
        "another attempt's job id": answer(job_id="j/1/nonce"),
        "unsigned": orjson.dumps({"model_name": "m", "outputs": []}),
        "undecodable": b"[]",
    }  # fmt: skip
    for what, payload in noise.items():
        try:
            checked(payload)
        except Unverified:
            continue
        except Exception as exc:  # noqa: BLE001 - the test names what was raised instead
            pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
        pytest.fail(f"{what}: accepted")


def test_without_a_latency_the_other_bounds_still_hold() -> None:
    assert checked(answer(compute_ms=60_000.0), latency_ms=None).statement.compute_ms == 60_000.0
    with pytest.raises(Refused, match="session"):
        checked(answer(session=2**63), latency_ms=None)


def test_an_answer_holds_exactly_the_outputs_its_job_asked_for() -> None:
    """Signed by the node's key but with another output than the one asked (or more of them): the
    node's word, refused, so that the job moves on and nobody is billed for it; no asked outputs: any."""
    payload = answer()  # it holds y
    assert checked(payload).outputs.keys() == {"y"}
    assert set(check(node(), "j/0/nonce", payload, None, input_sha256=INPUT_SHA, files=None,
                     asked=frozenset({"y"})).outputs) == {"y"}  # fmt: skip
    for asked in ({"z"}, {"y", "s"}):
        with pytest.raises(Refused, match=r"the answer holds outputs \['y'\]; the job asked for") as caught:
            check(
                node(), "j/0/nonce", payload, None, input_sha256=INPUT_SHA, files=None, asked=frozenset(asked)
            )
        assert not isinstance(caught.value, Unverified) and caught.value.statement is not None


def test_a_key_of_small_order_verifies_nothing() -> None:
    """The identity point as a node's key, and the signature (R = identity, S = 0) that OpenSSL accepts
    for it over every message: whoever sent it, it binds no node, so it is noise."""
    identity_point = bytes([1]) + bytes(31)
    weak = NodeView(
        "s",
        "n1",
        needs_key=True,
        birth={"public_key": "ed25519:" + base64.b64encode(identity_point).decode()},
    )
    weak.trusted_key = weak.public_key
    forged = base64.b64encode(identity_point + bytes(32)).decode()
    with pytest.raises(Unverified, match="small order"):
        check(weak, "j/0/nonce", answer(signature=forged), None, input_sha256=INPUT_SHA, files=None)
