"""The one exception tree of appliance; it knows nothing of HTTP or MQTT."""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error appliance raises on purpose; `str(exc)` is the message a client sees."""


class InvalidInput(ApplianceError):
    """A request is malformed: wrong name, shape, datatype, encoding or parameter."""


class RequestTooLarge(InvalidInput):
    """A request body is larger than the configured limit."""


class ModelNotFound(ApplianceError):
    """No model (or no such version of it) is known by that name."""


class ModelNotReady(ApplianceError):
    """The model exists but cannot serve now: failed to load, unloading, or the service is draining."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(ApplianceError):
    """Admission refused: the queue is full or the deadline cannot be met; try again later."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


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
