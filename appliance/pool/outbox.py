"""Job responses and events on their way to the broker: kept (bounded) while it is away, until PUBACK."""

from __future__ import annotations

from collections import deque

from appliance.pool.wire import Outbound


class Outbox:
    """Messages not yet acknowledged. Past `limit` waiting, the oldest goes and `dropped` counts it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = 0
        self._waiting: deque[Outbound] = deque()
        self._unacked: dict[int, Outbound] = {}  # by mid, in publish order

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

    def acknowledged(self, mid: int) -> bool:
        """Forget an acknowledged message; False when `mid` was not one of ours (birth, reports)."""
        return self._unacked.pop(mid, None) is not None

    def connection_lost(self) -> None:
        """What was sent but not acknowledged may not have arrived: send it again after reconnect."""
        self._waiting.extendleft(reversed(list(self._unacked.values())))
        self._unacked.clear()
        self._trim()

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped

    def _trim(self) -> None:
        while len(self._waiting) > self.limit:
            self._waiting.popleft()
            self.dropped += 1
