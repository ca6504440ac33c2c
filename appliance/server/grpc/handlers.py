"""The RPCs of inference.GRPCInferenceService on the data plane, the hub and the shared-memory regions.

Every RPC but ServerLive and ServerReady needs 'authorization: Bearer <token>' metadata when
server.api_token is set (HTTP's open routes are the health ones too). Errors are the data plane's
table's gRPC codes, with the same messages as HTTP and a `retry-after` trailer where HTTP has one.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from appliance import __version__, errors
from appliance.dataplane import outcomes
from appliance.dataplane.plane import Answer, Call, DataPlane
from appliance.scheduler.queues import Priority
from appliance.scheduler.view import ModelView
from appliance.server import documents, health, repository, shm
from appliance.server.grpc import messages, streams, wire
from appliance.server.grpc.framing import GrpcFraming
from appliance.settings import Settings

log = logging.getLogger(__name__)

OPEN_METHODS = ("ServerLive", "ServerReady")
# Requests that name a model: a refusal of one is counted under it, as HTTP counts /v2/models/<m>/...
NAMING_A_MODEL = {"ModelInferRequest": "model_name"} | dict.fromkeys(
    ("ModelReadyRequest", "ModelMetadataRequest", "ModelConfigRequest", "ModelStatisticsRequest"), "name"
)
Handler = Callable[[Any], Awaitable[Any]]


class Handlers:
    """One service's RPCs; `generic()` hands them to a grpc.aio server (raw bytes in and out, so that
    ModelInfer parses its message once and the data plane bounds its size)."""

    def __init__(self, plane: DataPlane, settings: Settings) -> None:
        self.plane = plane
        self.hub = plane.hub
        self.settings = settings
        token = settings.server.api_token
        self._expected = f"Bearer {token.get_secret_value()}".encode() if token is not None else None

    def generic(self) -> grpc.GenericRpcHandler:
        unary: dict[str, Handler] = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ModelReady": self.model_ready,
            "ServerMetadata": self.server_metadata,
            "ModelMetadata": self.model_metadata,
            "ModelConfig": self.model_config,
            "ModelStatistics": self.model_statistics,
            "RepositoryIndex": self.repository_index,
            "RepositoryModelLoad": self.repository_load,
            "RepositoryModelUnload": self.repository_unload,
            "SystemSharedMemoryStatus": self.shm_status,
            "SystemSharedMemoryRegister": self.shm_register,
            "SystemSharedMemoryUnregister": self.shm_unregister,
            "CudaSharedMemoryStatus": self.cuda_status,
            "CudaSharedMemoryRegister": self.cuda_register,
            "CudaSharedMemoryUnregister": self.cuda_unregister,
        }
        table = {name: grpc.unary_unary_rpc_method_handler(self._unary(name, h)) for name, h in unary.items()}
        table["ModelInfer"] = grpc.unary_unary_rpc_method_handler(self.model_infer)
        table["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self.model_stream_infer)
        return grpc.method_handlers_generic_handler(messages.SERVICE, table)

    def _unary(self, method: str, handler: Handler) -> Callable[[bytes, Any], Awaitable[bytes]]:
        request_class = messages.request_of(method)

        async def behaviour(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                if method not in OPEN_METHODS:
                    self.authorise(context, data, request_class)
                response = await handler(_parse(request_class, data))
                return response.SerializeToString()
            except errors.ApplianceError as exc:
                await abort(context, exc, self.settings.server.retry_after_s)
            except Exception as exc:
                log.exception("gRPC %s failed unexpectedly", method)
                failure = errors.InferenceFailed(f"internal error: {type(exc).__name__}: {exc}")
                await abort(context, failure, self.settings.server.retry_after_s)
            raise AssertionError("abort returns only by raising")  # pragma: no cover

        return behaviour

    def authorise(self, context: grpc.aio.ServicerContext, data: bytes, request_class: type) -> None:
        """Unauthorised, counted under the model the request names, unless the token is right."""
        if self._expected is None:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return
        refusal = errors.Unauthorised("missing or wrong bearer token (server.api_token) in 'authorization'")
        field = NAMING_A_MODEL.get(request_class.DESCRIPTOR.name)
        try:
            model = getattr(request_class.FromString(data), field) if field else None
        except DecodeError:
            model = None
        self.plane.refuse(model or None, Priority.LINE, refusal)
        raise refusal

    # Inference --------------------------------------------------------------------------------

    async def model_infer(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            self.authorise(context, data, messages.ModelInferRequest)
            answer = await self.infer(data)
            return answer.encoded.parts[0]
        except errors.ApplianceError as exc:
            await abort(context, exc, self.settings.server.retry_after_s)
            raise AssertionError("abort returns only by raising") from exc

    async def infer(self, data: bytes) -> Answer:
        """One ModelInferRequest through the data plane; counted once whatever refuses it."""
        return await self._infer(data, *self._parse(data))

    async def infer_in_stream(self, data: bytes) -> Answer:
        """infer() for ModelStreamInfer: a refusal after the request parsed is streams.RequestFailed,
        which names the request in its error response."""
        message, raw = self._parse(data)
        try:
            return await self._infer(data, message, raw)
        except errors.ApplianceError as exc:
            raise streams.RequestFailed(exc, message) from exc

    def _parse(self, data: bytes) -> tuple[Any, list[memoryview]]:
        try:
            return wire.parse_infer_request(data)
        except DecodeError as exc:
            failure = errors.InvalidInput(f"request is not a valid inference.ModelInferRequest: {exc}")
            self.plane.refuse(None, Priority.LINE, failure)
            raise failure from None

    async def _infer(self, data: bytes, message: Any, raw: list[memoryview]) -> Answer:
        model = message.model_name

        async def read(limit_bytes: int) -> bytes:
            if len(data) > limit_bytes:
                raise errors.RequestTooLarge(
                    f"request message of {len(data)} bytes is too large: model {model!r} takes at most "
                    f"{limit_bytes} bytes (server.max_body_bytes and the model's inputs)"
                )
            return data

        call = Call(
            model,
            message.model_version or None,
            read,
            framing=GrpcFraming(message, raw),
            has_shared_memory=True,
        )
        return await self.plane.infer(call)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Each request answered as it completes, in a ModelStreamInferResponse; an error ends only
        its own request (error_message, with the request's id and model), as Triton's stream does."""
        try:
            self.authorise(context, b"", messages.ModelInferRequest)
        except errors.ApplianceError as exc:
            await abort(context, exc, self.settings.server.retry_after_s)
        async for response in streams.answer_each(requests, self.infer_in_stream):
            yield response

    # Health, metadata, statistics, repository --------------------------------------------------

    async def server_live(self, _: Any) -> Any:
        return messages.response_of("ServerLive")(live=True)

    async def server_ready(self, _: Any) -> Any:
        ready = health.not_ready(self.hub, self.settings.server.strict_readiness) is None
        return messages.response_of("ServerReady")(ready=ready)

    async def model_ready(self, request: Any) -> Any:
        try:
            self.hub.scheduler(request.name, request.version or None)
        except (errors.ModelNotFound, errors.ModelNotReady):
            return messages.response_of("ModelReady")(ready=False)
        return messages.response_of("ModelReady")(ready=True)

    async def server_metadata(self, _: Any) -> Any:
        return messages.response_of("ServerMetadata")(
            name="appliance", version=__version__, extensions=health.EXTENSIONS
        )

    def _view(self, name: str, version: str) -> ModelView:
        self.hub.scheduler(name, version or None)  # 404 or 503 as over HTTP
        return ModelView.of(self.hub.entry(name))

    async def model_metadata(self, request: Any) -> Any:
        document = documents.metadata(self._view(request.name, request.version))
        return _from_json(document, messages.response_of("ModelMetadata"))

    async def model_config(self, request: Any) -> Any:
        document = {"config": documents.config(self._view(request.name, request.version))}
        return _from_json(document, messages.response_of("ModelConfig"))

    async def model_statistics(self, request: Any) -> Any:
        """One model's statistics, or every model's when no name is given; a version is checked only
        against a named model: with no name, Triton ignores it (TRITONSERVER_ServerModelStatistics)."""
        if not request.name:
            entries = list(self.hub)
        else:
            entry = self.hub.entry(request.name)
            if request.version and entry.version and entry.version != request.version:
                raise errors.ModelNotFound(
                    f"model {request.name!r} version {request.version} is not served; serving version "
                    f"{entry.version}"
                )
            entries = [entry]
        stats = [documents.statistics(e, self.plane.refusals.of_model(e.name)) for e in entries]
        return _from_json({"model_stats": stats}, messages.response_of("ModelStatistics"))

    async def repository_index(self, request: Any) -> Any:
        _one_repository(request.repository_name)
        listed = await repository.index_listing(self.hub, only_ready=request.ready)
        return _from_json({"models": listed}, messages.response_of("RepositoryIndex"))

    async def repository_load(self, request: Any) -> Any:
        _one_repository(request.repository_name)
        repository.check_load_parameters(request.parameters.keys())
        await repository.load_model(self.hub, request.model_name)
        return messages.response_of("RepositoryModelLoad")()

    async def repository_unload(self, request: Any) -> Any:
        _one_repository(request.repository_name)
        await self.hub.unload(request.model_name)
        return messages.response_of("RepositoryModelUnload")()

    # Shared memory ------------------------------------------------------------------------------

    async def shm_status(self, request: Any) -> Any:
        response = messages.response_of("SystemSharedMemoryStatus")()
        for status in self.plane.regions.status(request.name or None):
            region = response.regions[status.name]
            region.name, region.key = status.name, status.key
            region.offset, region.byte_size = status.offset, status.byte_size
        return response

    async def shm_register(self, request: Any) -> Any:
        self.plane.regions.register(request.name, request.key, request.offset, request.byte_size)
        return messages.response_of("SystemSharedMemoryRegister")()

    async def shm_unregister(self, request: Any) -> Any:
        self.plane.regions.unregister(request.name or None)
        return messages.response_of("SystemSharedMemoryUnregister")()

    async def cuda_status(self, _: Any) -> Any:
        return messages.response_of("CudaSharedMemoryStatus")()  # no region: there are none

    async def cuda_register(self, _: Any) -> Any:
        raise errors.InvalidInput(shm.NO_CUDA)

    async def cuda_unregister(self, _: Any) -> Any:
        return messages.response_of("CudaSharedMemoryUnregister")()


