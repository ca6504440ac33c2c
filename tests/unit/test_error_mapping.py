"""The data plane's one error table: complete, and what every transport answers with it."""

from __future__ import annotations

import inspect

import orjson
import pytest

from appliance import errors
from appliance.dataplane import outcomes
from appliance.server.errors import appliance_error_response, status_of

# grpc.StatusCode names (grpcio is not a dependency of the box; the gRPC transport looks these up).
GRPC_CODES = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
}  # fmt: skip

ERROR_CLASSES = [
    c
    for _, c in inspect.getmembers(errors, inspect.isclass)
    if issubclass(c, errors.ApplianceError) and c is not errors.ApplianceError
]


def test_every_error_class_has_its_own_row() -> None:
    missing = [c.__name__ for c in ERROR_CLASSES if c not in outcomes.TABLE]
    assert not missing, f"no row in dataplane/outcomes.py TABLE for {missing}"


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_each_row_is_well_formed(cls: type[errors.ApplianceError]) -> None:
    outcome = outcomes.TABLE[cls]
    assert outcome.reason in outcomes.REASONS
    assert outcome.grpc_code in GRPC_CODES
    assert 400 <= outcome.http_status <= 599
    assert outcome.http_status == 500 or outcome.reason != "internal"


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (errors.InvalidInput("x"), 400, "bad_request"),
        (errors.RequestTooLarge("x"), 413, "too_large"),
        (errors.HeaderTooLarge("x"), 431, "too_large"),
        (errors.RequestTimeout("x"), 408, "timeout"),
        (errors.Unauthorised("x"), 401, "unauthorised"),
        (errors.Forbidden("x"), 403, "forbidden"),
        (errors.ModelNotFound("x"), 404, "not_found"),
        (errors.ModelLoading("x"), 503, "loading"),
        (errors.ModelNotReady("x"), 503, "unavailable"),
        (errors.Draining("x"), 503, "draining"),
        (errors.QueueFull("x"), 503, "queue_full"),
        (errors.DeadlineUnmet("x"), 503, "deadline"),
        (errors.DeadlineExceeded("x"), 503, "deadline"),
        (errors.NoPoolCapacity("x"), 503, "no_pool_capacity"),
        (errors.ConnectionLimit("x"), 503, "connection_limit"),
        (errors.RateLimited("x"), 429, "rate_limited"),
        (errors.InferenceFailed("x"), 500, "internal"),
        (ValueError("a bug"), 500, "internal"),
    ],
)
def test_statuses_and_reasons(error: Exception, status: int, reason: str) -> None:
    assert outcomes.outcome_of(error).http_status == status
    assert outcomes.outcome_of(error).reason == reason


def test_http_answers_carry_retry_after_and_the_message() -> None:
    overloaded = appliance_error_response(errors.Overloaded("full", retry_after_s=2.2))
    assert overloaded.status_code == 503 and overloaded.headers["retry-after"] == "3"
    assert orjson.loads(overloaded.body) == {"error": "full"}
    not_ready = appliance_error_response(errors.ModelNotReady("loading"), 4.0)
    assert not_ready.status_code == 503 and not_ready.headers["retry-after"] == "4"
    assert "retry-after" not in appliance_error_response(errors.InvalidInput("x")).headers
    assert status_of(errors.ModelNotFound("x")) == 404


def test_401_names_the_scheme_and_draining_closes_the_connection() -> None:
    assert appliance_error_response(errors.Unauthorised("x")).headers["www-authenticate"].startswith("Bearer")
    assert appliance_error_response(errors.Draining("x")).headers["connection"] == "close"
    assert "connection" not in appliance_error_response(errors.QueueFull("x")).headers


def test_refusals_count_unknown_names_under_one_label() -> None:
    refusals = outcomes.Refusals(lambda name: name == "served")
    for name in ("served", "nope-1", "nope-2", None):
        refusals.count(name, "line", errors.ModelNotFound("x"))
    refusals.count("served", "pool", "queue_full")
    assert dict(refusals) == {
        ("", "line", "not_found"): 1,
        ("_unknown", "line", "not_found"): 2,
        ("served", "line", "not_found"): 1,
        ("served", "pool", "queue_full"): 1,
    }
    assert refusals.of_model("served") == {"line": {"not_found": 1}, "pool": {"queue_full": 1}}
