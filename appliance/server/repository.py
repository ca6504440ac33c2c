"""The repository extension: index, load (or reload, atomically) and unload models."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from appliance.engine.repository import ModelSource
from appliance.errors import ApplianceError, InvalidInput, ModelLoadError
from appliance.scheduler.hub import ModelEntry, ModelHub, State
from appliance.server import encoding
from appliance.server.body import DRAIN_BYTES, BodyReceiver, ClientDisconnected, read_body
from appliance.server.errors import error_after_body
from appliance.server.responses import json_response
from appliance.text import json_kind

router = APIRouter()

MAX_INDEX_BODY_BYTES = 64 * 1024  # an index request is {"ready": true}
# A load request is {} or {"parameters": {}}; up to this, one carrying Triton's overrides (a model file
# in base64 under "file:...") is read and refused naming them, and a larger one gets 413 saying so too.
MAX_LOAD_BODY_BYTES = DRAIN_BYTES
NO_OVERRIDES = "config and file: overrides are not supported; edit the model folder"
CLIENT_GONE = 499  # what the access log shows for a request whose client left before its body was in


@router.post("/v2/repository/index")
async def index(request: Request) -> Response:
    """Every model, or with {"ready": true} only the READY ones (Triton's HTTP index ignores the
    body's other keys, and so does this)."""
    body = BodyReceiver(request.receive)
    try:
        document = await _document(request, body, MAX_INDEX_BODY_BYTES, "index")
        only_ready = document.get("ready", False)
        if not isinstance(only_ready, bool):
            raise InvalidInput(f"index request's 'ready' is {json_kind(only_ready)}; expected true or false")
    except ClientDisconnected:
        return Response(status_code=CLIENT_GONE)
    except ApplianceError as exc:
        return await _refusal(exc, request, body)
    return json_response(await index_listing(request.app.state.hub, only_ready=only_ready))


async def index_listing(hub: ModelHub, *, only_ready: bool = False) -> list[dict[str, str]]:
    """listing() with the repository read on a worker thread: it reads every model's manifest or
    config.pbtxt from disk (parsing those that changed), which must not hold the event loop. The index
    over HTTP and gRPC; `only_ready` keeps the READY models alone (the request's `ready`)."""
    listed = listing(hub, await asyncio.to_thread(hub.repository.index))
    return [m for m in listed if m["state"] == State.READY.value] if only_ready else listed


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
    body = BodyReceiver(request.receive)
    limit_says = f"a load request takes at most {MAX_LOAD_BODY_BYTES} bytes: {NO_OVERRIDES}"
    try:
        document = await _document(request, body, MAX_LOAD_BODY_BYTES, "load", limit_says)
        parameters = document.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidInput(f"load request's 'parameters' is {json_kind(parameters)}; expected an object")
        check_load_parameters(parameters)
    except ClientDisconnected:
        return Response(status_code=CLIENT_GONE)
    except ApplianceError as exc:
        return await _refusal(exc, request, body)
    entry = await load_model(request.app.state.hub, name)
    return json_response({"name": name, "version": entry.version, "state": entry.state.value})


def check_load_parameters(names: Iterable[str]) -> None:
    """Refuse every load parameter (HTTP's body and gRPC's message). Triton's are `config`, a model
    configuration that replaces the one on disk, and `file:<path>`, a file of the model folder: a load
    that cannot honour them must fail rather than load what is on disk and answer success. Any other
    name is refused as Triton's gRPC refuses it ("unrecognized load parameter")."""
    names = sorted(names)
    overrides = [n for n in names if n == "config" or n.startswith("file:")]
    if overrides:
        raise InvalidInput(f"load parameter {_names(overrides)}: {NO_OVERRIDES}")
    if names:
        raise InvalidInput(
            f"unrecognized load parameter {_names(names)}: a load here takes none ({NO_OVERRIDES})"
        )


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


async def _document(
    request: Request, body: BodyReceiver, limit_bytes: int, what: str, limit_says: str | None = None
) -> dict[str, Any]:
    """The JSON object a repository request's body holds; {} for an empty body (what tritonclient
    sends). A gzip or deflate body (Content-Encoding) is inflated as the inference route's is: under
    `limit_bytes` counted inflated, from the same server.max_inflating_bytes; UnsupportedEncoding (415)
    for another coding. RequestTooLarge past `limit_bytes`, InvalidInput for anything but one JSON
    object."""
    coding = encoding.coding_of(request.scope)
    data = await read_body(
        request.scope, body, limit_bytes, limit_says=limit_says, coding=coding, budget=inflating(request)
    )
    if not data:
        return {}
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"{what} request body is {json_kind(document)}; expected a JSON object")
    return document


def inflating(request: Request) -> encoding.InflatingBudget | None:
    """What the compressed bodies being read may inflate to, all together (server.max_inflating_bytes):
    the inference route's budget, which create_app leaves in the app's state for the other routes that
    read a body (here and shm). None in an app without it: each body is then bounded by its own limit
    alone."""
    return getattr(request.app.state, "inflating", None)


async def _refusal(exc: ApplianceError, request: Request, body: BodyReceiver) -> Response:
    """The answer to a refused request; a 413 first reads and drops what is left of the body, up to
    body.DRAIN_BYTES, so that the client reads the answer rather than a connection reset."""
    return await error_after_body(exc, request.scope, body, request.app.state.settings.server.retry_after_s)


def _names(names: list[str]) -> str:
    """Parameter names from a request, quoted, each cut to 64 characters and at most five of them."""
    shown = [repr(n if len(n) <= 64 else f"{n[:61]}...") for n in names[:5]]
    return ", ".join(shown) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
