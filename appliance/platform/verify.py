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
import gc
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import orjson
from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from appliance.errors import InvalidInput
from appliance.platform.intake import MAX_LEVEL_CHARS, MAX_RANK, MAX_TENSOR_NAME_CHARS, MAX_TENSORS
from appliance.platform.view import NodeView
from appliance.pool import signing
from appliance.pool.wire import MAX_JSON_BYTES, MAX_JSON_OUTPUT_ELEMENTS
from appliance.protocol import codec, nonfinite

MAX_SESSION = 2**63 - 1  # the ledger's BIGINT, and far beyond any node's count of connections
MAX_MS = 1e9  # about 11.6 days: any time a node may claim, already far beyond a job's timeout
MAX_CLAIM_CHARS = 256  # a claimed string longer than this is not even verified
MAX_SIGNATURE_CHARS = 128  # an Ed25519 signature in base64 has 88
# queue + compute may exceed the gateway's own send-to-answer time by clock granularity (3-decimal
# rounding on the node) and by two clocks' rates (NTP slews each by at most 0.05%): 1 ms + 1%.
SLACK_MS, SLACK_RATIO = 1.0, 0.01
_DIGEST = re.compile(r"[0-9a-f]{64}")

# The most JSON an honest node writes as an answer's header (the whole answer when it has no binary
# part). Anything larger is Unverified before a byte of it is parsed: a parse runs on the event loop,
# up to 460 ms a MiB for the costliest shapes (many outputs, small lists), and any peer on the broker
# can send one. What a node writes for a stranger's job (pool/jobs.py, dataplane/plane.py Bounds):
# - tensor data: at most MAX_JSON_OUTPUT_ELEMENTS elements as JSON (the gateway asks for binary
#   outputs wherever more could come: forwarding.py), each a number of at most MAX_NUMBER_CHARS
#   characters or a token or a string's quotes, and a comma;
# - text (BYTES) outputs: at most MAX_JSON_OUTPUT_TEXT_BYTES of JSON for their characters;
# - what it echoes of the job (its id, the output names it asks): from a header of at most
#   MAX_JSON_BYTES, which a node refuses past;
# - per output (at most MAX_OUTPUTS), OUTPUT_ENTRY_BYTES: its name, datatype, shape, binary_data_size;
# - its own fields: model name and version, pool_signature (eight fields and 88 characters of
#   signature), in ANSWER_FIELDS_BYTES.
# 2.28 MiB in all. The costliest shape to parse at that size, small lists, takes 36 ms with the
# collector paused (`_loads`) against 154 ms with it running (2 shared EPYC vCPUs, otherwise idle; 3 to
# 4 times as long while other work holds them); the shapes that cost most to decode are refused after
# that one parse (`_outputs`).
MAX_NUMBER_CHARS = 24  # orjson's longest: -1.0084623976315037e+201, -0.000012345678901234568
# dataplane/plane.py's MAX_JSON_OUTPUT_TEXT_BYTES, which the platform may not import (tests pin both)
MAX_JSON_OUTPUT_TEXT_BYTES = 1024 * 1024
MAX_OUTPUTS = MAX_TENSORS  # a model with more outputs is not in any birth the gateway keeps (intake.py)
OUTPUT_ENTRY_BYTES = (
    4 * MAX_TENSOR_NAME_CHARS  # its name: printable characters, at most 4 bytes each in UTF-8
    + 20 * MAX_RANK  # its shape: dimensions of at most 19 digits, and commas
    + 128  # its keys, datatype, binary_data_size and punctuation
)
ANSWER_FIELDS_BYTES = 4 * MAX_LEVEL_CHARS + 4096  # model name (a topic level); version and signature
MAX_ANSWER_JSON_BYTES = (
    MAX_JSON_OUTPUT_ELEMENTS * (MAX_NUMBER_CHARS + 1)
    + MAX_JSON_OUTPUT_TEXT_BYTES
    + MAX_JSON_BYTES
    + MAX_OUTPUTS * OUTPUT_ENTRY_BYTES
    + ANSWER_FIELDS_BYTES
)


