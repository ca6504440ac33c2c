"""Triton's system shared-memory extension over HTTP: register, unregister and status of regions.

CUDA shared memory is not supported (ONNX Runtime here reads host memory): its status lists no region,
a registration is refused with 400, and unregistering is a no-op, so that clients can tell at once.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from appliance.dataplane.regions import RegionStatus, SharedMemory
from appliance.errors import ApplianceError, InvalidInput
from appliance.server import encoding
from appliance.server.body import BodyReceiver, ClientDisconnected, read_body
from appliance.server.errors import error_after_body
from appliance.server.repository import CLIENT_GONE, inflating
from appliance.server.responses import json_response

router = APIRouter()

MAX_REGISTER_BYTES = 64 * 1024  # a registration is {"key": ..., "offset": ..., "byte_size": ...}
NO_CUDA = (
    "CUDA shared memory is not supported: this service runs ONNX Runtime on host memory; use system "
    "shared memory (/v2/systemsharedmemory)"
)


def _regions(request: Request) -> SharedMemory:
    return request.app.state.plane.regions


def _listed(regions: list[RegionStatus]) -> Response:
    return json_response([_document(status) for status in regions])


def _document(status: RegionStatus) -> dict[str, Any]:
    return {"name": status.name, "key": status.key, "offset": status.offset, "byte_size": status.byte_size}


@router.get("/v2/systemsharedmemory/status")
async def status_all(request: Request) -> Response:
    return _listed(_regions(request).status())


@router.get("/v2/systemsharedmemory/region/{name}/status")
async def status_one(name: str, request: Request) -> Response:
    return _listed(_regions(request).status(name))


@router.post("/v2/systemsharedmemory/region/{name}/register")
async def register(name: str, request: Request) -> Response:
    """{"key": POSIX shm name, "offset": bytes into the object, "byte_size": bytes of the region}, in a
    Content-Encoding (gzip, deflate) or none, read as the inference route reads its body."""
    receiver = BodyReceiver(request.receive)
    try:
        coding = encoding.coding_of(request.scope)  # UnsupportedEncoding: 415 with Accept-Encoding
        body = await read_body(
            request.scope, receiver, MAX_REGISTER_BYTES, coding=coding, budget=inflating(request)
        )
    except ClientDisconnected:
        return Response(status_code=CLIENT_GONE)
    except ApplianceError as exc:
        # A 413 or 415 first reads and drops the rest of the body (up to body.DRAIN_BYTES), so that
        # the client reads the answer rather than a connection reset.
        retry_after_s = request.app.state.settings.server.retry_after_s
        return await error_after_body(exc, request.scope, receiver, retry_after_s)
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"registration body is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or not {"key", "byte_size"} <= document.keys():
        raise InvalidInput('registration must be {"key": "/name", "offset": 0, "byte_size": n}')
    status = _regions(request).register(
        name, document["key"], document.get("offset", 0), document["byte_size"]
    )
    return json_response(_document(status))


@router.post("/v2/systemsharedmemory/unregister")
async def unregister_all(request: Request) -> Response:
    _regions(request).unregister(None)
    return json_response({})


@router.post("/v2/systemsharedmemory/region/{name}/unregister")
async def unregister_one(name: str, request: Request) -> Response:
    _regions(request).unregister(name)
    return json_response({})


@router.get("/v2/cudasharedmemory/status")
async def cuda_status_all() -> Response:
    return json_response([])


@router.get("/v2/cudasharedmemory/region/{name}/status")
async def cuda_status_one(name: str) -> Response:
    raise InvalidInput(f"no CUDA shared-memory region {name!r}: {NO_CUDA}")


@router.post("/v2/cudasharedmemory/region/{name}/register")
async def cuda_register(name: str) -> Response:
    raise InvalidInput(NO_CUDA)


@router.post("/v2/cudasharedmemory/unregister")
async def cuda_unregister_all() -> Response:
    return json_response({})


@router.post("/v2/cudasharedmemory/region/{name}/unregister")
async def cuda_unregister_one(name: str) -> Response:
    return json_response({})
