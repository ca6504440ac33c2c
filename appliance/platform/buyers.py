"""Buyers: bearer tokens (kept as sha256 digests), each with a job rate quota, a body limit and perhaps
its own limit on requests in progress (admission.py holds them to it)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config_sources import read_toml
from appliance.errors import ConfigError

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Buyer:
    name: str
    rate_per_s: float
    max_body_bytes: int
    max_requests_in_progress: int | None = None  # None: gateway.default_max_requests_in_progress


class Bucket:
    """A token bucket: `rate_per_s` jobs per second in bursts of one second's worth; clock injected."""

    def __init__(self, rate_per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1.0, rate_per_s)
        self._tokens, self._at_s = self.burst, clock()
        self._clock = clock

    def take(self) -> float | None:
        """None when a job may start now, else seconds until one may."""
        now_s = self._clock()
        self._tokens = min(self.burst, self._tokens + (now_s - self._at_s) * self.rate_per_s)
        self._at_s = now_s
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return (1.0 - self._tokens) / self.rate_per_s


class Buyers:
    """Who may call the gateway. With no buyers file every caller is `anonymous` with the defaults."""

    def __init__(
        self,
        by_digest: dict[str, Buyer] | None,
        default: Buyer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._by_digest = by_digest
        self.default = default
        self._buckets: dict[str, Bucket] = {}
        self._clock = clock

    @property
    def is_open(self) -> bool:
        return self._by_digest is None

    @classmethod
    def load(cls, path: Path | None, *, rate_per_s: float, max_body_bytes: int) -> Buyers:
        default = Buyer(ANONYMOUS, rate_per_s, max_body_bytes)
        if path is None:
            return cls(None, default)
        entries = read_toml(path).get("buyers")
        if not isinstance(entries, dict) or not entries:
            raise ConfigError(f"buyers file {path}: expected [buyers.NAME] tables with token_sha256")
        found: dict[str, Buyer] = {}
        for name, entry in entries.items():
            found[_digest(path, name, entry)] = _buyer(path, name, entry, default)
        return cls(found, default)

    def identify(self, authorization: bytes | None) -> Buyer | None:
        """The buyer a bearer token belongs to; None for a missing or unknown token."""
        if self._by_digest is None:
            return self.default
        digest = bearer_digest(authorization)
        return None if digest is None else self._by_digest.get(digest)

    def admit(self, buyer: Buyer) -> float | None:
        """Take one job from the buyer's quota: None if it may start, else seconds to wait."""
        bucket = self._buckets.get(buyer.name)
        if bucket is None:
            bucket = self._buckets[buyer.name] = Bucket(buyer.rate_per_s, self._clock)
        return bucket.take()


def bearer_digest(authorization: bytes | None) -> str | None:
    """The sha256 (hex) of an Authorization header's bearer token; None when it holds none."""
    if not authorization or not authorization.startswith(b"Bearer "):
        return None
    return hashlib.sha256(authorization[7:].strip()).hexdigest()


def token_digest(token: str) -> str:
    """What a buyers file holds for a token: its sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def _digest(path: Path, name: str, entry: Any) -> str:
    digest = entry.get("token_sha256") if isinstance(entry, dict) else None
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"buyers file {path}: buyers.{name}.token_sha256 must be 64 lowercase hex digits")
    return digest


def _buyer(path: Path, name: str, entry: dict[str, Any], default: Buyer) -> Buyer:
    if not name or any(c in name for c in "/+#$\0"):
        raise ConfigError(f"buyers file {path}: buyer name {name!r} must be one MQTT topic level")
    unknown = set(entry) - {"token_sha256", "rate_per_s", "max_body_bytes", "max_requests_in_progress"}
    if unknown:
        raise ConfigError(f"buyers file {path}: unknown key buyers.{name}.{sorted(unknown)[0]}")
    rate = entry.get("rate_per_s", default.rate_per_s)
    limit = entry.get("max_body_bytes", default.max_body_bytes)
    places = entry.get("max_requests_in_progress", default.max_requests_in_progress)
    if not isinstance(rate, int | float) or isinstance(rate, bool) or rate <= 0:
        raise ConfigError(f"buyers file {path}: buyers.{name}.rate_per_s must be a number > 0")
    for key, value in (("max_body_bytes", limit), ("max_requests_in_progress", places)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"buyers file {path}: buyers.{name}.{key} must be an integer > 0")
    return Buyer(name, float(rate), limit, places)
