"""Pool job intake: a KServe v2 request from cmd/infer/<model>, run at pool priority, answered every time.

Jobs take the data plane's path, as HTTP requests do: the same lookup, limits, decode and error
table. This module only adds what is particular to the pool: where the answer goes (checked by
`routes`), the MQTT side's own bounds (packet size, jobs per sender per second), what a stranger's
job may cost the event loop (the data plane's `Bounds`: JSON in and out, CPU for decoding) and the
node's own reasons to refuse pool work (not taking jobs, draining, no spare capacity). Every answer is signed
with the node's device key (pool/signing.py says over what).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from appliance import errors
from appliance.dataplane import outcomes
from appliance.dataplane.budget import WorkBudget
from appliance.dataplane.plane import Answer, Bounds, Call, DataPlane, too_much_json
from appliance.pool import identity, signing
from appliance.pool.routes import Reply, ReplyRules, Unanswerable, shown
from appliance.pool.senders import SenderRates
from appliance.pool.wire import (
    HEADER_LENGTH,
    MAX_JSON_BYTES,
    MAX_JSON_OUTPUT_ELEMENTS,
    STATUS,
    Inbound,
    Outbound,
)
from appliance.protocol import codec
from appliance.scheduler.queues import Priority
from appliance.scheduler.runner import ModelScheduler
from appliance.settings import Settings

log = logging.getLogger(__name__)
# Jobs received and not yet started. One is started per turn of the event loop, so that the line's
# requests are served between two jobs' routing and decoding, however many arrive at once; past this
# many waiting, a job is refused at once (503), without being read.
MAX_WAITING_JOBS = 64
# CPU time the node spends decoding pool jobs and writing their answers, all senders together: 5% of
# a core, 50 ms at once. Each decode runs on a worker thread, one at a time, and is charged what it
# cost (dataplane/budget.py): some 30 us for a binary job, up to about 15 ms for 64 KiB of JSON. While
# it is spent, jobs are refused (503, with when to retry) before anything of them is parsed.
WORK_SHARE = 0.05
WORK_BURST_S = 0.05
# A refused job's `id` is read again for its answer and event only from a header this small.
ID_PARSE_BYTES = 4 * 1024


def status_of(exc: BaseException) -> int:
    """The status a job's reply carries: the HTTP status of the data plane's table."""
    return outcomes.outcome_of(exc).http_status


class JobIntake:
    """Runs each job in its own task; `send` publishes (or keeps) the answer, `emit` reports on evt."""

    def __init__(
        self,
        plane: DataPlane,
        settings: Settings,
        *,
        send: Callable[[Outbound], None],
        emit: Callable[..., None],
        session: Callable[[], int] = lambda: 0,
        oversize: Callable[[Outbound], str | None] = lambda _message: None,
    ) -> None:
        self.plane = plane
        self.hub = plane.hub
        self.settings = settings
        self._send = send
        self._emit = emit
        self._session = session
        self._oversize = oversize  # why the broker would not take a message of that size, or None
        self.key = identity.device_key(settings.system.state_dir, identity.credentials_directory())
        self.public_key = signing.public_key_text(self.key)
        self.rules = ReplyRules(settings.pool.topic_root, settings.pool.reply_topic_prefix)
        self.rates = SenderRates(settings.pool.max_jobs_per_sender_per_s)
        budget = WorkBudget(
            WORK_SHARE,
            WORK_BURST_S,
            what="decoding pool jobs and writing their answers",
            hint="send tensor data as binary, which costs next to nothing to decode",
        )
        self.bounds = Bounds(MAX_JSON_BYTES, MAX_JSON_OUTPUT_ELEMENTS, budget)
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: asyncio.Queue[tuple[str, Inbound]] = asyncio.Queue(MAX_WAITING_JOBS)
        self._starter: asyncio.Task[None] | None = None
        self.refusal: str | None = None  # set while draining or stopping: why jobs are refused

    def submit(self, model: str, message: Inbound) -> None:
        """Take a job from the link: it starts in its turn, or is refused at once if too many wait."""
        try:
            self._waiting.put_nowait((model, message))
        except asyncio.QueueFull:
            self._refuse_unread(model, message)
            return
        if self._starter is None or self._starter.done():
            self._starter = asyncio.create_task(self._start_waiting(), name="pool-job-intake")

    async def _start_waiting(self) -> None:
        while not self._waiting.empty():
            model, message = self._waiting.get_nowait()
            task = asyncio.create_task(self._serve(model, message), name=f"pool-job-{model}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(0)  # the job's first step runs next turn, beside the line's handlers

    async def wait(self, timeout_s: float) -> bool:
        """Wait for the jobs received to be answered; False if some were still waiting or running."""
        deadline_s = time.monotonic() + timeout_s
        while self._tasks or not self._waiting.empty():
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                return False
            pending = {*self._tasks, *([self._starter] if self._starter and not self._starter.done() else [])}
            await asyncio.wait(pending, timeout=remaining_s, return_when=asyncio.FIRST_COMPLETED)
        return True

    def _refuse_unread(self, model: str, message: Inbound) -> None:
        """A job past MAX_WAITING_JOBS: answered 503 where MQTT 5 says where (nothing is parsed), else
        only reported; either way it is never read."""
        started_s = time.perf_counter()
        exc = errors.QueueFull(
            f"this node has {MAX_WAITING_JOBS} pool jobs waiting to start; try again later",
            retry_after_s=1.0,
        )
        reply = None
        if message.response_topic is not None:
            try:
                reply = self.rules.route(message)
            except Unanswerable:
                reply = None
        self.plane.refuse(model, Priority.POOL, exc)
        self._refuse(model, message, reply, exc, started_s, read_id=False)

    async def _serve(self, model: str, message: Inbound) -> None:
        started_s = time.perf_counter()
        reply: Reply | None = None
        request: codec.InferenceRequest | None = None
        is_in_plane = False
        try:
            try:
                reply = self.rules.route(message)
            except Unanswerable:
                self._check_size(message)  # an oversize job is reported as one, answerable or not
                raise
            self._check_message(message, reply)
            is_in_plane = True
            answer = await self.plane.infer(self._call(model, message, reply))
            request = answer.request
        except errors.ApplianceError as exc:
            if not is_in_plane:  # refused before the plane saw it: count it here, once
                self.plane.refuse(model, Priority.POOL, exc)
            self._refuse(model, message, reply, exc, started_s)
            return
        answered = self._message(reply, self._signed(answer, reply), 200)
        too_large = self._oversize(answered)
        if too_large is not None:
            # Sent, it would be dropped (the broker takes no larger packet) and the platform never told.
            exc = errors.RequestTooLarge(
                f"the answer to this job is too large to send: {too_large}; ask for fewer rows or outputs"
            )
            self._refuse(model, message, reply, exc, started_s)
            return
        self._send(answered)
        self._emit("job_done", model=model, job_id=request.id, status=200, latency_ms=_ms_since(started_s))

    def _signed(self, answer: Answer, reply: Reply) -> codec.EncodedResponse:
        """The answer with parameters.pool_signature: what this node vouches for, signed.

        `answer.outputs` are the tensors the answer carries (an output asked for as classes is its
        classes: classification.classified), which is what the gateway digests from the decoded answer."""
        request = answer.request
        wanted = codec.wanted_outputs(request, answer.outputs)
        sent = {output.name: answer.outputs[output.name] for output in wanted}
        statement = signing.Statement(
            job_id=signing.job_id(reply.correlation, reply.corr_id, request.id),
            model_sha256=answer.model_sha256,
            input_sha256=signing.tensor_digest(request.inputs),
            output_sha256=signing.tensor_digest(sent),
            queue_ms=round(answer.timing.queue_s * 1e3, 3),
            compute_ms=round(answer.timing.compute_s * 1e3, 3),
            node=self.settings.pool.node_id,
            session=self._session(),
        )
        proof = {**statement.fields(), "signature": signing.sign(self.key, statement)}
        header, *blobs = answer.encoded.parts
        signed = signing.attach(bytes(header), proof)
        return codec.EncodedResponse([signed, *blobs], len(signed) if blobs else None)

    def _call(self, model: str, message: Inbound, reply: Reply) -> Call:
        async def read(limit_bytes: int) -> bytes:
            size = len(message.payload)
            if size > limit_bytes:
                if HEADER_LENGTH not in message.user and size > MAX_JSON_BYTES:
                    raise too_much_json(call, size)  # all JSON: refused as the data plane refuses it
                raise errors.RequestTooLarge(
                    f"job of {size} bytes is too large: model {model!r} takes at most {limit_bytes} bytes "
                    f"of pool work ({MAX_JSON_BYTES} bytes of JSON, then its inputs' max_batch_size rows "
                    "as binary tensor data; server.max_body_bytes)"
                )
            return message.payload

        call = Call(
            model,
            None,
            read,
            header_length=message.user.get(HEADER_LENGTH),
            priority=Priority.POOL,
            max_timeout_s=float(message.expiry_s) if message.expiry_s else None,
            is_json_only=reply.is_in_body,  # 3.1.1 has no user properties for a header length
            check=self._check_capacity,
            bounds=self.bounds,
        )
        return call

    def _check_message(self, message: Inbound, reply: Reply) -> None:
        """The MQTT side's own bounds, before the data plane sees the job."""
        self._check_size(message)
        wait_s = self.rates.admit(reply.sender)
        if wait_s is not None:
            raise errors.RateLimited(
                f"sender {shown(reply.sender)} (the reply topic's levels before the last) started more "
                f"than {self.rates.rate_per_s:g} jobs/s (pool.max_jobs_per_sender_per_s)",
                retry_after_s=round(wait_s, 3),
            )
        if message.is_retained:
            raise errors.InvalidInput("a retained job is stale by definition; publish jobs without retain")
        if message.expiry_s is not None and message.expiry_s <= 0:
            raise errors.DeadlineExceeded("the job's message expiry has passed; it was not run")

    def _check_size(self, message: Inbound) -> None:
        limit_bytes = self.settings.pool.max_packet_bytes
        if len(message.payload) > limit_bytes:  # a 3.1.1 broker does not know our limit
            raise errors.RequestTooLarge(
                f"job of {len(message.payload)} bytes is larger than this node takes over MQTT "
                f"({limit_bytes} bytes, pool.max_packet_bytes)"
            )

    def _check_capacity(self, scheduler: ModelScheduler) -> None:
        """The node's own reasons to refuse pool work, after lookup and before decoding the job."""
        if not self.settings.pool.accept_jobs:
            raise errors.Forbidden("this node does not take pool jobs (pool.accept_jobs = false)")
        if self.refusal is not None:
            raise errors.Draining(f"this node is {self.refusal}; not taking pool jobs", retry_after_s=30.0)
        reserved_share = self.settings.pool.reserved_pct / 100.0
        capacity = scheduler.capacity(reserved_share)
        if capacity.spare_ips_at_slo <= 0:
            raise errors.NoPoolCapacity(
                f"model {scheduler.name!r} has no spare capacity: serving {capacity.served_ips:.1f} of "
                f"{capacity.max_ips_at_slo:.1f} inferences/s at its SLO with "
                f"{self.settings.pool.reserved_pct:g}% reserved for the line",
                retry_after_s=self.settings.pool.report_interval_s,
            )

    def _refuse(
        self,
        model: str,
        message: Inbound,
        reply: Reply | None,
        exc: errors.ApplianceError,
        started_s: float,
        *,
        read_id: bool = True,
    ) -> None:
        status = status_of(exc)
        kind = (
            "job_expired"
            if isinstance(exc, errors.DeadlineExceeded)
            else ("job_failed" if status >= 500 and status != 503 else "job_refused")
        )
        job_id = _job_id(message) if read_id else None
        self._emit(
            kind, model=model, job_id=job_id, status=status, error=str(exc), latency_ms=_ms_since(started_s)
        )
        if reply is None:
            # Reported on evt; only logged at debug level, so that a peer cannot flood the journal.
            log.debug("pool job on %s cannot be answered: %s", shown(message.topic), exc)
            return
        document: dict[str, Any] = {"error": str(exc), "status": status}
        retry_after_s = outcomes.retry_after_s(exc, self.settings.server.retry_after_s)
        if retry_after_s is not None:
            document["retry_after_s"] = retry_after_s
        if job_id is not None:
            document["id"] = job_id
        self._answer(reply, codec.EncodedResponse([orjson.dumps(document)], None), status)

    def _answer(self, reply: Reply, encoded: codec.EncodedResponse, status: int) -> None:
        self._send(self._message(reply, encoded, status))

    def _message(self, reply: Reply, encoded: codec.EncodedResponse, status: int) -> Outbound:
        body = encoded.body()
        message = Outbound(reply.topic, body, content_type=encoded.content_type)
        if reply.is_in_body:
            # The document is a JSON object: put corr_id first so a 3.1.1 platform can match the answer.
            body = b'{"corr_id":' + orjson.dumps(reply.corr_id) + b"," + body[1:]
            message = Outbound(reply.topic, body)
        else:
            message.correlation = reply.correlation
            message.user[STATUS] = str(status)
            if encoded.header_length is not None:
                message.user[HEADER_LENGTH] = str(encoded.header_length)
        return message


def _json_document(message: Inbound) -> Any:
    try:
        return orjson.loads(message.payload)
    except orjson.JSONDecodeError:
        return None


def _job_id(message: Inbound) -> str | None:
    """The job's `id`, for events and refusals, from a JSON header that parses; None otherwise."""
    header_length = message.user.get(HEADER_LENGTH)
    header = message.payload
    if header_length is not None:
        try:
            length = codec.decimal(header_length, HEADER_LENGTH)
        except errors.InvalidInput:
            return None
        header = message.payload[: length or 0]
    if len(header) > ID_PARSE_BYTES:
        return None  # a second parse of a big header, for every refusal, would cost the loop more
    document = _json_document(Inbound(message.topic, header))
    job_id = document.get("id") if isinstance(document, dict) else None
    return job_id if isinstance(job_id, str) else None


def _ms_since(started_s: float) -> float:
    return round((time.perf_counter() - started_s) * 1e3, 3)
