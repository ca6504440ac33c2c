"""The one exception tree of appliance; it knows nothing of HTTP or MQTT."""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error appliance raises on purpose; `str(exc)` is the message a client sees."""


class InvalidInput(ApplianceError):
    """A request is malformed: wrong name, shape, datatype, encoding or parameter."""


class RequestTooLarge(InvalidInput):
    """A request body or tensor is larger than the configured limit, or than memory allows."""


class HeaderTooLarge(RequestTooLarge):
    """An HTTP request line and headers are larger than server.max_header_bytes."""


class UnsupportedEncoding(InvalidInput):
    """A request body's Content-Encoding is not one the service inflates (HTTP 415)."""


class RequestTimeout(InvalidInput):
    """A client did not send its whole request in time (slow headers or body)."""


class Unauthorised(ApplianceError):
    """The request carries no valid credentials (the API token)."""


class Forbidden(ApplianceError):
    """The request is understood and authenticated, but this node does not allow it (e.g. a pool verb
    while pool.remote_control is off, a reply topic outside the allowed ones)."""


class ModelNotFound(ApplianceError):
    """No model (or no such version of it) is known by that name."""


class ModelNotReady(ApplianceError):
    """The model exists but cannot serve now: failed to load, unloading, or the service is draining."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelLoading(ModelNotReady):
    """The model is on disk and being loaded (or waits its turn to be): try again shortly."""


class Draining(ModelNotReady):
    """The service (or the model) is draining: it admits no new requests."""


class Overloaded(ApplianceError):
    """Admission refused: the queue is full or the deadline cannot be met; try again later."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(Overloaded):
    """The model's queue for this priority class is at its bound."""


class DeadlineUnmet(Overloaded):
    """Admission predicts that the request would finish after its deadline."""


class NoPoolCapacity(Overloaded):
    """Pool work is refused: the model has no spare capacity beyond what the line keeps."""


class ConnectionLimit(Overloaded):
    """Too many open connections, overall or from one client address."""


class RateLimited(Overloaded):
    """One sender started more jobs per second than it may."""


class DeadlineExceeded(ApplianceError):
    """An admitted request expired in the queue; it was never run."""


class InferenceFailed(ApplianceError):
    """The runtime failed while running one request (not caused by its input, as far as we can tell)."""


class ModelLoadError(ApplianceError):
    """A model could not be loaded: corrupt file, unsupported op, wrong digest, no usable provider."""


class ProviderUnavailable(ApplianceError):
    """An execution provider is unknown or cannot run on this box."""


class ConfigError(ApplianceError):
    """Settings or a model manifest are invalid; the message names the key."""
