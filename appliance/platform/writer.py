"""The gateway's one ledger thread: receipts committed in groups and first, other ledger calls between.

A buyer's answer waits for `commit(receipt)`, which returns only once the transaction holding the
receipt has committed: the receipt is on disk before the buyer has the answer. Receipts that arrive
while a transaction runs go into the next one together (group commit), so the cost of a commit (an
fsync on SQLite, a round trip on PostgreSQL) is shared by every job that waited for it; that is how
one gateway writes thousands of receipts a second (bench/ledger.py). A group that fails for one of
its receipts (a value the database will not hold) rather than for the database is written again with
each receipt on its own: that receipt fails alone, and the others are committed.

Receipts come signed (metering.py): signing here, where the GIL is given up for each signature and
must be taken back from a busy event loop, held a group's commit for up to the switch interval per
receipt, and commits collapsed from thousands a second to about a hundred while the loop was saturated.

Receipts and other calls (pins, quarantines, reads: `call`) come through one queue (a SimpleQueue:
handing one over costs the loop a C call, where a Condition's notify cost it more Python per job than
the rest of the hand-over), and the thread takes every receipt waiting (up to MAX_GROUP) before each
call, one call at a time: a receipt waits for at most one call's transaction, however many calls are
queued. What nodes' messages drive (pins from births) is coalesced before it gets here (trust.py), so
the calls queued stay few.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from appliance.errors import ModelNotReady
from appliance.platform.ledger import Ledger
from appliance.platform.receipts import Receipt

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_GROUP = 1000  # receipts in one transaction at most

Waiting = tuple[Receipt, asyncio.Future[None]]
Call = tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]
STOP = None  # in the queue: finish what came before, then end the thread


class LedgerUnavailable(ModelNotReady):
    """The ledger cannot be written: the answer is not given unrecorded (503, try again)."""


class LedgerWriter:
    """Owns the Ledger; every call runs on its thread, so SQLite sees one writer per gateway."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.committed = 0  # receipts, for /metrics
        self.groups = 0
        self.waiting = 0  # receipts queued or being written: answers held back until they commit
        self._inbox: queue.SimpleQueue[Waiting | Call | None] = queue.SimpleQueue()
        self._calls_sent = 0  # by the callers' thread
        self._calls_taken = 0  # by the writer's thread: each count has one writer
        self._thread = threading.Thread(target=self._work, name="ledger-writer", daemon=True)
        self._thread.start()

    @property
    def calls_waiting(self) -> int:
        """Ledger calls queued behind the receipts (pins, quarantines, reads), for /metrics."""
        return self._calls_sent - self._calls_taken

    async def commit(self, receipt: Receipt) -> None:
        """Return once the receipt is committed; LedgerUnavailable when the database refused it.

        The waiter is a plain asyncio future: the writer settles a whole group with one call into the
        loop, and a waiter that was cancelled meanwhile is skipped."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.put((receipt, done))
        self.waiting += 1
        try:
            await done
        except Exception as exc:
            raise LedgerUnavailable(
                f"the receipts ledger cannot be written ({exc}); try again", retry_after_s=1.0
            ) from exc
        finally:
            self.waiting -= 1

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run a Ledger method on the ledger thread (pins, quarantines, reads), after the receipts
        waiting when its turn comes."""
        done: Future[T] = Future()
        self._calls_sent += 1
        self._inbox.put((function, args, done))
        return await asyncio.wrap_future(done)

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued, then stop the thread and close the database."""
        self._inbox.put(STOP)
        self._thread.join(timeout_s)
        self.ledger.close()

    def _work(self) -> None:
        receipts: deque[Waiting] = deque()
        calls: deque[Call] = deque()
        is_stopping = False
        while True:
            if not (receipts or calls):
                if is_stopping:
                    return
                is_stopping |= _sort(self._inbox.get(), receipts, calls)  # wait for work
            while True:  # and take whatever else is waiting
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                is_stopping |= _sort(item, receipts, calls)
            group = [receipts.popleft() for _ in range(min(len(receipts), MAX_GROUP))]
            if group:
                self._write(group)
            if calls:
                self._calls_taken += 1
                self._run(*calls.popleft())

    def _write(self, group: list[Waiting]) -> None:
        try:
            self.ledger.write(receipt for receipt, _ in group)
        except Exception as exc:  # noqa: BLE001 - every waiter hears it; the thread goes on
            if len(group) > 1 and not self.ledger.is_unavailable(exc):
                log.warning("ledger: a group of %d receipts failed (%s); writing each alone", len(group), exc)
                self._write_each(group)
                return
            log.error("ledger: %d receipts not written: %s", len(group), exc)
            _settle([(done, exc) for _, done in group])
            return
        self.committed += len(group)
        self.groups += 1
        _settle([(done, None) for _, done in group])

    def _write_each(self, group: list[Waiting]) -> None:
        try:
            outcomes = self.ledger.write_each(receipt for receipt, _ in group)
        except Exception as exc:  # noqa: BLE001 - the database itself failed: every waiter hears it
            log.error("ledger: %d receipts not written: %s", len(group), exc)
            _settle([(done, exc) for _, done in group])
            return
        for (receipt, _), error in zip(group, outcomes, strict=True):
            if error is not None:
                log.error("ledger: receipt %s not written: %s", receipt.job_id, error)
        self.committed += outcomes.count(None)
        self.groups += 1
        _settle([(done, error) for (_, done), error in zip(group, outcomes, strict=True)])

    @staticmethod
    def _run(function: Callable[..., Any], args: tuple[Any, ...], done: Future[Any]) -> None:
        if not done.set_running_or_notify_cancel():  # its waiter was cancelled: nothing to run
            return
        try:
            done.set_result(function(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            done.set_exception(exc)


def _sort(item: Waiting | Call | None, receipts: deque[Waiting], calls: deque[Call]) -> bool:
    """Put a queued item where it waits its turn; True for STOP."""
    if item is None:
        return True
    if len(item) == 2:
        receipts.append(item)  # type: ignore[arg-type]
    else:
        calls.append(item)  # type: ignore[arg-type]
    return False


Outcome = tuple[asyncio.Future[None], Exception | None]  # a waiter, and its receipt's error (None: written)


def _settle(outcomes: list[Outcome]) -> None:
    """From the writer thread: one call into each waiting loop settles all of its waiters."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody waits there any more
            loop.call_soon_threadsafe(_resolve, settled)


def _resolve(outcomes: list[Outcome]) -> None:
    for done, error in outcomes:
        if done.done():  # its waiter was cancelled
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
