"""Pool job intake: a KServe v2 request from cmd/infer/<model>, run at pool priority, answered every time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from appliance import errors
from appliance.pool.wire import HEADER_LENGTH, STATUS, Inbound, Outbound
from appliance.protocol import codec
from appliance.scheduler.hub import ModelHub
from appliance.scheduler.queues import Priority
from appliance.settings import Settings

log = logging.getLogger(__name__)

# The HTTP statuses a job error mirrors (pool/ cannot import server/; the same classes, the same codes).
_STATUS: tuple[tuple[type[errors.ApplianceError], int], ...] = (
    (errors.RequestTooLarge, 413),
    (errors.InvalidInput, 400),
    (errors.ModelNotFound, 404),
    (errors.ModelNotReady, 503),
    (errors.Overloaded, 503),
    (errors.DeadlineExceeded, 503),
)


def status_of(exc: errors.ApplianceError) -> int:
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), 500)


@dataclass(frozen=True, slots=True)
class Reply:
    """Where an answer goes: MQTT 5 ResponseTopic + CorrelationData, or reply_to + corr_id in the body."""

    topic: str
    correlation: bytes | None = None
    corr_id: Any = None
    is_in_body: bool = False


class NoReply(errors.InvalidInput):
    """A job names no response topic: it cannot be answered, only reported on evt."""


class JobIntake:
    """Runs each job in its own task; `send` publishes (or keeps) the answer, `emit` reports on evt."""

    def __init__(
        self,
        hub: ModelHub,
        settings: Settings,
        *,
        send: Callable[[Outbound], None],
        emit: Callable[..., None],
    ) -> None:
        self.hub = hub
        self.settings = settings
        self._send = send
        self._emit = emit
        self._tasks: set[asyncio.Task[None]] = set()
        self.refusal: str | None = None  # set while draining or stopping: why jobs are refused

    def submit(self, model: str, message: Inbound) -> None:
        task = asyncio.create_task(self._serve(model, message), name=f"pool-job-{model}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, timeout_s: float) -> bool:
        """Wait for the jobs in progress to be answered; False if some were still running at the end."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        return not pending

    async def _serve(self, model: str, message: Inbound) -> None:
        started_s = time.perf_counter()
        reply: Reply | None = None
        request: codec.InferenceRequest | None = None
        try:
            reply = reply_route(message)
            scheduler = self._admit(model, message)  # refuse before decoding what will not run
            request = self._decode(message)
            if request.outputs is not None:
                scheduler.model.signature.check_outputs([o.name for o in request.outputs])
            if reply.is_in_body:  # 3.1.1 has no user properties for a header length: JSON outputs only
                request.parameters["binary_data_output"] = False
                if request.outputs:
                    request.outputs = [codec.RequestedOutput(o.name, False) for o in request.outputs]
            outputs = await scheduler.infer(
                request.inputs, priority=Priority.POOL, timeout_s=_timeout_s(message, request)
            )
            encoded = codec.encode_response(
                model_name=model, model_version=scheduler.model.version, request=request, outputs=outputs
            )
        except errors.ApplianceError as exc:
            self._refuse(model, message, reply, request, exc, started_s)
            return
        except Exception as exc:  # a bug must still answer the job, never leave it hanging
            log.exception("pool job for %s failed unexpectedly", model)
            wrapped = errors.InferenceFailed(f"internal error: {type(exc).__name__}: {exc}")
            self._refuse(model, message, reply, request, wrapped, started_s)
            return
        self._answer(reply, encoded, 200)
        self._emit("job_done", model=model, job_id=request.id, status=200, latency_ms=_ms_since(started_s))

    def _decode(self, message: Inbound) -> codec.InferenceRequest:
        limit = self.settings.server.max_body_bytes
        if len(message.payload) > limit:
            raise errors.RequestTooLarge(
                f"job of {len(message.payload)} bytes exceeds the limit of {limit} bytes "
                "(server.max_body_bytes)"
            )
        raw = message.user.get(HEADER_LENGTH)
        if raw is not None and not raw.strip().isdigit():
            raise errors.InvalidInput(f"user property {HEADER_LENGTH} {raw!r} is not a non-negative integer")
        return codec.decode_request(message.payload, int(raw) if raw is not None else None)

    def _admit(self, model: str, message: Inbound) -> Any:
        if message.is_retained:
            raise errors.InvalidInput("a retained job is stale by definition; publish jobs without retain")
        if not self.settings.pool.accept_jobs:
            raise errors.ModelNotReady("this node does not take pool jobs (pool.accept_jobs = false)")
        if self.refusal is not None:
            raise errors.ModelNotReady(
                f"this node is {self.refusal}; not taking pool jobs", retry_after_s=30.0
            )
        if message.expiry_s is not None and message.expiry_s <= 0:
            raise errors.DeadlineExceeded("the job's message expiry has passed; it was not run")
        scheduler = self.hub.scheduler(model)  # ModelNotFound, or ModelNotReady while draining
        reserved_share = self.settings.pool.reserved_pct / 100.0
        capacity = scheduler.capacity(reserved_share)
        if capacity.spare_ips_at_slo <= 0:
            raise errors.Overloaded(
                f"model {model!r} has no spare capacity: serving {capacity.served_ips:.1f} of "
                f"{capacity.max_ips_at_slo:.1f} inferences/s at its SLO with "
                f"{self.settings.pool.reserved_pct:g}% reserved for the line",
                retry_after_s=self.settings.pool.report_interval_s,
            )
        return scheduler

    def _refuse(
        self,
        model: str,
        message: Inbound,
        reply: Reply | None,
        request: codec.InferenceRequest | None,
        exc: errors.ApplianceError,
        started_s: float,
    ) -> None:
        status = status_of(exc)
        kind = (
            "job_expired"
            if isinstance(exc, errors.DeadlineExceeded)
            else ("job_failed" if status == 500 else "job_refused")
        )
        job_id = request.id if request is not None else None
        self._emit(
            kind, model=model, job_id=job_id, status=status, error=str(exc), latency_ms=_ms_since(started_s)
        )
        if reply is None:
            log.warning("pool job on %s cannot be answered: %s", message.topic, exc)
            return
        document: dict[str, Any] = {"error": str(exc), "status": status}
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s is not None:
            document["retry_after_s"] = retry_after_s
        if job_id is not None:
            document["id"] = job_id
        self._answer(reply, codec.EncodedResponse([orjson.dumps(document)], None), status)

    def _answer(self, reply: Reply, encoded: codec.EncodedResponse, status: int) -> None:
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
        self._send(message)


def reply_route(message: Inbound) -> Reply:
    """The MQTT 5 properties win; otherwise `reply_to` and `corr_id` from the JSON body (MQTT 3.1.1)."""
    if message.response_topic:
        return Reply(message.response_topic, correlation=message.correlation)
    try:
        document = orjson.loads(message.payload)
    except orjson.JSONDecodeError:
        document = None
    reply_to = document.get("reply_to") if isinstance(document, dict) else None
    if not isinstance(reply_to, str) or not reply_to or any(c in reply_to for c in "+#"):
        raise NoReply(
            "job has no MQTT 5 ResponseTopic and no 'reply_to' topic in a JSON body; it cannot be answered"
        )
    return Reply(reply_to, corr_id=document.get("corr_id"), is_in_body=True)


def _timeout_s(message: Inbound, request: codec.InferenceRequest) -> float | None:
    """The tighter of the message expiry and the request's own timeout; None leaves the model's SLO."""
    limits = [float(message.expiry_s)] if message.expiry_s else []
    if request.timeout_us:
        limits.append(request.timeout_us / 1e6)
    return min(limits) if limits else None


def _ms_since(started_s: float) -> float:
    return round((time.perf_counter() - started_s) * 1e3, 3)
