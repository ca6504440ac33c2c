"""POST /v2/models/{m}[/versions/{v}]/infer as plain ASGI: the HTTP framing of the data plane.

Everything else goes on to FastAPI. Measured with bench/throughput.py: FastAPI's routing,
dependency and middleware layers cost more per request than decoding a binary tensor.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.dataplane.plane import Call, DataPlane
from appliance.errors import ApplianceError
from appliance.protocol import codec
from appliance.server import encoding
from appliance.server.body import BodyReceiver, ClientDisconnected, header, read_body
from appliance.server.errors import error_after_body, error_response

ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
_JSON = [(b"content-type", b"application/json")]
_BINARY = [(b"content-type", b"application/octet-stream")]
_HEADER_LENGTH = codec.HEADER_LENGTH.encode()


class InferenceRoute:
    """ASGI middleware answering inference requests itself and passing every other request on."""

    def __init__(self, app: ASGIApp, plane: DataPlane, inflating_bytes: int) -> None:
        self.app = app
        self.plane = plane
        self.inflating = encoding.InflatingBudget(inflating_bytes, plane.retry_after_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = ROUTE.match(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            message = f"{scope['method']} is not allowed on {scope['path']}; use POST"
            await error_response(405, message, headers={"Allow": "POST"})(scope, receive, send)
            return
        model, version = match.group(1), match.group(2)
        body = BodyReceiver(receive)

        async def read(limit_bytes: int) -> bytes:
            coding = encoding.coding_of(scope)  # UnsupportedEncoding: 415, counted as the plane's refusal
            return await read_body(
                scope, body, limit_bytes, model=model, coding=coding, budget=self.inflating
            )

        try:
            call = Call(
                model, version, read, header_length=header(scope, _HEADER_LENGTH), has_shared_memory=True
            )
            answer = await self.plane.infer(call)
        except ClientDisconnected:
            return
        except ApplianceError as exc:
            answer = await error_after_body(exc, scope, body, self.plane.retry_after_s)
            await answer(scope, receive, send)
            return
        encoded = answer.encoded
        headers = list(_JSON)
        if encoded.header_length is not None:
            headers = [*_BINARY, (_HEADER_LENGTH, str(encoded.header_length).encode())]
        body = encoded.body()
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
