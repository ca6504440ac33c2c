"""The one request path of every transport: lookup, limits, read, decode, infer, encode.

HTTP, gRPC and MQTT pool jobs only adapt their framing: they hand `infer` a way to read the body
under a limit (and, for gRPC, the codec of its messages) and turn what it returns or raises into their
own answer through `outcomes.TABLE`. Shared-memory regions are read and written here too, for the
transports of local clients. A limit or a fix made here holds for every transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from appliance import errors
from appliance.dataplane.budget import WorkBudget
from appliance.dataplane.outcomes import CallAbandoned, Refusals
from appliance.dataplane.regions import SharedMemory
from appliance.protocol import classification, codec, tensor_data
from appliance.protocol.shared_memory import Regions
from appliance.scheduler import admission
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
# elements, nested lists) shares the GIL with the event loop instead of holding the loop. A parse in C
# (orjson, simdjson) holds the GIL from start to end wherever it runs: what strangers send (pool jobs)
# is bounded before it is parsed instead (Call.bounds, and the pool row limit).
DECODE_ON_THREAD_BYTES = 1024 * 1024
# The most bytes of JSON a stranger's answer (a pool job's) may make the node write for its text
# (BYTES) outputs, reckoned before writing at 6 bytes a character: a control character is written as
# a \u00XX escape, any other as at most itself (orjson writes UTF-8 as it is). The element bound
# alone let one element of 15 MiB of control characters be written as 90 MiB of JSON, in one orjson
# call on the event loop. 1 MiB of escapes takes about 1.2 ms to write (2 shared cores of an EPYC
# VM), within what the element bound allows for numbers; 174762 characters of text answered as JSON
# are ample for labels and messages, and more is asked for as binary, which is written as it is.
MAX_JSON_OUTPUT_TEXT_BYTES = 1024 * 1024
JSON_BYTES_PER_CHARACTER = 6
# Answers that write more tensor elements than this as JSON are written on a worker thread, as a
# gateway writes its buyers' (platform/forwarding.py); the codec writes such tensors a slice at a time
# (tensor_data.SLICE_ELEMENTS), so the loop gets the GIL between slices and serves the line meanwhile.
# Fewer are written inline: 16384 FP32 elements take 0.4 ms, where a thread adds 0.12 ms (2 EPYC vCPUs).
ENCODE_ON_THREAD_ELEMENTS = tensor_data.SLICE_ELEMENTS

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
    bounds: Bounds | None = None  # what a stranger's call (a pool job) may cost; None: a local client's


@dataclass(frozen=True, slots=True)
class Bounds:
    """What a call from a stranger (a pool job) may make the service do, beyond its model's limits.

    Parsing and writing JSON hold the GIL, so the event loop that serves the line waits while they run,
    on a worker thread as on the loop itself. These bound each call's share of that, and their sum."""

    max_json_bytes: int  # JSON parsed: the whole body, or the header before binary tensor data
    max_json_output_elements: int  # tensor elements answered as JSON text; more must be asked binary
    budget: WorkBudget  # CPU for decoding (on its thread) and encoding them, all such calls together
    # JSON written for text (BYTES) outputs, at JSON_BYTES_PER_CHARACTER; more must be asked binary
    max_json_output_text_bytes: int = MAX_JSON_OUTPUT_TEXT_BYTES


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
        bounds = call.bounds
        max_json_bytes = None if bounds is None else bounds.max_json_bytes
        body = await call.read(self.body_limit(scheduler, max_json_bytes=max_json_bytes))
        _check_json_bytes(call, body, header_length)
        # Pool work (a class its transport fixes before decoding) is bounded by the rows it may have,
        # by its size and then by the shapes it declares, before any of it is parsed or decoded.
        pool_rows = None
        if call.priority is Priority.POOL:
            pool_rows = admission.pool_row_limit(scheduler.batcher)
            self._check_pool_bytes(scheduler, body, pool_rows, max_json_bytes)
        regions = self.regions if call.has_shared_memory else None
        request = await self._decode(scheduler, call.framing, body, header_length, regions, pool_rows, bounds)
        progress.priority = call.priority or priority_class(request.priority)
        # Look up again with no await before admission: a reload may have swapped the model meanwhile.
        scheduler = self.hub.scheduler(call.model, call.version)
        if request.outputs is not None:
            scheduler.model.signature.check_outputs([o.name for o in request.outputs])
            if bounds is not None:
                codec.named_once(request.outputs)
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
        if bounds is not None:
            _check_json_output(call, bounds, request, outputs)
        encoded = await _encoded(call, scheduler.model.version, request, outputs, regions)
        return Answer(encoded, request, scheduler.model.version, outputs, timing, scheduler.model.digest)

    def body_limit(
        self, scheduler: ModelScheduler, *, max_rows: int | None = None, max_json_bytes: int | None = None
    ) -> int:
        """The most bytes a request to this model can need, capped by server.max_body_bytes; a model
        with a dynamic or BYTES input gets the cap alone. Its rows are the model's max_batch_size, or
        `max_rows` where fewer (pool work: the pool row limit). Its tensors count in their larger form,
        JSON, unless `max_json_bytes` bounds the JSON: then as binary data after that much JSON."""
        model = scheduler.model
        rows = model.limits.max_batch_size if model.limits.is_batched else None
        if rows is not None and max_rows is not None:
            rows = min(rows, max_rows)
        needed = HEADER_ALLOWANCE_BYTES if max_json_bytes is None else max_json_bytes
        for spec in model.signature.inputs:
            dims = list(spec.shape)
            if dims and rows is not None and dims[0] == DYNAMIC:
                dims[0] = rows
            if spec.datatype == "BYTES" or DYNAMIC in dims:
                return self.max_body_bytes
            element_bytes = spec.dtype.itemsize
            if max_json_bytes is None:
                element_bytes = max(element_bytes, JSON_BYTES_PER_ELEMENT)
            needed += element_count(dims) * element_bytes
        return min(self.max_body_bytes, needed)

    def _check_pool_bytes(
        self,
        scheduler: ModelScheduler,
        body: bytes | bytearray | memoryview,
        pool_rows: int | None,
        max_json_bytes: int | None,
    ) -> None:
        """NoPoolCapacity, as for too many rows (admission.check_pool_rows), for a body larger than
        the most rows pool work may have can need: refused where it is, it may fit a faster node."""
        if pool_rows is None:
            return
        limit_bytes = self.body_limit(scheduler, max_rows=pool_rows, max_json_bytes=max_json_bytes)
        if len(body) > limit_bytes:
            interference_ms = scheduler.batcher.rules.max_interference_s * 1e3
            raise errors.NoPoolCapacity(
                f"model {scheduler.name!r}: pool work of {len(body)} bytes holds more rows than run "
                f"within pool.max_interference_ms={interference_ms:g}; at most {pool_rows} rows, "
                f"{limit_bytes} bytes",
                retry_after_s=60.0,
            )

    async def _decode(
        self,
        scheduler: ModelScheduler,
        framing: Framing,
        body: bytes | bytearray | memoryview,
        header_length: int | None,
        regions: Regions | None,
        pool_rows: int | None = None,
        bounds: Bounds | None = None,
    ) -> codec.InferenceRequest:
        """The request, each input's declared shape checked before its data is decoded: against the
        model, and for pool work (`pool_rows` not None) against the pool row limit. With `bounds`, the
        decode runs on the terms of their budget (WorkBudget.run), whatever its size."""
        model = scheduler.model
        max_rows = model.limits.max_batch_size if model.limits.is_batched else None

        def expect(name: str, datatype: str, shape: list[int]) -> None:
            model.signature.check_declared(name, datatype, shape, max_rows)
            if pool_rows is not None and max_rows is not None and shape:
                admission.check_pool_rows(scheduler.name, scheduler.batcher, shape[0], pool_rows)

        def decode() -> codec.InferenceRequest:
            try:
                return framing.decode(body, header_length, limits=self.limits, expect=expect, regions=regions)
            except RecursionError:
                raise errors.InvalidInput("request JSON is nested too deeply") from None

        if bounds is not None:
            return await bounds.budget.run(decode)
        if len(body) < DECODE_ON_THREAD_BYTES:
            return decode()
        return await asyncio.to_thread(decode)


