"""Map the exception tree to HTTP statuses and the OIP error body {"error": "..."}."""

from __future__ import annotations

import logging
import math

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from appliance import errors

log = logging.getLogger(__name__)

STATUS: dict[type[errors.ApplianceError], int] = {
    errors.InvalidInput: 400,
    errors.RequestTooLarge: 413,
    errors.ModelNotFound: 404,
    errors.ModelNotReady: 503,
    errors.Overloaded: 503,
    errors.DeadlineExceeded: 503,
    errors.InferenceFailed: 500,
    errors.ModelLoadError: 400,
    errors.ProviderUnavailable: 400,
    errors.ConfigError: 400,
}


def status_of(exc: errors.ApplianceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_response(status: int, message: str, retry_after_s: float | None = None) -> Response:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return Response(
        orjson.dumps({"error": message}), status_code=status, media_type="application/json", headers=headers
    )


def appliance_error_response(exc: errors.ApplianceError) -> Response:
    status = status_of(exc)
    retry_after = getattr(exc, "retry_after_s", None)
    if status == 503 and retry_after is None:
        retry_after = 1.0
    return error_response(status, str(exc), retry_after)


def install(app: FastAPI) -> None:
    """Every error a client can provoke becomes {"error": ...}; nothing else escapes as a 500 page."""

    @app.exception_handler(errors.ApplianceError)
    async def _appliance(_: Request, exc: errors.ApplianceError) -> Response:
        return appliance_error_response(exc)

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
