"""Build the ASGI application around a ModelHub; it starts nothing on its own."""

from __future__ import annotations

import hmac

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance import __version__
from appliance.scheduler.hub import ModelHub
from appliance.server import errors, health, models, repository
from appliance.server.errors import error_response
from appliance.server.inference import InferenceRoute
from appliance.settings import Settings

_OPEN_PATHS = ("/v2/health/", "/metrics")


def create_app(hub: ModelHub, settings: Settings) -> ASGIApp:
    """Bearer token check (if configured) -> inference fast path -> FastAPI for everything else."""
    app = FastAPI(title="appliance", version=__version__, docs_url=None, redoc_url=None)
    app.state.hub = hub
    app.state.settings = settings
    for router in (health.router, models.router, repository.router):
        app.include_router(router)
    errors.install(app)
    asgi: ASGIApp = InferenceRoute(app, hub, settings)
    token = settings.server.api_token
    if token is not None:
        asgi = BearerToken(asgi, token=token.get_secret_value())
    return asgi


class BearerToken:
    """Requires 'Authorization: Bearer <token>' everywhere but health and metrics."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(_OPEN_PATHS):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                await error_response(401, "missing or wrong bearer token (server.api_token)")(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)
