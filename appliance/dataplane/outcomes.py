"""The one table from the error tree to every transport's status, and the refusal counts it keys.

HTTP answers with `http_status`, gRPC with `grpc_code` (a `grpc.StatusCode` name), a pool job's reply
carries `http_status` in its `status` property; metrics and statistics count each refusal under
`reason`. A transport never maps errors itself: one test covers this table whole.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from appliance import errors


class CallAbandoned(Exception):
    """Raised by a transport's reader when its client has gone: nothing to answer, nothing to count
    (a transport that cut the client off, e.g. for a slow body, counted that refusal itself). Here, not
    in plane.py, so that a transport's body reader (server/body.py, which the platform's gateway uses
    too) does not bring the box's scheduler and engine with it."""


# Refusal and failure reasons, as /metrics and the statistics label them.
REASONS = (
    "bad_request",
    "unauthorised",
    "forbidden",
    "not_found",
    "too_large",
    "timeout",
    "loading",
    "unavailable",
    "deadline",
    "queue_full",
    "draining",
    "no_pool_capacity",
    "rate_limited",
    "connection_limit",
    "internal",
)
UNKNOWN_MODEL = "_unknown"  # the one label every name that is not a served model is counted under
NO_MODEL = ""  # refusals that name no model (a connection refused before its request line, a 401)


@dataclass(frozen=True, slots=True)
class Outcome:
    http_status: int
    grpc_code: str
    reason: str

    @property
    def is_retryable(self) -> bool:
        """Whether a client should try again later (503 and 429 carry Retry-After)."""
        return self.http_status in (429, 503)


TABLE: dict[type[errors.ApplianceError], Outcome] = {
    errors.InvalidInput: Outcome(400, "INVALID_ARGUMENT", "bad_request"),
    errors.RequestTooLarge: Outcome(413, "RESOURCE_EXHAUSTED", "too_large"),
    errors.HeaderTooLarge: Outcome(431, "RESOURCE_EXHAUSTED", "too_large"),
    errors.RequestTimeout: Outcome(408, "DEADLINE_EXCEEDED", "timeout"),
    errors.UnsupportedEncoding: Outcome(415, "UNIMPLEMENTED", "bad_request"),
    errors.Unauthorised: Outcome(401, "UNAUTHENTICATED", "unauthorised"),
    errors.Forbidden: Outcome(403, "PERMISSION_DENIED", "forbidden"),
    errors.ModelNotFound: Outcome(404, "NOT_FOUND", "not_found"),
    errors.ModelNotReady: Outcome(503, "UNAVAILABLE", "unavailable"),
    errors.ModelLoading: Outcome(503, "UNAVAILABLE", "loading"),
    errors.Draining: Outcome(503, "UNAVAILABLE", "draining"),
    errors.Overloaded: Outcome(503, "UNAVAILABLE", "queue_full"),
    errors.QueueFull: Outcome(503, "UNAVAILABLE", "queue_full"),
    errors.DeadlineUnmet: Outcome(503, "UNAVAILABLE", "deadline"),
    errors.NoPoolCapacity: Outcome(503, "UNAVAILABLE", "no_pool_capacity"),
    errors.ConnectionLimit: Outcome(503, "UNAVAILABLE", "connection_limit"),
    errors.RateLimited: Outcome(429, "RESOURCE_EXHAUSTED", "rate_limited"),
    errors.DeadlineExceeded: Outcome(503, "DEADLINE_EXCEEDED", "deadline"),
    errors.InferenceFailed: Outcome(500, "INTERNAL", "internal"),
    errors.ModelLoadError: Outcome(400, "INVALID_ARGUMENT", "bad_request"),
    errors.ProviderUnavailable: Outcome(400, "FAILED_PRECONDITION", "bad_request"),
    errors.ConfigError: Outcome(400, "INVALID_ARGUMENT", "bad_request"),
}
INTERNAL = Outcome(500, "INTERNAL", "internal")


def outcome_of(exc: BaseException) -> Outcome:
    """The table's row for an error (its nearest listed class); anything else is internal."""
    for cls in type(exc).__mro__:
        if cls in TABLE:
            return TABLE[cls]  # type: ignore[index]
    return INTERNAL


def retry_after_s(exc: BaseException, default_s: float) -> float | None:
    """Seconds a client should wait before trying again, for retryable outcomes only."""
    if not outcome_of(exc).is_retryable:
        return None
    value = getattr(exc, "retry_after_s", None)
    return default_s if value is None else value


def retry_after_header(seconds: float) -> str:
    """Retry-After's whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


class Refusals:
    """Refused or failed requests by (model, priority class, reason), for /metrics and statistics.

    `is_served` tells a served model's name from any other; every other name is counted under
    UNKNOWN_MODEL, so clients cannot create series at will. Updated on the event loop only.
    """

    def __init__(self, is_served: Callable[[str], bool]) -> None:
        self._is_served = is_served
        self._counts: Counter[tuple[str, str, str]] = Counter()

    def count(self, model: str | None, priority: str, exc: BaseException | str) -> None:
        reason = exc if isinstance(exc, str) else outcome_of(exc).reason
        self._counts[(self.label(model), priority, reason)] += 1

    def label(self, model: str | None) -> str:
        if not model:
            return NO_MODEL
        return model if self._is_served(model) else UNKNOWN_MODEL

    def __iter__(self) -> Iterator[tuple[tuple[str, str, str], int]]:
        return iter(sorted(self._counts.items()))

    def of_model(self, model: str) -> dict[str, dict[str, int]]:
        """{priority: {reason: count}} of one model."""
        found: dict[str, dict[str, int]] = {}
        for (name, priority, reason), count in self._counts.items():
            if name == model:
                found.setdefault(priority, {})[reason] = count
        return found
