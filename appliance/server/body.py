"""Read an ASGI request body under a size limit, refusing an oversized one before it is read whole."""

from __future__ import annotations

from starlette.types import Receive, Scope

from appliance.dataplane.plane import CallAbandoned
from appliance.errors import RequestTooLarge
from appliance.protocol.codec import decimal


class ClientDisconnected(CallAbandoned):
    """The client went away before sending its whole body."""


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(scope: Scope, receive: Receive, limit_bytes: int, *, model: str | None = None) -> bytes:
    """The whole body; RequestTooLarge as soon as Content-Length or the bytes received pass the limit.

    The limit is the model's (what a request to it can need) or server.max_body_bytes; reads stop
    there, so a client cannot make the service hold more than that for one request.
    """
    whose = f"model {model!r} takes" if model else "the limit is"
    declared = decimal(header(scope, b"content-length"), "Content-Length")
    if declared is not None and declared > limit_bytes:
        raise RequestTooLarge(
            f"request body of {declared} bytes is too large: {whose} at most {limit_bytes} bytes "
            "(server.max_body_bytes and the model's inputs)"
        )
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit_bytes:
            raise RequestTooLarge(
                f"request body is too large: {whose} at most {limit_bytes} bytes "
                "(server.max_body_bytes and the model's inputs)"
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
