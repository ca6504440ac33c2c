"""Which nodes the gateway may send work to: pinned keys and quarantine, kept in the shared ledger.

A node's key is pinned in the ledger the first time a birth shows it. A later birth with another key
quarantines the node (kind `key`) until an operator runs `appliance platform nodes trust NODE`. A node
whose birth serves a catalogue name from a file the catalogue does not list is quarantined (`file`), and
so is one that fails a check (`check`); both end when it passes a canary again. Every gateway applies
what the ledger says every `ledger.refresh_s`, so a quarantine by one is a quarantine for all. A change
of a node's standing is published on
`<root>/_gateways/<id>/evt/<event>` (`node_quarantined`, `node_released`, `receipts_flagged`) by each gateway
that applies it.

Births are the pool's to send, as often as it likes, so what they make the ledger do is bounded: a birth
whose key the node's record already holds (pinned, or offered and refused) writes nothing; other births
wait in one slot per node, where a later birth's key replaces an earlier one's, and one pin at a time
goes to the ledger; a birth serving a file the catalogue does not list quarantines its node once, not
once per birth.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from appliance.platform import verify
from appliance.platform.catalogue import Catalogue
from appliance.platform.ledger import CHECK, FILE, NodeRecord, now_ms
from appliance.platform.view import NodeView, PoolView
from appliance.platform.writer import LedgerWriter

log = logging.getLogger(__name__)

NO_KEY = "its birth carries no public_key: its answers cannot be verified"
BAD_KEY = "its birth's public_key is not an Ed25519 key: its answers cannot be verified"


class Trust:
    """Pins and quarantines between the ledger (the truth, shared) and the view (what dispatch reads)."""

    def __init__(
        self,
        view: PoolView,
        writer: LedgerWriter,
        catalogue: Catalogue,
        *,
        emit: Callable[..., None],
        refresh_s: float,
    ) -> None:
        self.view = view
        self.writer = writer
        self.catalogue = catalogue
        self.emit = emit
        self.refresh_s = refresh_s
        self.records: dict[str, NodeRecord] = {record.node: record for record in writer.ledger.nodes()}
        self._seen_ms = now_ms()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pins: dict[str, tuple[NodeView, str]] = {}  # node -> the latest key its births want pinned
        self._pinner: asyncio.Task[None] | None = None  # the one task taking them to the ledger
        self._pinning: str | None = None  # the node whose pin the ledger is writing now
        # node -> (reason, when) of the quarantine this gateway asked the ledger for, until it is lifted
        self._asked: dict[str, tuple[str, int]] = {}

    def quarantined(self) -> int:
        return sum(1 for node in self.view.nodes() if node.quarantine is not None)

    def born(self, node: NodeView) -> None:
        """A birth arrived (on the loop): pin or check its key, then check the files it serves. A key that
        is not an Ed25519 public key is never pinned: nothing it would verify could be accepted."""
        key = node.public_key
        if key is None:
            node.trusted_key = None
            self._set(node, NO_KEY)
            return
        try:
            verify.node_key(key)
        except ValueError as exc:
            node.trusted_key = None
            self._set(node, f"{BAD_KEY}: {exc}")
            return
        record = self.records.get(node.name)
        is_pinning = node.name == self._pinning or node.name in self._pins
        # The pinned key never changes the record; an offered one does not either, unless a pin under
        # way changes what is offered: then it waits its turn, and is looked at again then.
        if record is not None and (
            key == record.public_key or (key == record.offered_key and not is_pinning)
        ):
            self._apply(node, record)
            self._check_files(node)
            return
        self._pins[node.name] = (node, key)  # a later birth's key replaces the one waiting
        if self._pinner is None or self._pinner.done():
            self._pinner = self._spawn(self._pin_waiting())

    @property
    def pins_waiting(self) -> int:
        """Nodes whose birth waits to be pinned (one each, whatever they sent), for /metrics."""
        return len(self._pins)

    async def _pin_waiting(self) -> None:
        """Pin the waiting births' keys one after the other, the oldest node first; a key the record
        came to hold meanwhile (the same key born twice) writes nothing."""
        while self._pins:
            name = next(iter(self._pins))
            node, key = self._pins.pop(name)
            record = self.records.get(name)
            if record is None or key not in (record.public_key, record.offered_key):
                self._pinning = name
                try:
                    record = await self.writer.call(self.writer.ledger.pin, name, key)
                except Exception as exc:  # noqa: BLE001 - the node's next birth tries again
                    log.error("ledger: node %s not pinned: %s", name, exc)
                    continue
                finally:
                    self._pinning = None
                self.records[name] = record
            self._apply(node, record)
            self._check_files(node)

    def _check_files(self, node: NodeView) -> None:
        if self.catalogue.entries is None:
            return
        for name, entry in self.catalogue.entries.items():
            served = node.model_birth(name).get("sha256")
            if served is not None and served not in entry.files:
                reason = f"serves model {name!r} from file {served}, which the catalogue does not list"
                asked = self._asked.get(node.name)
                if asked is not None and asked[0] == reason:  # asked already: births repeat themselves
                    self._set(node, reason)
                    return
                self.fail(node, reason, FILE)
                return

    def fail(self, node: NodeView, reason: str, kind: str = CHECK) -> None:
        """Quarantine the node at once here, then in the ledger (which flags its receipts since its
        last passed check)."""
        self._set(node, reason)
        # Held here until the ledger lifts it: a record read before this quarantine was written (a
        # refresh in flight) must not release the node it just caught.
        self._asked[node.name] = (reason, now_ms())
        self._spawn(self._fail(node, reason, kind))

    async def _fail(self, node: NodeView, reason: str, kind: str) -> None:
        try:
            flagged = await self.writer.call(self.writer.ledger.quarantine, node.name, reason, kind)
        except Exception:
            asked = self._asked.get(node.name)
            if asked is not None and asked[0] == reason:
                del self._asked[node.name]  # not in the ledger: the next birth asks again
            raise
        log.warning("node %s quarantined: %s (%d receipts flagged)", node.name, reason, flagged)
        if flagged:
            self.emit("receipts_flagged", node=node.name, reason=reason, flagged=flagged)

    async def passed(self, node: NodeView) -> None:
        """A check passed: the ledger records it and may free the node."""
        record = await self.writer.call(self.writer.ledger.passed, node.name)
        if record is not None:
            self.records[node.name] = record
            if record.quarantine is None:
                self._asked.pop(node.name, None)
            self._apply(node, record)

    def _apply(self, node: NodeView, record: NodeRecord) -> None:
        """The record's key and standing on the node; a quarantine this gateway asked for holds until
        the ledger lifts one (a record read before it was written does not lift it)."""
        node.trusted_key = record.public_key
        asked = self._asked.get(node.name)
        self._set(node, record.quarantine or (asked[0] if asked is not None else None))

    def _set(self, node: NodeView, reason: str | None) -> None:
        before, node.quarantine = node.quarantine, reason
        if before is None and reason is not None:
            self.emit("node_quarantined", node=node.name, reason=reason)
        elif before is not None and reason is None:
            self.emit("node_released", node=node.name)

    async def refresh_forever(self) -> None:
        """Apply what other gateways (and `nodes trust`) wrote to the ledger."""
        while True:
            await asyncio.sleep(self.refresh_s)
            since_ms, self._seen_ms = self._seen_ms - 5_000, now_ms()  # margin: other gateways' clocks
            try:
                changed = await self.writer.call(self.writer.ledger.nodes, since_ms)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("ledger: cannot read node records: %s", exc)
                continue
            for record in changed:
                self.records[record.node] = record
                asked = self._asked.get(record.node)
                if asked is not None and record.quarantine is None and record.updated_ms > asked[1]:
                    del self._asked[record.node]  # lifted since (a check passed on some gateway)
                site, _, name = record.node.partition("/")
                node = self.view.get(site, name)
                if node is not None and node.public_key is not None:
                    self._apply(node, record)

    def _spawn(self, work: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("ledger: node record not updated: %s", task.exception())
