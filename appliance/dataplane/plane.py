"""The one request path of every transport: lookup, limits, read, decode, infer, encode.

HTTP, gRPC and MQTT pool jobs only adapt their framing: they hand `infer` a way to read the body
under a limit (and, for gRPC, the codec of its messages) and turn what it returns or raises into their
own answer through `outcomes.TABLE`. Shared-memory regions are read and written here too, for the
transports of local clients. A limit or a fix made here holds for every transport.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from appliance import errors
from appliance.dataplane.outcomes import CallAbandoned, Refusals
from appliance.dataplane.regions import SharedMemory
from appliance.protocol import classification, codec
from appliance.protocol.shared_memory import Regions
from appliance.scheduler.hub import ModelHub
from appliance.scheduler.queues import Priority
from appliance.scheduler.runner import ModelScheduler, Timing
from appliance.settings import Settings
from appliance.tensors import DYNAMIC, ShapeLimits, element_count

log = logging.getLogger(__name__)

# Bytes one element may take in a JSON body ("-1.2345678e-38, " and the indentation of a pretty
# printer, generously): with the model's shape it bounds what a body for that model may weigh.
JSON_BYTES_PER_ELEMENT = 64
HEADER_ALLOWANCE_BYTES = 64 * 1024  # the JSON around the tensors: names, parameters, an id
# Bodies above this are decoded on a worker thread, so that Python-level work on them (BYTES
# elements, nested lists) shares the GIL with the event loop instead of holding the loop.
DECODE_ON_THREAD_BYTES = 1024 * 1024

Reader = Callable[[int], Awaitable[bytes | bytearray | memoryview]]


Check = Callable[[ModelScheduler], None]


class Framing(Protocol):
    """How a transport's inference messages are coded: KServe v2 JSON and binary tensors (HTTP, MQTT),
    or gRPC's protobuf. Both run the codec's checks (limits, `expect`, regions) on every input."""

    def decode(
        self,
        body: bytes | bytearray | memoryview,
        header_length: int | None,
        *,
        limits: ShapeLimits,
        expect: codec.Expectation,
        regions: Regions | None,
    ) -> codec.InferenceRequest: ...

    def encode(
        self,
        *,
        model_name: str,
        model_version: str,
        request: codec.InferenceRequest,
        outputs: Mapping[str, np.ndarray],
        regions: Regions | None,
    ) -> codec.EncodedResponse: ...


class JsonFraming:
    """KServe v2 JSON, with binary tensors after the JSON header when the header length is given."""

    decode = staticmethod(codec.decode_request)
    encode = staticmethod(codec.encode_response)


JSON_FRAMING = JsonFraming()


def priority_class(priority: int) -> Priority:
    """Triton's parameters.priority: 0 (default) and 1 are line traffic; 2 and above run as pool work."""
    return Priority.LINE if priority <= 1 else Priority.POOL


@dataclass(slots=True)
class Call:
    """One inference call as a transport hands it over."""

    model: str
    version: str | None
    read: Reader  # the body, under the byte limit given; raises RequestTooLarge past it
    header_length: str | None = None  # JSON header size when binary tensors follow, as text (a header
    # or user property): the plane parses it, strictly, for every transport
    priority: Priority | None = None  # a transport's fixed class (pool jobs); None: parameters.priority
    max_timeout_s: float | None = None  # the transport's own deadline (a job's message expiry)
    is_json_only: bool = False  # the answer must be JSON (MQTT 3.1.1 carries no header length)
    check: Check | None = None  # the transport's admission rule, after lookup and before the body
    framing: Framing = JSON_FRAMING
    has_shared_memory: bool = False  # its clients may name shared-memory regions (local transports)


@dataclass(slots=True)
class _Progress:
    priority: Priority  # the class a refusal is counted under: known once the request is decoded


@dataclass(slots=True)
class Answer:
    encoded: codec.EncodedResponse
    request: codec.InferenceRequest
    model_version: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # as answered (classification applied)
    timing: Timing = field(default_factory=Timing)  # where the request's time went (signed pool answers)
    model_sha256: str = ""


