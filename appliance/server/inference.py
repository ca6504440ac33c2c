"""POST /v2/models/{m}[/versions/{v}]/infer as plain ASGI: the hot path skips the web framework.

Everything else goes on to FastAPI. Measured with bench/throughput.py: FastAPI's routing,
dependency and middleware layers cost more per request than decoding a binary tensor.
"""

from __future__ import annotations

import logging
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.errors import ApplianceError, InvalidInput
from appliance.protocol import codec
from appliance.scheduler.hub import ModelHub
from appliance.scheduler.queues import Priority
from appliance.server.body import ClientDisconnected, header, read_body
from appliance.server.errors import appliance_error_response, error_response
from appliance.settings import Settings

log = logging.getLogger(__name__)

ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
_JSON = [(b"content-type", b"application/json")]
_BINARY = [(b"content-type", b"application/octet-stream")]


def priority_class(priority: int) -> Priority:
    """Triton's parameters.priority: 0 (default) and 1 are line traffic; 2 and above run as pool work."""
    return Priority.LINE if priority <= 1 else Priority.POOL


class InferenceRoute:
    """ASGI middleware answering inference requests itself and passing every other request on."""

    def __init__(self, app: ASGIApp, hub: ModelHub, settings: Settings) -> None:
        self.app = app
        self.hub = hub
        self.max_body_bytes = settings.server.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = ROUTE.match(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            await error_response(405, f"{scope['method']} is not allowed on {scope['path']}; use POST")(
                scope, receive, send
            )
            return
        try:
            status, headers, body = await self._infer(scope, receive, match.group(1), match.group(2))
        except ClientDisconnected:
            return
        except ApplianceError as exc:
            await appliance_error_response(exc)(scope, receive, send)
            return
        except Exception as exc:
            log.exception("inference on %s failed unexpectedly", scope["path"])
            await error_response(500, f"internal error: {type(exc).__name__}: {exc}")(scope, receive, send)
            return
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _infer(
        self, scope: Scope, receive: Receive, model_name: str, version: str | None
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        self.hub.scheduler(model_name, version)  # 404 or 503 before reading a body in vain
        body = await read_body(scope, receive, self.max_body_bytes)
        decoded = codec.decode_request(body, _header_length(scope))
        # Look up again with no await before admission: a reload may have swapped the model meanwhile.
        scheduler = self.hub.scheduler(model_name, version)
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
        if encoded.header_length is None:
            return 200, list(_JSON), encoded.body()
        headers = [*_BINARY, (codec.HEADER_LENGTH.encode(), str(encoded.header_length).encode())]
        return 200, headers, encoded.body()


def _header_length(scope: Scope) -> int | None:
    raw = header(scope, codec.HEADER_LENGTH.encode())
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise InvalidInput(f"Inference-Header-Content-Length {raw!r} is not a non-negative integer")
    return int(raw)
