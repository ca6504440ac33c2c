"""What a buyer's request may hold before it is answered, and who may read the fleet view.

The rate quota (buyers.py) counts job starts; a request then holds memory for as long as its body takes
to come and its job to be answered. Three bounds keep that finite, as the box's own server does for its
connections (server/connections.py, server/gate.py):

- places: each buyer has `max_requests_in_progress` (its entry, else gateway.default_...), taken when
  its headers are in and given back once its answer is sent; beyond them 429 + Retry-After, as for its
  rate: the limit is the buyer's own, not the pool's, so it is told to slow down, not that the pool is
  short (that is 503);
- bytes being read: all bodies on their way in together stay within gateway.max_reading_bytes (a
  Content-Length counts whole from the headers, a chunked body as it comes); beyond it 503 +
  Retry-After: the gateway is short, whoever asks;
- time: a body must be in whole within gateway.body_timeout_s of its headers; then 408 and the
  connection closes.
"""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive, Scope

from appliance import errors
from appliance.platform.buyers import Buyer, Buyers, bearer_digest
from appliance.platform.settings import GatewaySettings
from appliance.protocol.codec import decimal
from appliance.server.body import header, read_body
from appliance.server.encoding import coding_of


class ReadingBudgetSpent(errors.Overloaded):
    """More request body bytes are on their way in than gateway.max_reading_bytes allows (503)."""


class ReadingBudget:
    """Bytes of request bodies on their way in, all buyers together. Event loop only."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.taken_bytes = 0

    def take(self, size: int) -> bool:
        if self.taken_bytes + size > self.limit_bytes:
            return False
        self.taken_bytes += size
        return True

    def give(self, size: int) -> None:
        self.taken_bytes -= size


class Admission:
    """Places per buyer, the reading budget, the body deadline and the fleet view's door, for one gateway."""

    def __init__(self, settings: GatewaySettings, buyers: Buyers) -> None:
        self.settings = settings
        self.buyers = buyers
        self.reading = ReadingBudget(settings.max_reading_bytes)
        self.operators = frozenset(settings.operator_token_sha256)
        self._places: dict[str, int] = {}  # buyer -> requests between their headers and their answer

    def places(self, buyer: Buyer) -> int:
        found = buyer.max_requests_in_progress
        return self.settings.default_max_requests_in_progress if found is None else found

    def enter(self, buyer: Buyer) -> None:
        """Take one of the buyer's places (give it back with `leave`); RateLimited when all are taken."""
        held = self._places.get(buyer.name, 0)
        if held >= self.places(buyer):
            raise errors.RateLimited(
                f"buyer {buyer.name!r} has {held} requests in progress, as many as it may have at once "
                "(max_requests_in_progress); send the next when one is answered",
                retry_after_s=self.settings.retry_after_s,
            )
        self._places[buyer.name] = held + 1

    def leave(self, buyer: Buyer) -> None:
        held = self._places.get(buyer.name, 0) - 1
        if held > 0:
            self._places[buyer.name] = held
        else:
            self._places.pop(buyer.name, None)

    def in_progress(self, name: str) -> int:
        """Requests of the buyer named `name` between their headers and their answer."""
        return self._places.get(name, 0)

    def fleet_refusal(self, authorization: bytes | None) -> errors.ApplianceError | None:
        """Why this caller may not read the fleet view (None: it may). The view shows every node's key,
        offer and quarantine reason, and costs the most to build: operators only (a token listed in
        gateway.operator_token_sha256); with none listed, a gateway that asks no token anywhere (no
        buyers file) shows it to everyone, and one with buyers to no one."""
        if self.operators and bearer_digest(authorization) in self.operators:
            return None
        if not self.operators and self.buyers.is_open:
            return None
        if not self.buyers.is_open and self.buyers.identify(authorization) is None:
            return errors.Unauthorised("missing or unknown bearer token")
        return errors.Forbidden(
            "the fleet view is for the pool's operators: send a token whose sha256 is listed in "
            "gateway.operator_token_sha256"
        )

    async def read(
        self, scope: Scope, receive: Receive, limit_bytes: int, *, deadline: float, limit_says: str
    ) -> bytes:
        """The whole body (server/body.py's read_body, under `limit_bytes`), within the reading budget
        and by `deadline` (loop time): Overloaded or RequestTimeout otherwise. A body in a
        Content-Encoding (gzip, deflate) is inflated as it comes; what it inflates to is not known
        before, so it holds its whole limit of the budget."""
        coding = coding_of(scope)  # UnsupportedEncoding (415) for one it cannot inflate
        declared = decimal(header(scope, b"content-length"), "Content-Length")
        reserved = received = 0
        if coding is not None:
            if not self.reading.take(limit_bytes):
                raise self._short(limit_bytes)
            reserved = limit_bytes
        elif declared is not None and declared <= limit_bytes:  # a larger one is refused unread (413)
            if not self.reading.take(declared):
                raise self._short(declared)
            reserved = declared

        async def counted() -> Message:
            nonlocal reserved, received
            message = await receive()
            received += len(message.get("body", b""))
            if received > reserved:  # chunked, or more than declared (which read_body refuses)
                if not self.reading.take(received - reserved):
                    raise self._short(received)
                reserved = received
            return message

        try:
            async with asyncio.timeout_at(deadline):
                return await read_body(scope, counted, limit_bytes, limit_says=limit_says, coding=coding)
        except TimeoutError:
            raise errors.RequestTimeout(
                f"request body not received whole within {self.settings.body_timeout_s:g} s of its "
                "headers (gateway.body_timeout_s)"
            ) from None
        finally:
            self.reading.give(reserved)

    def _short(self, size: int) -> ReadingBudgetSpent:
        return ReadingBudgetSpent(
            f"the gateway is reading {self.reading.taken_bytes} bytes of request bodies; {size} more would "
            f"pass its {self.reading.limit_bytes} (gateway.max_reading_bytes): try again",
            retry_after_s=self.settings.retry_after_s,
        )
