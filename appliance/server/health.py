"""Server metadata, liveness, readiness, Prometheus metrics and the capacity report."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from appliance import __version__
from appliance.scheduler.hub import ModelHub, State
from appliance.scheduler.report import capacity_report
from appliance.server import metrics
from appliance.server.errors import error_response
from appliance.server.responses import json_response
from appliance.settings import Settings

router = APIRouter()

EXTENSIONS = [
    "binary_tensor_data",
    "model_repository",
    "statistics",
    "model_configuration",
    "schedule_policy",
    "system_shared_memory",
]


@router.get("/v2")
async def server_metadata() -> Response:
    return json_response({"name": "appliance", "version": __version__, "extensions": EXTENSIONS})


@router.get("/v2/health/live")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready")
async def ready(request: Request) -> Response:
    """Triton's readiness: never while loading, draining or serving no model; with
    server.strict_readiness (Triton's default) only while every model is READY."""
    hub: ModelHub = request.app.state.hub
    settings: Settings = request.app.state.settings
    retry_after_s = settings.server.retry_after_s
    if hub.is_draining:
        return error_response(503, "draining: not accepting requests", retry_after_s, {"Connection": "close"})
    if not hub.is_loaded:
        return error_response(503, "loading models", retry_after_s)
    entries = list(hub)
    not_ready = [f"{e.name} ({e.state.value})" for e in entries if e.state is not State.READY]
    if len(not_ready) == len(entries):
        found = f"; models: {', '.join(not_ready)}" if not_ready else f" in {hub.repository.root}"
        return error_response(503, f"no model is READY{found}", retry_after_s)
    if not_ready and settings.server.strict_readiness:
        return error_response(
            503,
            f"not every model is READY (server.strict_readiness): {', '.join(not_ready)}",
            retry_after_s,
        )
    return json_response({"ready": True})


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(metrics.render(request.app.state.metrics), media_type=metrics.CONTENT_TYPE)


@router.get("/capacity")
async def capacity(request: Request) -> Response:
    return json_response(capacity_report(request.app.state.hub))
