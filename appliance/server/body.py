"""Read an ASGI request body under a size limit, refusing an oversized one before it is read whole."""

from __future__ import annotations

from starlette.types import Message, Receive, Scope

from appliance.dataplane.outcomes import CallAbandoned
from appliance.errors import InvalidInput, RequestTooLarge
from appliance.protocol.codec import decimal
from appliance.server.encoding import Inflater, InflatingBudget

# A refused body up to this long is read and dropped before the answer: closing a socket with unread
# bytes makes the kernel send a reset, which can reach the client before it reads the answer (it sees
# "connection reset" instead of 413). Longer ones are not read: answered, then the connection closes.
DRAIN_BYTES = 1024 * 1024


class ClientDisconnected(CallAbandoned):
    """The client went away before sending its whole body."""


class BodyReceiver:
    """An ASGI `receive` that notes whether the request's body has ended (or the client has gone)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.ended = False
        self.gone = False

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.gone = True
        elif not message.get("more_body", False):
            self.ended = True
        return message


async def discard_rest(scope: Scope, receive: BodyReceiver, budget_bytes: int = DRAIN_BYTES) -> bool:
    """Read and drop what is left of a refused request's body, up to `budget_bytes`: True once it has
    ended (the answer can go out whole, on a connection that may stay open); False when it is longer
    (the answer goes out and the connection closes) or the client has gone. A Content-Length it cannot
    read (HTTP framed the body by it, so it is digits, but past 19 of them) means the body is not read:
    the answer to the refusal being drained for goes out, not one about the length."""
    try:
        declared = decimal(header(scope, b"content-length"), "Content-Length")
    except InvalidInput:
        return False
    if declared is not None and declared > budget_bytes:
        return False
    seen = 0
    while not receive.ended:
        if receive.gone:
            return False
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > budget_bytes:
            return False
    return not receive.gone


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(
    scope: Scope,
    receive: Receive,
    limit_bytes: int,
    *,
    model: str | None = None,
    limit_says: str | None = None,
    coding: str | None = None,
    budget: InflatingBudget | None = None,
) -> bytes:
    """The whole body; RequestTooLarge as soon as Content-Length or the bytes received pass the limit.

    The limit is the model's (what a request to it can need) or server.max_body_bytes; reads stop
    there, so a client cannot make the service hold more than that for one request. `limit_says`
    words the limit in the refusal for another caller (the gateway: a buyer's limit). `coding` (from
    encoding.coding_of) is the body's Content-Encoding: it is inflated as it comes, and the limit holds
    for the bytes received and for the inflated ones; `budget` bounds what all compressed bodies being
    read hold inflated.
    """
    if limit_says is None:
        whose = f"model {model!r} takes" if model else "the limit is"
        limit_says = f"{whose} at most {limit_bytes} bytes (server.max_body_bytes and the model's inputs)"
    declared = decimal(header(scope, b"content-length"), "Content-Length")
    if declared is not None and declared > limit_bytes:
        raise RequestTooLarge(f"request body of {declared} bytes is too large: {limit_says}")
    if coding is None:
        return await _read(receive, limit_bytes, limit_says, None)
    inflater = Inflater(coding, limit_bytes, limit_says, budget)
    try:
        return await _read(receive, limit_bytes, limit_says, inflater)
    finally:
        inflater.release()


async def _read(receive: Receive, limit_bytes: int, limit_says: str, inflater: Inflater | None) -> bytes:
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit_bytes:
            raise RequestTooLarge(f"request body is too large: {limit_says}")
        if inflater is None:
            chunks.append(chunk)
        else:
            await inflater.feed(chunk)
        if not message.get("more_body", False):
            break
    if inflater is not None:
        return inflater.finish()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
