"""Every error class maps to a status; the mapping is complete and the body is {"error": ...}."""

from __future__ import annotations

import inspect

import orjson

from appliance import errors
from appliance.server.errors import STATUS, appliance_error_response, status_of


def test_every_error_class_has_a_status() -> None:
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.ApplianceError)
    ]
    missing = [c.__name__ for c in classes if c is not errors.ApplianceError and c not in STATUS]
    assert not missing, f"no HTTP status for {missing}"


def test_statuses_and_retry_after() -> None:
    assert status_of(errors.InvalidInput("x")) == 400
    assert status_of(errors.RequestTooLarge("x")) == 413
    assert status_of(errors.ModelNotFound("x")) == 404
    overloaded = appliance_error_response(errors.Overloaded("full", retry_after_s=2.2))
    assert overloaded.status_code == 503 and overloaded.headers["retry-after"] == "3"
    assert orjson.loads(overloaded.body) == {"error": "full"}
    not_ready = appliance_error_response(errors.ModelNotReady("loading"))
    assert not_ready.status_code == 503 and not_ready.headers["retry-after"] == "1"
