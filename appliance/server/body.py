"""Read an ASGI request body under a size limit, refusing an oversized one before it is read whole."""

from __future__ import annotations

from starlette.types import Receive, Scope

from appliance.errors import InvalidInput, RequestTooLarge


class ClientDisconnected(Exception):
    """The client went away before sending its whole body."""


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(scope: Scope, receive: Receive, limit_bytes: int) -> bytes:
    """The whole body; RequestTooLarge as soon as Content-Length or the bytes received pass the limit."""
    declared = header(scope, b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput(f"Content-Length {declared!r} is not a number")
        if int(declared) > limit_bytes:
            raise RequestTooLarge(
                f"request body of {int(declared)} bytes exceeds the limit of {limit_bytes} bytes "
                "(server.max_body_bytes)"
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
                f"request body exceeds the limit of {limit_bytes} bytes (server.max_body_bytes)"
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
