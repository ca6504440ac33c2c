"""Signed answers: the canonical bytes a node signs for each pool job, tensor digests, Ed25519 keys.

The node signs, the platform verifies; both build the same bytes from the same fields, so this module is
part of the wire contract.

Tensor digest (`input_sha256`, `output_sha256`): SHA-256 over the tensors sorted by name, each as
    u32 len(name) | name (UTF-8) | u32 len(datatype) | datatype (ASCII) | u32 rank | u64 dim ... |
    u64 len(data) | data
with every integer little-endian and `data` the tensor's raw little-endian bytes (BYTES tensors in the
binary form of Triton's extension: a u32 length before each element). JSON or binary on the wire, the
digest is the same: it is taken over the decoded tensors.

Signed bytes: b"ecp-answer-v1\\n" followed by the JSON object of the eight fields below with sorted keys
and no spaces (orjson's output): compute_ms, input_sha256, job_id, model_sha256, node, output_sha256,
queue_ms, session. The signature is Ed25519 over those bytes, base64 (standard alphabet, padded).

`job_id` is the job's MQTT 5 CorrelationData as UTF-8 text (the gateway sends `<job>/<attempt>/<nonce>`;
`hex:` + its hex digits when it is not UTF-8), the 3.1.1 `corr_id` as text, else the request's `id`.
`queue_ms` and `compute_ms` are the node's own figures, in milliseconds rounded to 3 decimals; `node`
is the node id and `session` the pool session the answer is sent in. Only successful answers (status
200) are signed: the eight fields and `signature` travel as `parameters.pool_signature` at the top of
the response's JSON header, so they survive whichever encoding carried the outputs.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance import tensors

CONTEXT = b"ecp-answer-v1\n"
KEY_PREFIX = "ed25519:"


def tensor_digest(named: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of the tensors, independent of how they travelled (see the module docstring)."""
    digest = hashlib.sha256()
    for name in sorted(named):
        array = named[name]
        datatype = tensors.oip_datatype(array.dtype).encode("ascii")
        data = tensors.to_bytes(np.ascontiguousarray(array))  # a view: hashed where it lies, not copied
        encoded = name.encode("utf-8")
        digest.update(struct.pack("<I", len(encoded)) + encoded)
        digest.update(struct.pack("<I", len(datatype)) + datatype)
        digest.update(struct.pack(f"<I{array.ndim}Q", array.ndim, *array.shape))
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Statement:
    """What a node vouches for in one answer."""

    job_id: str
    model_sha256: str
    input_sha256: str
    output_sha256: str
    queue_ms: float
    compute_ms: float
    node: str
    session: int

    def fields(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in FIELD_TYPES}  # flat: no need for asdict's deep copy

    def canonical(self) -> bytes:
        return CONTEXT + orjson.dumps(self.fields(), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def of(cls, proof: Mapping[str, object]) -> Statement:
        """The statement in a `pool_signature` object; ValueError naming a missing or mistyped field."""
        fields = {}
        for name, kind in FIELD_TYPES.items():
            value = proof.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"pool_signature.{name} is {value!r}; expected {kind}")
            fields[name] = value
        return cls(**fields)  # type: ignore[arg-type]


FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "job_id": str, "model_sha256": str, "input_sha256": str, "output_sha256": str,
    "queue_ms": (int, float), "compute_ms": (int, float), "node": str, "session": int,
}  # fmt: skip


def job_id(correlation: bytes | None, corr_id: object, request_id: str | None) -> str:
    """What a node calls the job it signs for (see the module docstring)."""
    if correlation is not None:
        try:
            return correlation.decode("utf-8")
        except UnicodeDecodeError:
            return "hex:" + correlation.hex()
    if corr_id is not None:
        return str(corr_id)
    return request_id or ""


def attach(header: bytes, proof: Mapping[str, object]) -> bytes:
    """The response's JSON header with `parameters.pool_signature` = proof first in it. The codec's
    responses carry no top-level parameters, so this is a splice, not a second encoding of the outputs."""
    if header[:1] != b"{" or header[1:2] == b"}":
        raise ValueError("a response header is a non-empty JSON object")
    return b'{"parameters":{"pool_signature":' + orjson.dumps(proof) + b"}," + header[1:]


def sign(key: Ed25519PrivateKey, statement: Statement) -> str:
    return base64.b64encode(key.sign(statement.canonical())).decode("ascii")


def public_key_text(key: Ed25519PrivateKey) -> str:
    """How a birth message carries the node's public key: "ed25519:" + base64 of the 32 raw bytes."""
    raw = key.public_key().public_bytes_raw()
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """The key a birth carries; ValueError naming what is wrong with it."""
    if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
        raise ValueError(f"public key must start with {KEY_PREFIX!r}")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
    except ValueError as exc:
        raise ValueError(f"public key is not base64: {exc}") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, this one {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify(public_key: Ed25519PublicKey, statement: Statement, signature: str) -> bool:
    """True when `signature` is the key's signature of the statement's canonical bytes."""
    try:
        public_key.verify(base64.b64decode(signature, validate=True), statement.canonical())
    except (InvalidSignature, ValueError):
        return False
    return True
