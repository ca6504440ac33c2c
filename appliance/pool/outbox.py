"""Job responses and events on their way to the broker: kept (bounded) while it is away, until PUBACK."""

from __future__ import annotations

from collections import deque

from appliance.pool.wire import Outbound

# A message that was the oldest one in flight when the connection dropped this many times in a row is
# taken for the reason the broker hung up (a poison message) and dropped rather than sent again.
POISON_STRIKES = 2


class Outbox:
    """Messages not yet acknowledged. Past `limit` waiting, the oldest goes and `dropped` counts it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = 0
        self._waiting: deque[Outbound] = deque()
        self._unacked: dict[int, Outbound] = {}  # by mid, in publish order
        self._suspect: Outbound | None = None  # the oldest in flight at the last lost connection
        self._strikes = 0

    def __len__(self) -> int:
        return len(self._waiting) + len(self._unacked)

    @property
    def is_empty(self) -> bool:
        return not self._waiting and not self._unacked

    @property
    def is_waiting(self) -> bool:
        """Messages wait for a connection (new ones must queue behind them to keep the order)."""
        return bool(self._waiting)

    def put(self, message: Outbound) -> None:
        """Keep a message the broker could not take now."""
        self._waiting.append(message)
        self._trim()

    def put_back(self, message: Outbound) -> None:
        """Return a message taken for a publish that did not happen; it keeps its place at the front."""
        self._waiting.appendleft(message)
        self._trim()

    def take(self) -> Outbound | None:
        return self._waiting.popleft() if self._waiting else None

    def sent(self, mid: int, message: Outbound) -> None:
        self._unacked[mid] = message

    def acknowledged(self, mid: int) -> Outbound | None:
        """Forget an acknowledged (or refused) message and return it; None when `mid` was not one of
        ours (birth, reports)."""
        message = self._unacked.pop(mid, None)
        if message is not None and message is self._suspect:
            self._suspect, self._strikes = None, 0
        return message

    def connection_lost(self) -> Outbound | None:
        """What was sent but not acknowledged may not have arrived: send it again after reconnect.

        Returns the poison message it dropped instead: the oldest in flight, when it was the oldest in
        flight at the previous lost connection too (the broker hangs up as it reads it).
        """
        in_flight = list(self._unacked.values())
        self._unacked.clear()
        poison = None
        oldest = in_flight[0] if in_flight else None
        if oldest is not None and oldest is self._suspect:
            self._strikes += 1
        else:
            self._suspect, self._strikes = oldest, (1 if oldest is not None else 0)
        if self._strikes >= POISON_STRIKES:
            poison = in_flight.pop(0)
            self._suspect, self._strikes = None, 0
        self._waiting.extendleft(reversed(in_flight))
        self._trim()
        return poison

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped

    def _trim(self) -> None:
        while len(self._waiting) > self.limit:
            removed = self._waiting.popleft()
            if removed is self._suspect:
                self._suspect, self._strikes = None, 0
            self.dropped += 1
