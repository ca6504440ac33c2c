"""Checking a node's signed answer: the statement rebuilt from what the gateway knows, then verified.

The gateway trusts only itself for the job id (its own CorrelationData), the input digest (of the
buyer's request as it decoded it) and the output digest (of the answer as it decodes it); the node's
figures (model file, queue and compute ms, session) are taken from its statement, and its signature
must cover all of them with the key the ledger pinned for it.

Two kinds of refusal, because only one of them says who sent the answer. Any peer on the broker may
publish under the gateway's reply topics, so an answer that cannot be decoded, is unsigned, or whose
signature does not verify with the node's key (`Unverified`) may come from anyone: it is noise, and
never held against the node it names. An answer signed with the node's own key that claims what no
honest node can (a file the job may not run on, a session outside 0..2^63-1, a time that is not a
finite number of ms >= 0, queue + compute longer than the gateway saw the job away) is the node's own
word (`Refused`), and is held against it.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from appliance.platform.view import NodeView
from appliance.pool import signing
from appliance.protocol import codec, nonfinite

MAX_SESSION = 2**63 - 1  # the ledger's BIGINT, and far beyond any node's count of connections
MAX_MS = 1e9  # about 11.6 days: any time a node may claim, already far beyond a job's timeout
MAX_CLAIM_CHARS = 256  # a claimed string longer than this is not even verified
MAX_SIGNATURE_CHARS = 128  # an Ed25519 signature in base64 has 88
# queue + compute may exceed the gateway's own send-to-answer time by clock granularity (3-decimal
# rounding on the node) and by two clocks' rates (NTP slews each by at most 0.05%): 1 ms + 1%.
SLACK_MS, SLACK_RATIO = 1.0, 0.01
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Proof:
    """A verified answer: what the node signed, its signature, and the outputs it vouched for."""

    statement: signing.Statement
    signature: str
    outputs: dict[str, np.ndarray]
    document: dict[str, Any]  # the answer's JSON header


class Refused(Exception):
    """The answer, signed with the node's key, cannot be accepted; the message says why (it goes into
    the receipt's detail). `statement` is what the node signed where every field of it can be recorded
    as it is (else None, and the message quotes it), `signature` its signature."""

    def __init__(self, message: str, statement: signing.Statement | None = None, signature: str = "") -> None:
        super().__init__(message)
        self.statement = statement
        self.signature = signature


class Unverified(Refused):
    """The answer cannot be shown to come from the node it names (undecodable, unsigned, badly signed):
    whoever sent it, it is noise, never evidence against that node."""


@lru_cache(maxsize=65536)
def node_key(text: str) -> VerifyKey:
    """A node's public key as its birth states it, for libsodium, which verifies in half the time
    OpenSSL takes (62 against 121 us on the bench box; once per answer, on the event loop). ValueError
    when it is not an Ed25519 public key, or is one that binds nothing: a point of small order (or off
    the prime-order group) has signatures that verify for every message under OpenSSL, so any peer
    could have made them."""
    raw = signing.parse_public_key(text).public_bytes_raw()
    if not crypto_core_ed25519_is_valid_point(raw):
        raise ValueError("it is a point of small order or outside the prime-order group, which binds nothing")
    return VerifyKey(raw)


def _is_signed(key: VerifyKey, canonical: bytes, signature: str) -> bool:
    try:
        key.verify(canonical, base64.b64decode(signature, validate=True))
    except (BadSignatureError, ValueError):  # nacl's ValueError: not 64 bytes; binascii's: not base64
        return False
    return True


def check(
    node: NodeView,
    job_id: str,
    payload: bytes,
    header_length: int | None,
    *,
    input_sha256: str,
    files: frozenset[str] | None,
    latency_ms: float | None = None,
    asked: frozenset[str] | None = None,
) -> Proof:
    """The answer's proof, else Unverified (noise) or Refused (the node's signed word, wrong) naming
    what is wrong. Whatever the node sent, nothing else is raised. `asked`: the outputs the job named
    (None: all), which an honest node answers, no fewer and no more. `latency_ms` is the gateway's own
    send-to-answer time, which the node's queue + compute must fit in (the gateway always gives it;
    None: no such bound, every other one still holds)."""
    key_text = node.trusted_key or node.public_key
    if key_text is None:
        raise Unverified(f"node {node.name} has no device key to verify with")
    try:
        key = node_key(key_text)
    except ValueError as exc:
        raise Unverified(f"node {node.name}'s device key cannot verify anything: {exc}") from None
    try:
        document = nonfinite.loads(payload[:header_length] if header_length is not None else payload)
        outputs = codec.decode_response(payload, header_length)
    except Exception as exc:  # noqa: BLE001 - the codec raises more than ApplianceError on hostile bytes
        raise Unverified(f"the answer cannot be decoded: {type(exc).__name__}: {exc}") from None
    parameters = document.get("parameters") if isinstance(document, dict) else None
    proof = parameters.get("pool_signature") if isinstance(parameters, dict) else None
    if not isinstance(proof, dict):
        raise Unverified("the answer is not signed (no parameters.pool_signature)")
    try:
        claimed = signing.Statement.of(proof)
    except ValueError as exc:
        raise Unverified(str(exc)) from None
    signature = proof.get("signature")
    if not isinstance(signature, str) or len(signature) > MAX_SIGNATURE_CHARS:
        raise Unverified("the answer's pool_signature.signature is not an Ed25519 signature")
    if len(claimed.model_sha256) > MAX_CLAIM_CHARS:
        raise Unverified(f"pool_signature.model_sha256 is over {MAX_CLAIM_CHARS} characters")
    statement = signing.Statement(
        job_id=job_id,
        model_sha256=claimed.model_sha256,
        input_sha256=input_sha256,
        output_sha256=signing.tensor_digest(outputs),
        queue_ms=claimed.queue_ms,
        compute_ms=claimed.compute_ms,
        node=node.node,
        session=claimed.session,
    )
    try:
        canonical = statement.canonical()
        is_signed = _is_signed(key, canonical, signature)
    except (TypeError, ValueError, OverflowError):  # a number or string JSON cannot carry as signed
        is_signed = False
    if not is_signed:
        raise Unverified(f"bad signature: node {node.name}'s key does not sign what the gateway received")
    problem = claims_problem(statement, latency_ms)
    if problem is not None:
        quoted = canonical.removeprefix(signing.CONTEXT).decode()
        raise Refused(f"{problem}; it signed {quoted}", None, signature)
    if asked is not None and set(outputs) != asked:
        raise Refused(
            f"the answer holds outputs {sorted(outputs)[:16]}; the job asked for {sorted(asked)[:16]}",
            statement,
            signature,
        )
    if files is not None and claimed.model_sha256 not in files:
        raise Refused(
            f"the answer comes from model file {claimed.model_sha256}, not one the job may run on "
            f"({', '.join(sorted(files))})",
            statement,
            signature,
        )
    return Proof(statement, signature, outputs, document)


def claims_problem(statement: signing.Statement, latency_ms: float | None) -> str | None:
    """What no honest node signs (None: nothing): what a receipt could not hold as it is, or queue +
    compute longer than the gateway's own send-to-answer time allows."""
    if not 0 <= statement.session <= MAX_SESSION:
        return f"session {statement.session} is outside 0..{MAX_SESSION}"
    if not _DIGEST.fullmatch(statement.model_sha256):
        return "model_sha256 is not 64 lowercase hex digits"
    for name in ("queue_ms", "compute_ms"):
        value = getattr(statement, name)
        if not (math.isfinite(value) and 0 <= value <= MAX_MS):
            return f"{name} {value:g} is not a number of ms from 0 to {MAX_MS:g}"
    claimed_ms = statement.queue_ms + statement.compute_ms
    if latency_ms is not None and claimed_ms > latency_ms * (1 + SLACK_RATIO) + SLACK_MS:
        return (
            f"queue_ms + compute_ms = {claimed_ms:g} ms, longer than the {latency_ms:.3f} ms the gateway "
            f"measured from sending the job to its answer"
        )
    return None
