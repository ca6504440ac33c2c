"""A buyer's job and each send of it (an attempt), and the answer a node gave to one attempt."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from appliance.errors import InvalidInput
from appliance.platform.verify import Proof, Refused
from appliance.platform.view import NodeView
from appliance.pool.wire import HEADER_LENGTH, MAX_JSON_BYTES, STATUS, Inbound
from appliance.protocol import codec

# A refusal (an answer other than 200) is read for its error and retry_after_s only up to this size: a
# node writes a few hundred bytes there (pool/jobs.py `_refuse`: its message, status, retry_after_s and
# the job's id, read from at most 4 KiB), and any peer that knows the attempt may send many answers,
# each parsed on the event loop. A larger one counts as its status alone. The bound a node puts on a
# stranger's JSON (pool.wire.MAX_JSON_BYTES).
MAX_REFUSAL_BYTES = MAX_JSON_BYTES


@dataclass
class Answer:
    status: int
    payload: bytes
    header_length: int | None
    node: NodeView
    latency_ms: float
    retry_after_s: float | None = None
    job_id: str = ""  # the attempt's CorrelationData: what the node signed as the job id
    attempt: int = 0
    proof: Proof | None = None  # set once the signature is verified
    refusal: Refused | None = None  # set once the node's signed answer is found wrong
    # A refusal's JSON object, read once by answer_of (None: not one, or past MAX_REFUSAL_BYTES)
    document: dict[str, Any] | None = None


@dataclass
class Job:
    model: str
    buyer: str
    body: bytes
    header_length: int | None
    rows: int
    files: frozenset[str] | None
    input_sha256: str = ""
    outputs: frozenset[str] | None = None  # the outputs its body names (None: all): a 200 holds just those
    id: str = field(default_factory=lambda: os.urandom(16).hex())  # 128 random bits; uuid4 cost 3x
    kind: str = "buyer"  # buyer, canary, second_opinion
    target: NodeView | None = None  # a check aimed at one node (a quarantined node's way back)
    excluded: frozenset[tuple[str, str]] = frozenset()  # nodes it must not go to (a second opinion's first)
    attempts: list[Attempt] = field(default_factory=list)
    is_done: bool = False
    was_resent: bool = False
    # How its body asks for outputs (forwarding.py): a canary after it asks the same way, so that a node
    # cannot tell the two apart by it.
    asks_binary_output: bool = True

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None


@dataclass(eq=False)
class Attempt:
    """One send of a job. Its CorrelationData is `<job>/<number>/<nonce>`, the nonce random: only the
    node it went to (and the broker) ever sees it, so no other node can answer in its name."""

    job: Job
    node: NodeView
    correlation: bytes
    sent_s: float
    reply: asyncio.Future[Answer]
    number: int = 0


@dataclass(frozen=True, slots=True)
class Finished:
    """What is kept of an attempt once its job is over, for as long as a late answer may come (up to
    10,000 of them): enough to record that answer, in one object. Not the answer the buyer got (its
    payload, proof and decoded document), and not the Job, whose dict, list and sets every full
    collection would scan (four objects more per attempt, 20-30 ms more per collection at 500 jobs/s)."""

    job_id: str
    kind: str
    buyer: str
    model: str
    rows: int
    input_sha256: str
    files: frozenset[str] | None
    node: NodeView
    correlation: bytes
    sent_s: float
    number: int

    @classmethod
    def of(cls, attempt: Attempt) -> Finished:
        job = attempt.job
        return cls(
            job.id,
            job.kind,
            job.buyer,
            job.model,
            job.rows,
            job.input_sha256,
            job.files,
            attempt.node,
            attempt.correlation,
            attempt.sent_s,
            attempt.number,
        )

    @property
    def job(self) -> Job:
        """The job as a late answer's proof and receipt need it (no body, no attempts)."""
        return Job(
            self.model,
            self.buyer,
            b"",
            None,
            self.rows,
            self.files,
            input_sha256=self.input_sha256,
            id=self.job_id,
            kind=self.kind,
            is_done=True,
        )


def answer_of(message: Inbound, attempt: Attempt | Finished) -> Answer:
    """The answer an MQTT message carries to one attempt; whatever its user properties say, an answer
    (a status that is not a decimal number is 502, a header length that is not one is no length). A
    200 is read by verify.check; another status's JSON here, where it is at most MAX_REFUSAL_BYTES."""
    header_length = _decimal(message.user.get(HEADER_LENGTH), HEADER_LENGTH)
    status = _decimal(message.user.get(STATUS), STATUS) or 502
    document = None
    if status != 200 and len(message.payload) <= MAX_REFUSAL_BYTES:
        try:
            document = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            document = None
    if not isinstance(document, dict):
        document = None
    retry_after_s = None
    if document is not None and isinstance(document.get("retry_after_s"), int | float):
        retry_after_s = float(document["retry_after_s"])
    latency_ms = (time.perf_counter() - attempt.sent_s) * 1e3
    return Answer(
        status,
        message.payload,
        header_length,
        attempt.node,
        latency_ms,
        retry_after_s,
        job_id=attempt.correlation.decode(),
        attempt=attempt.number,
        document=document,
    )


def _decimal(text: str | None, what: str) -> int | None:
    """A node's decimal user property, strictly (codec.decimal: ASCII digits, at most 19), else None."""
    try:
        return codec.decimal(text, what)
    except InvalidInput:
        return None
