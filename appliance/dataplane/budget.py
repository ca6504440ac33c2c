"""A budget of CPU time per second for work that strangers make this process do (pool jobs' decoding).

A decode holds the GIL while it parses, so the event loop that serves the line waits for it wherever it
runs. Bounding each job (its JSON, its rows) bounds one such wait; this bounds their sum, whoever sends
the jobs and under whatever sender names. It is a token bucket of CPU seconds that `share` of a core
refills, up to `burst_s`. The work runs on a worker thread, one piece at a time (so that the loop
competes for the GIL with one thread, not several), and is charged its thread's CPU time once it ran;
while the bucket is overdrawn, the next piece is refused before it starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from appliance import errors

T = TypeVar("T")


class WorkBudget:
    """Seconds of CPU per second for one kind of work; used on one event loop."""

    def __init__(
        self,
        share: float,
        burst_s: float,
        *,
        what: str,
        hint: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if share <= 0 or burst_s <= 0:
            raise ValueError("a work budget needs a positive share and burst")
        self.share = share  # of one core: seconds of work per second
        self.burst_s = burst_s
        self.what = what  # named in refusals: "decoding pool jobs"
        self.hint = hint  # what a refused sender can do about it
        self._clock = clock
        self._balance_s = burst_s
        self._at_s = clock()
        self._one_at_a_time = asyncio.Lock()
        self.spent_s = 0.0  # all charged so far
        self.refused = 0

    def balance_s(self) -> float:
        """Seconds of work that may still start now (negative: overdrawn)."""
        now_s = self._clock()
        self._balance_s = min(self.burst_s, self._balance_s + (now_s - self._at_s) * self.share)
        self._at_s = now_s
        return self._balance_s

    def check(self) -> None:
        """NoPoolCapacity, with the wait until the bucket is back to zero, while it is overdrawn."""
        balance_s = self.balance_s()
        if balance_s >= 0:
            return
        self.refused += 1
        raise errors.NoPoolCapacity(
            f"this node has spent its CPU time for {self.what} ({self.share * 100:g}% of a core, "
            f"{self.burst_s * 1e3:g} ms at once){'; ' if self.hint else ''}{self.hint}",
            retry_after_s=max(0.001, round(-balance_s / self.share, 3)),
        )

    def charge(self, seconds: float) -> None:
        """Take `seconds` of work done; it may overdraw the bucket (what comes next waits for that)."""
        seconds = max(0.0, seconds)
        self._balance_s = self.balance_s() - seconds
        self.spent_s += seconds

    async def run(self, work: Callable[[], T]) -> T:
        """`work()` on a worker thread, after the work before it, charged its CPU time (raised or not);
        refused (check) while the bucket is overdrawn, before and after waiting its turn."""
        self.check()
        async with self._one_at_a_time:
            self.check()
            spent_s = 0.0

            def measured() -> T:
                nonlocal spent_s
                started_s = time.thread_time()
                try:
                    return work()
                finally:
                    spent_s = time.thread_time() - started_s

            try:
                return await asyncio.to_thread(measured)
            finally:
                self.charge(spent_s)