@dataclass(frozen=True, slots=True)
class Proof:
    """A verified answer: what the node signed, its signature, and the outputs it vouched for."""

    statement: signing.Statement
    signature: str
    outputs: dict[str, np.ndarray]
    document: dict[str, Any]  # the answer's JSON header, as read once here (api.py writes it on)
    # whether that header held NaN or Infinity tokens (read by nonfinite.with_tokens: written back so)
    has_tokens: bool = False


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
    None: no such bound, every other one still holds). Runs on the event loop: a JSON header larger
    than MAX_ANSWER_JSON_BYTES is Unverified unread, a smaller one is parsed once, and one that holds
    more outputs or JSON elements than a node writes is Unverified before any of them is decoded."""
    key_text = node.trusted_key or node.public_key
    if key_text is None:
        raise Unverified(f"node {node.name} has no device key to verify with")
    try:
        key = node_key(key_text)
    except ValueError as exc:
        raise Unverified(f"node {node.name}'s device key cannot verify anything: {exc}") from None
    view = memoryview(payload)
    json_bytes = len(view) if header_length is None else header_length
    if not 0 <= json_bytes <= len(view):
        raise Unverified(
            f"the answer cannot be decoded: its header length is {header_length}; it has {len(view)} bytes"
        )
    if json_bytes > MAX_ANSWER_JSON_BYTES:
        raise Unverified(
            f"the answer's JSON is {json_bytes} bytes; a node writes at most {MAX_ANSWER_JSON_BYTES} "
            "(it was not read)"
        )
    try:
        document, has_tokens = _loads(view[:json_bytes])
        outputs = _outputs(document, view[json_bytes:])
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
    # The outputs' digest is taken only once the signature holds over the one the node claims (then
    # the two must be equal): it reads every byte of binary data, up to gateway.max_packet_bytes (150 to
    # 300 ms for 64 MiB), which an answer anyone could have sent does not get to spend.
    statement = signing.Statement(
        job_id=job_id,
        model_sha256=claimed.model_sha256,
        input_sha256=input_sha256,
        output_sha256=claimed.output_sha256,
        queue_ms=claimed.queue_ms,
        compute_ms=claimed.compute_ms,
        node=node.node,
        session=claimed.session,
    )
    is_signed = False
    if _DIGEST.fullmatch(claimed.output_sha256):
        try:
            canonical = statement.canonical()
            is_signed = _is_signed(key, canonical, signature)
        except (TypeError, ValueError, OverflowError):  # a number or string JSON cannot carry as signed
            is_signed = False
    if not is_signed or signing.tensor_digest(outputs) != claimed.output_sha256:
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
    return Proof(statement, signature, outputs, document, has_tokens)


def _loads(header: memoryview) -> tuple[Any, bool]:
    """The header's document as nonfinite.loads reads it, and whether it took the tokens' reader.

    The cyclic collector is paused meanwhile: a document of many small lists (2 bytes each) otherwise
    sets off a collection every 700 of them, and the older generations' collections walk the growing
    document again and again: 4 times the parse's own time at MAX_ANSWER_JSON_BYTES. The parse holds
    the GIL from start to end, so no other thread allocates meanwhile; what it built is collected as
    usual afterwards."""
    is_plain = False

    def plain(text: memoryview) -> Any:
        nonlocal is_plain
        document = orjson.loads(text)
        is_plain = True
        return document

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return nonfinite.loads(header, plain), not is_plain
    finally:
        if was_enabled:
            gc.enable()


def _outputs(document: Any, binary: memoryview) -> dict[str, np.ndarray]:
    """The outputs a parsed answer header holds, as codec.decode_response decodes them (binary ones as
    views of `binary`), once it holds no more outputs and JSON elements than a node writes; InvalidInput
    otherwise."""
    raw_outputs = codec.response_entries(document)
    if len(raw_outputs) > MAX_OUTPUTS:
        raise InvalidInput(f"response holds {len(raw_outputs)} outputs; a node answers at most {MAX_OUTPUTS}")
    lists = [raw["data"] for raw in raw_outputs if isinstance(raw, dict) and type(raw.get("data")) is list]
    elements = sum(len(data) for data in lists)
    if elements > MAX_JSON_OUTPUT_ELEMENTS:
        raise InvalidInput(
            f"response holds {elements} tensor elements as JSON; a node writes at most "
            f"{MAX_JSON_OUTPUT_ELEMENTS}"
        )
    # A node writes tensor data flat (row-major, as the codec does): nested lists, which the count above
    # does not see into and which would be decoded one element at a time, are no node's answer.
    if any(type(item) is list for data in lists for item in data):
        raise InvalidInput("response tensor data holds nested lists; a node writes it flat")
    return codec.response_outputs(raw_outputs, binary)


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
