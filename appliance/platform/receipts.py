"""One receipt per answered job attempt, signed by the gateway that wrote it.

The node signs what it did (pool/signing.py); the gateway signs what it recorded of it: who bought it,
whether it was billed, the verdict and when. Together neither side can deny its part. The gateway's
signed bytes are b"ecp-receipt-v1\\n" followed by the JSON object of every field of `Receipt` below
with sorted keys and no spaces (orjson), Ed25519, base64; its public key is in the ledger's `gateways`
table. `flagged` and `flag_reason` are later annotations (a failed check flags the receipts before
it) and are not signed.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, replace

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.signing import SigningKey

CONTEXT = b"ecp-receipt-v1\n"

BUYER, CANARY, SECOND_OPINION = "buyer", "canary", "second_opinion"
ACCEPTED, REFUSED, LATE = "accepted", "refused", "late_duplicate"
BAD_SIGNATURE = "bad_signature"  # older gateways: unverifiable answers, now noise and not recorded
CANARY_PASSED, CANARY_FAILED = "canary_passed", "canary_failed"
AGREED, DISAGREED, DISPUTED = "agreed", "disagreed", "disputed"


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a gateway records of one answered attempt of a job (the ledger's `receipts` row)."""

    job_id: str  # what the node signed: the attempt's CorrelationData, <job>/<attempt>/<nonce>
    job: str
    attempt: int
    kind: str  # buyer, canary, second_opinion
    billed: bool  # only a buyer's job, once, for the answer the buyer got
    buyer: str
    node: str  # site/node
    session: int
    model: str
    model_sha256: str
    rows: int
    input_sha256: str
    output_sha256: str
    queue_ms: float
    compute_ms: float
    latency_ms: float  # as the gateway measured it, send to answer
    slo_ms: float  # the model's slo_p99_ms, as the node's birth stated it
    slo_met: bool  # queue_ms + compute_ms within slo_ms: the node's share of the time
    node_signature: str
    verdict: str
    detail: str
    gateway: str
    created_ms: int
    gateway_signature: str = ""

    def signed_fields(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in SIGNED}

    def canonical(self) -> bytes:
        return CONTEXT + orjson.dumps(self.signed_fields(), option=orjson.OPT_SORT_KEYS)

    def signed(self, key: Ed25519PrivateKey) -> Receipt:
        return replace(self, gateway_signature=_signature(signer(key), self.signed_fields()))

    @classmethod
    def signed_with(cls, sign: Signer, **fields: object) -> Receipt:
        """The receipt of these fields (every one but gateway_signature), signed by `sign` (`signer`):
        what `signed` gives, built once instead of twice (a receipt per answer)."""
        if fields.keys() != _SIGNED_SET:
            raise TypeError(f"a receipt signs exactly {sorted(_SIGNED_SET)}; got {sorted(fields)}")
        return cls(**fields, gateway_signature=_signature(sign, fields))  # type: ignore[arg-type]


COLUMNS = tuple(Receipt.__dataclass_fields__)
SIGNED = COLUMNS[:-1]  # all but gateway_signature
_SIGNED_SET = frozenset(SIGNED)
Signer = Callable[[bytes], bytes]


def signer(key: Ed25519PrivateKey) -> Signer:
    """The key's Ed25519 signatures, made by libsodium (PyNaCl): 25 us against OpenSSL's 47 here, once
    per receipt on the event loop; the same bytes (Ed25519 signatures are deterministic)."""
    signing_key = SigningKey(key.private_bytes_raw())
    return lambda message: signing_key.sign(message).signature


def _signature(sign: Signer, fields: dict[str, object]) -> str:
    canonical = CONTEXT + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    return base64.b64encode(sign(canonical)).decode("ascii")


def from_row(row: dict[str, object]) -> Receipt:
    """The receipt a ledger row holds (its annotations and id left out)."""
    return Receipt(**{name: row[name] for name in COLUMNS})  # type: ignore[arg-type]


def is_signed_by(receipt: Receipt, public_key: Ed25519PublicKey) -> bool:
    try:
        public_key.verify(base64.b64decode(receipt.gateway_signature, validate=True), receipt.canonical())
    except (InvalidSignature, ValueError):
        return False
    return True
