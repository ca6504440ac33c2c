"""The repository extension: index, load (or reload, atomically) and unload models."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.responses import Response

from appliance.engine.repository import ModelSource
from appliance.errors import ApplianceError, ModelLoadError
from appliance.scheduler.hub import ModelEntry, ModelHub, State
from appliance.server.responses import json_response

router = APIRouter()


@router.post("/v2/repository/index")
async def index(request: Request) -> Response:
    return json_response(await index_listing(request.app.state.hub))


async def index_listing(hub: ModelHub) -> list[dict[str, str]]:
    """listing() with the repository read on a worker thread: it reads every model's manifest or
    config.pbtxt from disk (parsing those that changed), which must not hold the event loop."""
    return listing(hub, await asyncio.to_thread(hub.repository.index))


def listing(
    hub: ModelHub, on_disk: dict[str, ModelSource | ApplianceError] | None = None
) -> list[dict[str, str]]:
    """Every model on disk or in memory: name, version, state and the reason it is not READY (the
    index over HTTP and gRPC). `on_disk` is hub.repository.index(), read here if not given."""
    listed: dict[str, dict[str, str]] = {}
    for name, source in (hub.repository.index() if on_disk is None else on_disk).items():
        version = "" if isinstance(source, ApplianceError) else str(source.version)
        listed[name] = {
            "name": name,
            "version": version,
            "state": State.UNAVAILABLE.value,
            "reason": "not loaded",
        }
    for entry in hub:
        listed[entry.name] = {
            "name": entry.name,
            "version": entry.version or listed.get(entry.name, {}).get("version", ""),
            "state": entry.state.value,
            "reason": entry.reason,
        }
    return [listed[name] for name in sorted(listed)]


@router.post("/v2/repository/models/{name}/load")
async def load(name: str, request: Request) -> Response:
    entry = await load_model(request.app.state.hub, name)
    return json_response({"name": name, "version": entry.version, "state": entry.state.value})


async def load_model(hub: ModelHub, name: str) -> ModelEntry:
    """Load or reload from disk (HTTP and gRPC). In-flight requests finish on the old version; none
    fail. ModelLoadError when the model does not come up READY."""
    entry = await hub.load(name)
    if entry.state is not State.READY:
        raise ModelLoadError(f"failed to load {name!r}: {entry.reason}")
    return entry


@router.post("/v2/repository/models/{name}/unload")
async def unload(name: str, request: Request) -> Response:
    hub: ModelHub = request.app.state.hub
    await hub.unload(name)
    return json_response({"name": name, "state": State.UNAVAILABLE.value})
