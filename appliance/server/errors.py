"""HTTP error answers: the data plane's table gives the status, the OIP body is {"error": "..."}."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Scope

from appliance import errors
from appliance.dataplane import outcomes
from appliance.server.body import BodyReceiver, discard_rest
from appliance.server.encoding import ACCEPT_ENCODING

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 1.0


def status_of(exc: errors.ApplianceError) -> int:
    return outcomes.outcome_of(exc).http_status


def error_response(
    status: int, message: str, retry_after_s: float | None = None, headers: dict[str, str] | None = None
) -> Response:
    headers = dict(headers or {})
    if retry_after_s is not None:
        headers["Retry-After"] = outcomes.retry_after_header(retry_after_s)
    return Response(
        orjson.dumps({"error": message}), status_code=status, media_type="application/json", headers=headers
    )


def appliance_error_response(
    exc: errors.ApplianceError,
    default_retry_after_s: float = DEFAULT_RETRY_AFTER_S,
    *,
    body_read: bool = False,
) -> Response:
    """The answer to an error: its status, Retry-After on 503 and 429, `WWW-Authenticate` on 401, and
    `Connection: close` while draining and for a body too large unless `body_read` (all of it was read:
    the connection can carry the next request)."""
    headers: dict[str, str] = {}
    if isinstance(exc, errors.Unauthorised):
        headers["WWW-Authenticate"] = 'Bearer realm="appliance"'
    if isinstance(exc, errors.UnsupportedEncoding):
        headers["Accept-Encoding"] = ACCEPT_ENCODING  # what it takes (RFC 9110 §12.5.3)
    unread = errors.RequestTooLarge | errors.UnsupportedEncoding  # refused before its body was read
    if isinstance(exc, errors.Draining) or (isinstance(exc, unread) and not body_read):
        # Draining: keep-alive clients move on. Too large: the rest of the body is never read (a
        # refused 40 MB body would otherwise still be read, to be thrown away).
        headers["Connection"] = "close"
    retry_after = outcomes.retry_after_s(exc, default_retry_after_s)
    return error_response(status_of(exc), str(exc), retry_after, headers)


async def error_after_body(
    exc: errors.ApplianceError, scope: Scope, body: BodyReceiver, default_retry_after_s: float
) -> Response:
    """The answer to an error raised while the request's body may be partly unread. The errors whose
    answer closes the connection (draining, a body too large) first read and drop the rest of the body,
    up to body.DRAIN_BYTES: a socket closed on unread bytes sends a reset, which can beat the answer."""
    closes = isinstance(exc, errors.Draining | errors.RequestTooLarge | errors.UnsupportedEncoding)
    body_read = closes and await discard_rest(scope, body)
    return appliance_error_response(exc, default_retry_after_s, body_read=body_read)


def install(app: FastAPI, default_retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> None:
    """Every error a client can provoke becomes {"error": ...}; nothing else escapes as a 500 page."""

    @app.exception_handler(errors.ApplianceError)
    async def _appliance(_: Request, exc: errors.ApplianceError) -> Response:
        return appliance_error_response(exc, default_retry_after_s)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        message = exc.detail if exc.status_code != 404 else f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, str(message))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error_response(400, problems)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
