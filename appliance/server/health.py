"""Server metadata, liveness, readiness, Prometheus metrics and the capacity report."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from appliance import __version__
from appliance.scheduler.hub import ModelHub
from appliance.scheduler.report import capacity_report
from appliance.server import metrics
from appliance.server.errors import error_response
from appliance.server.responses import json_response

router = APIRouter()

EXTENSIONS = [
    "binary_tensor_data",
    "model_repository",
    "statistics",
    "model_configuration",
    "schedule_policy",
]


@router.get("/v2")
async def server_metadata() -> Response:
    return json_response({"name": "appliance", "version": __version__, "extensions": EXTENSIONS})


@router.get("/v2/health/live")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready")
async def ready(request: Request) -> Response:
    """Ready once every model has been tried (loaded and warm, or UNAVAILABLE) and while not draining."""
    hub: ModelHub = request.app.state.hub
    if hub.is_draining:
        return error_response(503, "draining: not accepting requests", retry_after_s=5.0)
    if not hub.is_loaded:
        return error_response(503, "loading models", retry_after_s=1.0)
    return json_response({"ready": True})


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(metrics.render(request.app.state.hub), media_type=metrics.CONTENT_TYPE)


@router.get("/capacity")
async def capacity(request: Request) -> Response:
    return json_response(capacity_report(request.app.state.hub))
