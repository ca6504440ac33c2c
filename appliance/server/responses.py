"""JSON responses serialised with orjson (numpy-aware), without pydantic in the way."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


def json_response(document: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)