class DataPlane:
    """Serves inference calls against a ModelHub; counts every refusal and failure once."""

    def __init__(self, hub: ModelHub, settings: Settings) -> None:
        self.hub = hub
        server = settings.server
        self.max_body_bytes = server.max_body_bytes
        self.limits = ShapeLimits(
            server.max_tensor_rank, server.max_tensor_elements, server.max_bytes_elements
        )
        self.retry_after_s = server.retry_after_s
        self.refusals = Refusals(hub.is_served)
        self.regions = SharedMemory(server.max_shm_regions, server.max_shm_bytes)

    def refuse(self, model: str | None, priority: Priority | str, exc: BaseException) -> None:
        """Count a refusal a transport made on its own (401, 431, a connection limit)."""
        label = priority.label if isinstance(priority, Priority) else priority
        self.refusals.count(model, label, exc)

    async def infer(self, call: Call) -> Answer:
        """Run one call; raises ApplianceError (counted once, by model, class and reason) for every
        refusal or failure, whatever raised it."""
        progress = _Progress(call.priority or Priority.LINE)
        try:
            return await self._infer(call, progress)
        except CallAbandoned:
            raise
        except errors.ApplianceError as exc:
            self.refuse(call.model, progress.priority, exc)
            raise
        except MemoryError:
            failure = errors.RequestTooLarge(
                f"request to model {call.model!r} needs more memory than is free"
            )
            self.refuse(call.model, progress.priority, failure)
            raise failure from None
        except Exception as exc:
            log.exception("inference on model %r failed unexpectedly", call.model)
            failure = errors.InferenceFailed(f"internal error: {type(exc).__name__}: {exc}")
            self.refuse(call.model, progress.priority, failure)
            raise failure from exc

    async def _infer(self, call: Call, progress: _Progress) -> Answer:
        scheduler = self.hub.scheduler(call.model, call.version)  # 404 or 503 before reading a body
        if call.check is not None:
            call.check(scheduler)
        header_length = codec.decimal(call.header_length, "Inference-Header-Content-Length")
        body = await call.read(self.body_limit(scheduler))
        regions = self.regions if call.has_shared_memory else None
        request = await self._decode(scheduler, call.framing, body, header_length, regions)
        progress.priority = call.priority or priority_class(request.priority)
        # Look up again with no await before admission: a reload may have swapped the model meanwhile.
        scheduler = self.hub.scheduler(call.model, call.version)
        if request.outputs is not None:
            scheduler.model.signature.check_outputs([o.name for o in request.outputs])
        if call.is_json_only:
            request.parameters["binary_data_output"] = False
            if request.outputs:
                request.outputs = [replace(o, binary=False) for o in request.outputs]
        timing = Timing()
        outputs = await scheduler.infer(
            request.inputs, priority=progress.priority, timeout_s=_timeout_s(call, request), timing=timing
        )
        if classification.is_asked(request):
            model = scheduler.model
            outputs = await asyncio.to_thread(
                classification.classified,
                request,
                outputs,
                is_batched=model.limits.is_batched,
                labels=model.source.manifest.labels,
                max_classes=classification.MAX_ANSWERED_CLASSES[progress.priority.label],
            )
        encoded = call.framing.encode(
            model_name=call.model,
            model_version=scheduler.model.version,
            request=request,
            outputs=outputs,
            regions=regions,
        )
        return Answer(encoded, request, scheduler.model.version, outputs, timing, scheduler.model.digest)

    def body_limit(self, scheduler: ModelScheduler) -> int:
        """The most bytes a request to this model can need (JSON being the larger form), capped by
        server.max_body_bytes; a model with a dynamic or BYTES input gets the cap alone."""
        model = scheduler.model
        max_rows = model.limits.max_batch_size if model.limits.is_batched else None
        needed = HEADER_ALLOWANCE_BYTES
        for spec in model.signature.inputs:
            dims = list(spec.shape)
            if dims and max_rows is not None and dims[0] == DYNAMIC:
                dims[0] = max_rows
            if spec.datatype == "BYTES" or DYNAMIC in dims:
                return self.max_body_bytes
            needed += element_count(dims) * max(spec.dtype.itemsize, JSON_BYTES_PER_ELEMENT)
        return min(self.max_body_bytes, needed)

    async def _decode(
        self,
        scheduler: ModelScheduler,
        framing: Framing,
        body: bytes | bytearray | memoryview,
        header_length: int | None,
        regions: Regions | None,
    ) -> codec.InferenceRequest:
        model = scheduler.model
        max_rows = model.limits.max_batch_size if model.limits.is_batched else None

        def expect(name: str, datatype: str, shape: list[int]) -> None:
            model.signature.check_declared(name, datatype, shape, max_rows)

        def decode() -> codec.InferenceRequest:
            try:
                return framing.decode(body, header_length, limits=self.limits, expect=expect, regions=regions)
            except RecursionError:
                raise errors.InvalidInput("request JSON is nested too deeply") from None

        if len(body) < DECODE_ON_THREAD_BYTES:
            return decode()
        return await asyncio.to_thread(decode)


def _timeout_s(call: Call, request: codec.InferenceRequest) -> float | None:
    """The tighter of the transport's deadline and the request's own timeout; None: the model's SLO."""
    limits = [call.max_timeout_s] if call.max_timeout_s else []
    if request.timeout_us:
        limits.append(request.timeout_us / 1e6)
    return min(limits) if limits else None
