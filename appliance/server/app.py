"""Build the ASGI application around the data plane; it starts nothing on its own."""

from __future__ import annotations

import hmac

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance import __version__
from appliance.dataplane.plane import DataPlane
from appliance.errors import Unauthorised
from appliance.scheduler.queues import Priority
from appliance.server import errors, health, metrics, models, repository, shm
from appliance.server.errors import appliance_error_response
from appliance.server.inference import InferenceRoute
from appliance.settings import Settings

_OPEN_PATHS = ("/v2/health/", "/metrics")


def create_app(plane: DataPlane, settings: Settings) -> ASGIApp:
    """Bearer token check (if configured) -> inference fast path -> FastAPI for everything else."""
    app = FastAPI(title="appliance", version=__version__, docs_url=None, redoc_url=None)
    app.state.hub = plane.hub
    app.state.plane = plane
    app.state.settings = settings
    app.state.metrics = metrics.registry(plane)
    for router in (health.router, models.router, repository.router, shm.router):
        app.include_router(router)
    errors.install(app, settings.server.retry_after_s)
    inference = InferenceRoute(app, plane, settings.server.max_inflating_bytes)
    app.state.inflating = inference.inflating  # one server.max_inflating_bytes for every route's bodies
    asgi: ASGIApp = inference
    token = settings.server.api_token
    if token is not None:
        asgi = BearerToken(asgi, token=token.get_secret_value(), plane=plane)
    return asgi


class BearerToken:
    """Requires 'Authorization: Bearer <token>' everywhere but health and metrics."""

    def __init__(self, app: ASGIApp, token: str, plane: DataPlane | None = None) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()
        self._plane = plane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(_OPEN_PATHS):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                refusal = Unauthorised("missing or wrong bearer token (server.api_token)")
                if self._plane is not None:
                    self._plane.refuse(_model_of(scope["path"]), Priority.LINE, refusal)
                await appliance_error_response(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _model_of(path: str) -> str | None:
    """The model a /v2/models/<name>/... path names, for counting refusals under it."""
    parts = path.split("/")
    return parts[3] if len(parts) > 3 and parts[1:3] == ["v2", "models"] and parts[3] != "stats" else None
