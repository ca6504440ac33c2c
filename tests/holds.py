"""Batches seen and held at the worker, through its test seam (`appliance.scheduler.worker.before_batch`).

A test holds a batch "mid-compute" for as long as it needs (a SIGTERM, a reload, a drain, a watchdog
check then happens while it is surely running), sees which requests shared a batch and in what order
batches ran, all without a sleep or a timing assumption. `Batches` is installed by the `batches` fixture
(tests/conftest.py) and runs in the test's own process; tests/held_serve.py does the same for a
`python -m appliance` subprocess.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from appliance.scheduler import worker as worker_module

WAIT_S = 60.0


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch as a worker was about to run it."""

    model: str
    version: str
    priority: str  # the class: "line" or "pool"
    is_background: bool  # on a pool thread of its own (CPU providers), not a line worker
    in_pool_process: bool  # its worker hands it to the pool process
    marks: tuple[float, ...]  # per request, in batch order: the first element of its first input
    rows: int
    is_solo: bool = False  # alone on the box: on the model's all-cores session
    started_s: float = 0.0  # when the scheduler holds that it started (its clock: time.monotonic)

    @property
    def requests(self) -> int:
        return len(self.marks)


Match = Callable[[Batch], bool]


class Batches:
    """Every batch the workers run, in the order they start; those matching `hold` wait for `release`."""

    def __init__(self) -> None:
        self.seen: list[Batch] = []
        self.held = 0  # batches waiting at the seam now
        self._hold: Match | None = None
        self._changed = threading.Condition()

    def __call__(self, worker: worker_module.Worker, run: worker_module.BatchRun) -> None:
        """The seam: called on the worker's thread just before it runs `run`."""
        batch = Batch(
            model=worker.model.name,
            version=worker.model.version,
            priority=run.priority.label,
            is_background=worker.is_background,
            in_pool_process=worker.replica is not None and worker.replica.is_usable,
            marks=tuple(_mark(work.payload.inputs) for work in run.items),
            rows=run.rows,
            is_solo=run.is_solo,
            started_s=run.started_s,
        )
        with self._changed:
            self.seen.append(batch)
            self._changed.notify_all()
            if self._hold is None or not self._hold(batch):
                return
            self.held += 1
            self._changed.notify_all()
            try:
                # A test that failed while holding releases on its way out (see `holding`).
                self._changed.wait_for(lambda: self._hold is None or not self._hold(batch), WAIT_S * 2)
            finally:
                self.held -= 1
                self._changed.notify_all()

    @contextmanager
    def holding(self, match: Match) -> Iterator[Batches]:
        """Hold every batch that `match`es until `release()` or the end of the block."""
        with self._changed:
            self._hold = match
        try:
            yield self
        finally:
            self.release()

    def release(self) -> None:
        with self._changed:
            self._hold = None
            self._changed.notify_all()

    def wait_held(self, count: int = 1, timeout_s: float = WAIT_S) -> None:
        """Until `count` batches wait at the seam."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.held >= count, timeout_s):
                raise AssertionError(f"{count} batch(es) never reached the worker; saw {self.seen}")

    def wait_for(self, match: Match, count: int = 1, timeout_s: float = WAIT_S) -> list[Batch]:
        """Until `count` batches that `match` have started; returns them."""
        with self._changed:
            found: list[Batch] = []

            def enough() -> bool:
                found[:] = [b for b in self.seen if match(b)]
                return len(found) >= count

            if not self._changed.wait_for(enough, timeout_s):
                raise AssertionError(f"{count} matching batch(es) never started; saw {self.seen}")
            return list(found)

    async def held_async(self, count: int = 1) -> None:
        """`wait_held` from a coroutine on a loop the workers hand their outcomes to."""
        await asyncio.to_thread(self.wait_held, count)

    def of(self, model: str) -> list[Batch]:
        with self._changed:
            return [b for b in self.seen if b.model == model]


def _mark(inputs: object) -> float:
    first = next(iter(inputs.values()))  # type: ignore[attr-defined]
    array = np.asarray(first)
    if array.size == 0 or array.dtype == object:
        return float("nan")
    return float(array.reshape(-1)[0])


@contextmanager
def installed() -> Iterator[Batches]:
    """A fresh `Batches` on the seam for the length of the block; the seam is empty again after."""
    batches = Batches()
    worker_module.before_batch = batches
    try:
        yield batches
    finally:
        batches.release()
        worker_module.before_batch = None
