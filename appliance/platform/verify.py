"""Checking a node's signed answer: the statement rebuilt from what the gateway knows, then verified.

The gateway trusts only itself for the job id (its own CorrelationData), the input digest (of the
buyer's request as it decoded it) and the output digest (of the answer as it decodes it); the node's
figures (model file, queue and compute ms, session) are taken from its statement, and its signature
must cover all of them with the key the ledger pinned for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.platform.view import NodeView
from appliance.pool import signing
from appliance.protocol import codec, nonfinite


@dataclass(frozen=True, slots=True)
class Proof:
    """A verified answer: what the node signed, its signature, and the outputs it vouched for."""

    statement: signing.Statement
    signature: str
    outputs: dict[str, np.ndarray]
    document: dict[str, Any]  # the answer's JSON header


class Refused(Exception):
    """The answer cannot be accepted; the message says why (it goes into the receipt's detail), with
    what the node claimed where it could be read."""

    def __init__(self, message: str, statement: signing.Statement | None = None, signature: str = "") -> None:
        super().__init__(message)
        self.statement = statement
        self.signature = signature


@lru_cache(maxsize=65536)
def _key(text: str) -> Ed25519PublicKey:
    return signing.parse_public_key(text)


def check(
    node: NodeView,
    job_id: str,
    payload: bytes,
    header_length: int | None,
    *,
    input_sha256: str,
    files: frozenset[str] | None,
) -> Proof:
    """The answer's proof, or Refused naming what is wrong with it. Whatever the node sent, nothing else
    is raised: an answer that cannot be checked is refused like one that checks wrong."""
    key_text = node.trusted_key or node.public_key
    if key_text is None:
        raise Refused(f"node {node.name} has no device key to verify with")
    try:
        key = _key(key_text)
    except ValueError as exc:
        raise Refused(f"node {node.name}'s device key cannot verify anything: {exc}") from None
    try:
        document = nonfinite.loads(payload[:header_length] if header_length is not None else payload)
        outputs = codec.decode_response(payload, header_length)
    except Exception as exc:  # noqa: BLE001 - the codec raises more than ApplianceError on hostile bytes
        raise Refused(f"the answer cannot be decoded: {type(exc).__name__}: {exc}") from None
    parameters = document.get("parameters") if isinstance(document, dict) else None
    proof = parameters.get("pool_signature") if isinstance(parameters, dict) else None
    if not isinstance(proof, dict):
        raise Refused("the answer is not signed (no parameters.pool_signature)")
    try:
        claimed = signing.Statement.of(proof)
    except ValueError as exc:
        raise Refused(str(exc)) from None
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
    signature = proof.get("signature")
    signature = signature if isinstance(signature, str) else ""
    if not signing.verify(key, statement, signature):
        raise Refused(
            f"bad signature: node {node.name}'s key does not sign what the gateway received",
            statement,
            signature[:100],
        )
    if files is not None and claimed.model_sha256 not in files:
        raise Refused(
            f"the answer comes from model file {claimed.model_sha256}, not one the job may run on "
            f"({', '.join(sorted(files))})",
            statement,
            signature,
        )
    return Proof(statement, signature, outputs, document)
