"""Read a request body under a size limit, refusing an oversized one before it is read whole."""

from __future__ import annotations

from starlette.requests import Request

from appliance.errors import InvalidInput, RequestTooLarge


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The whole body; RequestTooLarge as soon as Content-Length or the bytes received pass the limit."""
    declared = request.headers.get("content-length")
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
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit_bytes:
            raise RequestTooLarge(
                f"request body exceeds the limit of {limit_bytes} bytes (server.max_body_bytes)"
            )
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
