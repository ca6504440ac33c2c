"""Documents anyone may ask for often (the fleet view, /metrics) built at most once per KEEP_FACTOR times
their cost: however often they are asked for, building them takes at most 1/KEEP_FACTOR of the event
loop (5,000 nodes of 4 models: ~0.1 s to build the fleet view, kept ~2 s), and a small fleet's stay fresh."""

from __future__ import annotations

import time
from collections.abc import Callable

KEEP_FACTOR = 20.0


class Kept:
    """A document rebuilt only once it is older than KEEP_FACTOR times what building it took."""

    def __init__(self, build: Callable[[], bytes], clock: Callable[[], float] = time.perf_counter) -> None:
        self.build = build
        self.clock = clock
        self.builds = 0
        self._body = b""
        self._until = float("-inf")

    def get(self) -> bytes:
        started = self.clock()
        if started < self._until:
            return self._body
        self._body = self.build()
        self.builds += 1
        ended = self.clock()
        self._until = ended + (ended - started) * KEEP_FACTOR
        return self._body