async def _encoded(
    call: Call,
    model_version: str,
    request: codec.InferenceRequest,
    outputs: Mapping[str, np.ndarray],
    regions: Regions | None,
) -> codec.EncodedResponse:
    """The answer, written on a worker thread where it writes more than ENCODE_ON_THREAD_ELEMENTS
    tensor elements as JSON, inline otherwise; a stranger's call is charged the CPU time of the thread
    that wrote it (raised or not) to its bounds' budget."""
    spent_s = 0.0

    def encode() -> codec.EncodedResponse:
        nonlocal spent_s
        started_s = time.thread_time()
        try:
            return call.framing.encode(
                model_name=call.model,
                model_version=model_version,
                request=request,
                outputs=outputs,
                regions=regions,
            )
        finally:
            spent_s = time.thread_time() - started_s

    # gRPC's framing writes every tensor as raw bytes, whatever binary_data_output says
    is_json = isinstance(call.framing, JsonFraming)
    elements = sum(array.size for array in _json_outputs(request, outputs)) if is_json else 0
    try:
        if elements <= ENCODE_ON_THREAD_ELEMENTS:
            return encode()
        return await asyncio.to_thread(encode)
    finally:
        if call.bounds is not None:
            call.bounds.budget.charge(spent_s)


def _json_outputs(request: codec.InferenceRequest, outputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs an answer writes as JSON text: neither asked binary nor placed in shared memory."""
    return [
        outputs[wanted.name]
        for wanted in codec.wanted_outputs(request, outputs)
        if not (request.binary_output if wanted.binary is None else wanted.binary) and wanted.region is None
    ]


def _check_json_bytes(call: Call, body: bytes | bytearray | memoryview, header_length: int | None) -> None:
    """RequestTooLarge, before any parse, for more JSON than the call's bounds take: the whole body, or
    the header that the binary tensor data follows."""
    size = len(body) if header_length is None else header_length
    if call.bounds is not None and size > call.bounds.max_json_bytes:
        raise too_much_json(call, size)


def too_much_json(call: Call, size: int) -> errors.RequestTooLarge:
    """The refusal of `size` bytes of JSON, more than `call.bounds` take (a transport that sees it
    before the data plane does gives the same)."""
    assert call.bounds is not None
    how = (
        "which needs MQTT 5 (the JSON's length in the inference-header-content-length user property)"
        if call.is_json_only
        else "each input's parameters.binary_data_size, the JSON's length in inference-header-content-length"
    )
    return errors.RequestTooLarge(
        f"request JSON of {size} bytes is too large: {_whose(call)} carries at most "
        f"{call.bounds.max_json_bytes} bytes of JSON (the whole body, or the header before binary tensor "
        f"data); send tensor data as binary, {how}"
    )


def _check_json_output(
    call: Call, bounds: Bounds, request: codec.InferenceRequest, outputs: Mapping[str, np.ndarray]
) -> None:
    """RequestTooLarge, before the answer is written, for more tensor elements answered as JSON text
    than `bounds` take, or text (BYTES) outputs that could be written as more bytes of JSON than they
    take (writing them holds the GIL as parsing does)."""
    as_json = _json_outputs(request, outputs)
    how = (
        "which needs MQTT 5"
        if call.is_json_only
        else "parameters.binary_data_output true, or each output's parameters.binary_data true"
    )
    elements = sum(array.size for array in as_json)
    limit = bounds.max_json_output_elements
    if elements > limit:
        raise errors.RequestTooLarge(
            f"the answer would carry {elements} tensor elements as JSON: {_whose(call)} is answered with "
            f"at most {limit} as JSON; ask for binary outputs, {how}"
        )
    # Only within the element bound: at most that many lengths are summed.
    characters = sum(_text_length(array) for array in as_json if array.dtype.kind in "OSU")
    written = characters * JSON_BYTES_PER_CHARACTER
    limit = bounds.max_json_output_text_bytes
    if written > limit:
        raise errors.RequestTooLarge(
            f"the answer would carry {characters} bytes of text as JSON, up to {written} bytes written "
            f"(escapes take {JSON_BYTES_PER_CHARACTER} bytes a character): {_whose(call)} is answered "
            f"with at most {limit} bytes of text outputs as JSON; ask for binary outputs, {how}"
        )


def _text_length(array: np.ndarray) -> int:
    """How many characters (or bytes: each is at most one character) a text tensor is written with as
    JSON: a bound for fixed-size strings, the sum of its elements' lengths otherwise."""
    if array.dtype.kind == "S":
        return array.size * array.dtype.itemsize
    if array.dtype.kind == "U":
        return array.size * (array.dtype.itemsize // 4)
    flat = array.reshape(-1)
    try:
        return sum(map(len, flat))  # bytes and str, as the codec and ORT make them
    except TypeError:  # other objects are written as their str()
        return sum(len(item) if isinstance(item, (bytes, str)) else len(str(item)) for item in flat)


def _whose(call: Call) -> str:
    return f"{(call.priority or Priority.LINE).label} work"


def _timeout_s(call: Call, request: codec.InferenceRequest) -> float | None:
    """The tighter of the transport's deadline and the request's own timeout; None: the model's SLO."""
    limits = [call.max_timeout_s] if call.max_timeout_s else []
    if request.timeout_us:
        limits.append(request.timeout_us / 1e6)
    return min(limits) if limits else None
