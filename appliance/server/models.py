"""Model metadata, readiness, Triton-style config and statistics routes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from appliance.dataplane.plane import DataPlane
from appliance.errors import ModelNotFound, ModelNotReady
from appliance.scheduler.hub import ModelEntry, ModelHub, State
from appliance.scheduler.view import ModelView
from appliance.server import documents
from appliance.server.errors import appliance_error_response
from appliance.server.responses import json_response

router = APIRouter()


def _hub(request: Request) -> ModelHub:
    return request.app.state.hub


def _serving(request: Request, name: str, version: str | None) -> ModelView:
    """The view of a model that serves (that version, if given); 404 or 503 otherwise."""
    hub = _hub(request)
    hub.scheduler(name, version)
    return ModelView.of(hub.entry(name))


@router.get("/v2/models/stats")
async def all_stats(request: Request) -> Response:
    return json_response({"model_stats": [_statistics(request, e) for e in _hub(request)]})


@router.get("/v2/models/{name}")
async def model_metadata(name: str, request: Request) -> Response:
    return json_response(documents.metadata(_serving(request, name, None)))


@router.get("/v2/models/{name}/versions/{version}")
async def model_version_metadata(name: str, version: str, request: Request) -> Response:
    return json_response(documents.metadata(_serving(request, name, version)))


@router.get("/v2/models/{name}/ready")
async def model_ready(name: str, request: Request) -> Response:
    return _readiness(request, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, request: Request) -> Response:
    return _readiness(request, name, version)


def _readiness(request: Request, name: str, version: str | None) -> Response:
    try:
        _serving(request, name, version)
    except ModelNotReady as exc:  # still a ModelNotFound (404) for unknown names and versions
        return appliance_error_response(exc)
    return json_response({"name": name, "ready": True})


@router.get("/v2/models/{name}/config")
async def model_config(name: str, request: Request) -> Response:
    return json_response(documents.config(_serving(request, name, None)))


@router.get("/v2/models/{name}/versions/{version}/config")
async def model_version_config(name: str, version: str, request: Request) -> Response:
    return json_response(documents.config(_serving(request, name, version)))


@router.get("/v2/models/{name}/stats")
async def model_stats(name: str, request: Request) -> Response:
    return json_response({"model_stats": [_statistics(request, _hub(request).entry(name))]})


@router.get("/v2/models/{name}/versions/{version}/stats")
async def model_version_stats(name: str, version: str, request: Request) -> Response:
    entry = _hub(request).entry(name)
    if entry.state is State.READY and entry.version != version:
        raise ModelNotFound(
            f"model {name!r} version {version} is not served; serving version {entry.version}"
        )
    return json_response({"model_stats": [_statistics(request, entry)]})


def _statistics(request: Request, entry: ModelEntry) -> dict[str, Any]:
    plane: DataPlane = request.app.state.plane
    return documents.statistics(entry, plane.refusals.of_model(entry.name))
