"""Documents anyone may ask for often (the fleet view, /metrics) built at most once per KEEP_FACTOR times
their cost: however often they are asked for, building them takes at most 1/KEEP_FACTOR of the event
loop (5,000 nodes of 4 models: ~0.1 s to build the fleet view, kept ~2 s), and a small fleet's stay fresh.
`costly` applies the same rule to other results worked out over the whole fleet (spare totals, free
nodes), keeping only those whose making took over MIN_KEPT_COST_S of CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

KEEP_FACTOR = 20.0
MIN_KEPT_COST_S = 0.001  # CPU time below which a result is made afresh whenever it is asked for

T = TypeVar("T")


def costly(make: Callable[[], T]) -> tuple[T, float | None]:
    """`make()`, and the time.perf_counter() until which it may be kept: KEEP_FACTOR times its cost from
    now where it took over MIN_KEPT_COST_S of CPU, None where it was cheaper. Its cost is CPU time (the
    thread's), so making it while preempted on a busy box costs no more."""
    started_s = time.thread_time()
    made = make()
    cost_s = time.thread_time() - started_s
    return made, (time.perf_counter() + cost_s * KEEP_FACTOR if cost_s >= MIN_KEPT_COST_S else None)


def is_fresh(until_s: float) -> bool:
    """Whether what `costly` said may be kept until `until_s` may still be."""
    return time.perf_counter() < until_s


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
