"""When capacity reports go out: every interval (jittered +-10%) and at once when spare capacity moves."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

_JITTER = 0.1


class ReportCadence:
    """Decides from spare inferences/s per model whether a report is due; pure, time is passed in.

    A change counts when one model's spare moves by more than `change_share` of the larger of the
    old and new values (so 0 -> anything counts), or models come or go. Changes are not reported
    more often than every tenth of an interval, so a figure flickering around a threshold cannot
    flood the broker.
    """

    def __init__(
        self, interval_s: float, change_share: float, rng: Callable[[], float] = random.random
    ) -> None:
        self.interval_s = interval_s
        self.change_share = change_share
        self._rng = rng
        self._last: dict[str, float] | None = None
        self._last_s = 0.0
        self._due_s = 0.0

    def is_due(self, now_s: float, spare: Mapping[str, float]) -> bool:
        if self._last is None or now_s >= self._due_s:
            return True
        if now_s - self._last_s < self.interval_s / 10:
            return False
        if spare.keys() != self._last.keys():
            return True
        return any(self._moved(self._last[name], value) for name, value in spare.items())

    def published(self, now_s: float, spare: Mapping[str, float]) -> None:
        self._last = dict(spare)
        self._last_s = now_s
        self._due_s = now_s + self.interval_s * (1 - _JITTER + 2 * _JITTER * self._rng())

    def forget(self) -> None:
        """After a reconnect the next report goes out at once, whatever it says."""
        self._last = None

    def _moved(self, old: float, new: float) -> bool:
        largest = max(abs(old), abs(new))
        return largest > 0 and abs(new - old) > self.change_share * largest