def _parse(message_class: type, data: bytes) -> Any:
    try:
        return message_class.FromString(data)
    except DecodeError as exc:
        name = message_class.DESCRIPTOR.name
        raise errors.InvalidInput(f"request is not a valid inference.{name}: {exc}") from None


def _from_json(document: dict[str, Any], message_class: type) -> Any:
    """The HTTP answer's document as the RPC's message: one source for both (server/documents.py);
    fields the protocol has no place for (our extras) are left out."""
    return json_format.ParseDict(document, message_class(), ignore_unknown_fields=True)


async def abort(context: grpc.aio.ServicerContext, exc: errors.ApplianceError, retry_after_s: float) -> None:
    """End the RPC with the table's code and the error's message (raises, as grpc.aio's abort does)."""
    outcome = outcomes.outcome_of(exc)
    trailing: tuple[tuple[str, str], ...] = ()
    wait_s = outcomes.retry_after_s(exc, retry_after_s)
    if wait_s is not None:
        trailing = (("retry-after", outcomes.retry_after_header(wait_s)),)
    await context.abort(grpc.StatusCode[outcome.grpc_code], str(exc), trailing_metadata=trailing)


def _one_repository(name: str) -> None:
    """A repository request naming a repository is refused, as Triton refuses it ("'repository_name'
    specification is not supported"), rather than answered for the one repository this server has."""
    if name:
        shown = name if len(name) <= 64 else f"{name[:61]}..."
        raise errors.InvalidInput(
            f"repository_name {shown!r} is not supported: this server has one repository "
            "(models.repository); leave it empty"
        )
