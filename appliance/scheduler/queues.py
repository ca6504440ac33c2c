"""Bounded per-class request queues, earliest deadline first; pure (no clock, no I/O, no threads)."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from appliance.errors import QueueFull


class Priority(IntEnum):
    """Priority classes: `line` (local traffic) always runs before `pool` (jobs from the pool)."""

    LINE = 0
    POOL = 1

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(slots=True, eq=False)
class Work:
    """One admitted request as the core sees it; `payload` is the shell's business."""

    rows: int
    priority: Priority
    deadline_s: float
    arrived_s: float
    group: Hashable = None  # only work of one group shares a batch (same non-batch dims)
    payload: Any = None
    seq: int = field(default=0)
    # It arrived while more requests were likely to come within max_queue_delay_s, so a partial batch
    # it heads may wait for them (the scheduler decides it from capacity.CompanyRate at arrival).
    expects_company: bool = True

    def sort_key(self) -> tuple[float, int]:
        return (self.deadline_s, self.seq)


class ClassQueue:
    """Work of one priority class, kept sorted by (deadline, arrival order); bounded by requests."""

    def __init__(self, priority: Priority, max_requests: int) -> None:
        self.priority = priority
        self.max_requests = max_requests
        self._items: list[Work] = []
        self._keys: list[tuple[float, int]] = []
        self.rows = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Work]:
        return iter(self._items)

    @property
    def is_full(self) -> bool:
        return len(self._items) >= self.max_requests

    def push(self, work: Work, *, is_bounded: bool = True) -> None:
        if is_bounded and self.is_full:
            raise QueueFull(f"{self.priority.label} queue is full ({self.max_requests} requests waiting)")
        key = work.sort_key()
        index = bisect.bisect_right(self._keys, key)
        self._keys.insert(index, key)
        self._items.insert(index, work)
        self.rows += work.rows

    def head(self) -> Work | None:
        return self._items[0] if self._items else None

    def remove(self, work: Work) -> None:
        index = bisect.bisect_left(self._keys, work.sort_key())
        if index >= len(self._items) or self._items[index] is not work:
            raise ValueError("work is not queued")
        del self._keys[index]
        del self._items[index]
        self.rows -= work.rows

    def pop_late(self, is_late: Callable[[Work], bool], horizon_s: float) -> list[Work]:
        """Remove and return every item for which `is_late` holds; none past `horizon_s` can be."""
        late = []
        for work in self._items:
            if work.deadline_s > horizon_s:
                break
            if is_late(work):
                late.append(work)
        for work in late:
            self.remove(work)
        return late


class Queues:
    """The line and pool queues of one model."""

    def __init__(self, *, line_max_requests: int, pool_max_requests: int) -> None:
        self._seq = itertools.count()
        self.by_class = {
            Priority.LINE: ClassQueue(Priority.LINE, line_max_requests),
            Priority.POOL: ClassQueue(Priority.POOL, pool_max_requests),
        }

    @property
    def line(self) -> ClassQueue:
        return self.by_class[Priority.LINE]

    @property
    def pool(self) -> ClassQueue:
        return self.by_class[Priority.POOL]

    def push(self, work: Work) -> None:
        """Admit work; raises Overloaded when its class is full. Ties keep arrival order."""
        work.seq = next(self._seq)
        self.by_class[work.priority].push(work)

    def requeue(self, work: Work) -> None:
        """Put back preempted work with its original place (seq) kept; already admitted, so unbounded."""
        self.by_class[work.priority].push(work, is_bounded=False)

    def __len__(self) -> int:
        return len(self.line) + len(self.pool)

    def rows_ahead(self, priority: Priority) -> int:
        """Rows that run before new work of `priority` (its own class and every higher one)."""
        return sum(q.rows for p, q in self.by_class.items() if p <= priority)


def group_of(inputs: Mapping[str, np.ndarray]) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """What requests must share to share a batch: input names, dtypes and every dimension after rows."""
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items())
