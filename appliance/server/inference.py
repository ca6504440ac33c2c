"""POST /v2/models/{m}[/versions/{v}]/infer: JSON or binary tensors in, the same way out."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from appliance.errors import InvalidInput
from appliance.protocol import codec
from appliance.scheduler.hub import ModelHub
from appliance.scheduler.queues import Priority
from appliance.server.body import read_body

router = APIRouter()


@router.post("/v2/models/{model_name}/infer")
async def infer(model_name: str, request: Request) -> Response:
    return await _infer(request, model_name, None)


@router.post("/v2/models/{model_name}/versions/{version}/infer")
async def infer_version(model_name: str, version: str, request: Request) -> Response:
    return await _infer(request, model_name, version)


def priority_class(priority: int) -> Priority:
    """Triton's parameters.priority: 0 (default) and 1 are line traffic; 2 and above run as pool work."""
    return Priority.LINE if priority <= 1 else Priority.POOL


async def _infer(request: Request, model_name: str, version: str | None) -> Response:
    hub: ModelHub = request.app.state.hub
    scheduler = hub.scheduler(model_name, version)
    body = await read_body(request, request.app.state.settings.server.max_body_bytes)
    decoded = codec.decode_request(body, _header_length(request))
    if decoded.outputs is not None:
        scheduler.model.signature.check_outputs([o.name for o in decoded.outputs])
    timeout_us = decoded.timeout_us
    outputs = await scheduler.infer(
        decoded.inputs,
        priority=priority_class(decoded.priority),
        timeout_s=timeout_us / 1e6 if timeout_us else None,
    )
    encoded = codec.encode_response(
        model_name=model_name, model_version=scheduler.model.version, request=decoded, outputs=outputs
    )
    headers = {} if encoded.header_length is None else {codec.HEADER_LENGTH: str(encoded.header_length)}
    return Response(encoded.body(), media_type=encoded.content_type, headers=headers)


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(codec.HEADER_LENGTH)
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length {raw!r} is not a non-negative integer")
    return int(raw)
