"""The gateway's one ledger thread: receipts committed in groups and first, other ledger calls between.

A buyer's answer waits for `commit(receipt)`, which returns only once the transaction holding the
receipt has committed: the receipt is on disk before the buyer has the answer. Receipts that arrive
while a transaction runs go into the next one together (group commit), so the cost of a commit (an
fsync on SQLite, a round trip on PostgreSQL) is shared by every job that waited for it; that is how
one gateway writes thousands of receipts a second (bench/ledger.py). A group that fails for one of
its receipts (a value the database will not hold) rather than for the database is written again with
each receipt on its own: that receipt fails alone, and the others are committed.

Receipts come unsigned and the thread signs each with the gateway key just before its group is
written: Ed25519 signing releases the GIL, so the event loop goes on meanwhile (it spent about 2% of
its time per job signing, bench/swarm.py --profile), and a receipt is signed exactly when it is
written.

Receipts and other calls (pins, quarantines, reads: `call`) wait in two queues, and the thread takes
every receipt waiting (up to MAX_GROUP) before each call, one call at a time: a receipt waits for at
most one call's transaction, however many calls are queued. What nodes' messages drive (pins from
births) is coalesced before it gets here (trust.py), so the calls queued stay few.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.errors import ModelNotReady
from appliance.platform.ledger import Ledger
from appliance.platform.receipts import Receipt

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_GROUP = 1000  # receipts in one transaction at most

Waiting = tuple[Receipt, asyncio.Future[None]]
Call = tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]


class LedgerUnavailable(ModelNotReady):
    """The ledger cannot be written: the answer is not given unrecorded (503, try again)."""


class LedgerWriter:
    """Owns the Ledger; every call runs on its thread, so SQLite sees one writer per gateway. `key`
    signs the receipts that come unsigned (Metering's); without it they are written as they come."""

    def __init__(self, ledger: Ledger, key: Ed25519PrivateKey | None = None) -> None:
        self.ledger = ledger
        self.key = key
        self.committed = 0  # receipts, for /metrics
        self.groups = 0
        self.waiting = 0  # receipts queued or being written: answers held back until they commit
        self._receipts: deque[Waiting] = deque()
        self._calls: deque[Call] = deque()
        self._wake = threading.Condition()
        self._is_stopping = False
        self._thread = threading.Thread(target=self._work, name="ledger-writer", daemon=True)
        self._thread.start()

    @property
    def calls_waiting(self) -> int:
        """Ledger calls queued behind the receipts (pins, quarantines, reads), for /metrics."""
        return len(self._calls)

    async def commit(self, receipt: Receipt) -> None:
        """Return once the receipt is committed; LedgerUnavailable when the database refused it.

        The waiter is a plain asyncio future: the writer settles a whole group with one call into the
        loop, and a waiter that was cancelled meanwhile is skipped."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._wake:
            self._receipts.append((receipt, done))
            self._wake.notify()
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
        with self._wake:
            self._calls.append((function, args, done))
            self._wake.notify()
        return await asyncio.wrap_future(done)

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued, then stop the thread and close the database."""
        with self._wake:
            self._is_stopping = True
            self._wake.notify()
        self._thread.join(timeout_s)
        self.ledger.close()

    def _work(self) -> None:
        while True:
            with self._wake:
                while not (self._receipts or self._calls or self._is_stopping):
                    self._wake.wait()
                count = min(len(self._receipts), MAX_GROUP)
                group = [self._receipts.popleft() for _ in range(count)]
                call = self._calls.popleft() if self._calls else None
                if not group and call is None:  # stopping, and nothing is left
                    return
            group = self._signed(group)
            if group:
                self._write(group)
            if call is not None:
                self._run(*call)

    def _signed(self, group: list[Waiting]) -> list[Waiting]:
        """The group with its unsigned receipts signed; one that cannot be (a value its signed JSON
        cannot hold) is answered with its error here and left out."""
        key = self.key
        if key is None:
            return group
        signed: list[Waiting] = []
        failed: list[Outcome] = []
        for receipt, done in group:
            try:
                signed.append((receipt if receipt.gateway_signature else receipt.signed(key), done))
            except Exception as exc:  # noqa: BLE001 - its waiter hears it; the thread goes on
                log.error("ledger: receipt %s not signed: %s", receipt.job_id, exc)
                failed.append((done, exc))
        if failed:
            _settle(failed)
        return signed

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
