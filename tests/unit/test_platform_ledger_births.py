"""What births make the ledger do is bounded, and a buyer's receipt never waits behind it (trust, writer)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ledger_databases import KINDS, ledger_url, writer_held
from test_platform_ledger import receipt

from appliance.platform.catalogue import Catalogue, Entry
from appliance.platform.ledger import FILE, KEY, Ledger
from appliance.platform.trust import Trust
from appliance.platform.view import NodeView, PoolView
from appliance.platform.writer import LedgerWriter
from appliance.pool import signing

ROOT = "ecp/v1"
BIRTHS = 3000
PINNED, FIRST, SECOND = (signing.public_key_text(Ed25519PrivateKey.generate()) for _ in range(3))


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with ledger_url(request.param, tmp_path) as found:
        yield found


class Recorded:
    """The ledger calls the writer thread makes, in the order it makes them."""

    def __init__(self, ledger: Ledger) -> None:
        self.done: list[str] = []
        self._lock = threading.Lock()
        for name in ("pin", "quarantine", "write"):
            setattr(ledger, name, self._recording(name, getattr(ledger, name)))

    def _recording(self, name: str, method: Any) -> Any:
        def recorded(*args: Any) -> Any:
            with self._lock:
                self.done.append(name)
            return method(*args)

        return recorded


def born(view: PoolView, trust: Trust, seq: int, key: str, sha256: str = "a" * 64) -> NodeView:
    birth = {"session": 1, "seq": seq, "public_key": key, "models": {"m": {"sha256": sha256}}}
    node = view.ingest(f"{ROOT}/s/evil/birth", orjson.dumps(birth), 0.0)
    assert node is not None
    trust.born(node)
    return node


async def settled(trust: Trust) -> None:
    while trust._tasks:
        await asyncio.wait(set(trust._tasks))


@pytest.mark.asyncio
async def test_births_alternating_keys_wait_in_one_slot_and_a_receipt_goes_first(url: str) -> None:
    writer = LedgerWriter(Ledger.open(url))
    recorded = Recorded(writer.ledger)
    view = PoolView(ROOT, needs_key=True)
    trust = Trust(view, writer, Catalogue(None), emit=lambda kind, **_: None, refresh_s=60.0)
    node = born(view, trust, 0, PINNED)
    await settled(trust)
    assert node.is_trusted and recorded.done == ["pin"]
    recorded.done.clear()
    async with writer_held(writer):
        for seq in range(1, BIRTHS + 1):  # one node, each birth with the other new key
            born(view, trust, seq, FIRST if seq % 2 else SECOND)
        for _ in range(3):
            await asyncio.sleep(0)  # whatever the births queue gets onto the writer's queues
        committed = asyncio.ensure_future(writer.commit(receipt("buyer/0")))
        while writer.waiting < 1:
            await asyncio.sleep(0)
        assert trust.pins_waiting <= 1 and writer.calls_waiting <= 1
    await committed
    await settled(trust)
    # The receipt waited for one pin at most; the 3,000 births made one pin, of the last birth's key.
    assert recorded.done.index("write") <= 1
    assert recorded.done.count("pin") == 1
    record = trust.records["s/evil"]
    assert (record.public_key, record.offered_key, record.quarantine_kind) == (PINNED, SECOND, KEY)
    assert node.quarantine == record.quarantine and node.trusted_key == PINNED
    # Keys the record holds already (pinned, or offered and refused) write nothing, however often born.
    for seq in range(BIRTHS + 1, BIRTHS + 101):
        born(view, trust, seq, PINNED if seq % 2 else SECOND)
    await settled(trust)
    assert recorded.done.count("pin") == 1 and trust.pins_waiting == 0
    assert node.quarantine == record.quarantine
    # A birth whose key the record offers, while a pin that changes the offer is under way, is looked
    # at again after it: the ledger ends with the last birth's key.
    async with writer_held(writer):
        born(view, trust, BIRTHS + 101, FIRST)
        while writer.calls_waiting < 1:
            await asyncio.sleep(0)
        born(view, trust, BIRTHS + 102, SECOND)
    await settled(trust)
    assert recorded.done.count("pin") == 3 and trust.records["s/evil"].offered_key == SECOND
    writer.close()


@pytest.mark.asyncio
async def test_births_serving_a_file_the_catalogue_does_not_list_quarantine_once(tmp_path: Path) -> None:
    writer = LedgerWriter(Ledger.open(str(tmp_path / "ledger.sqlite3")))
    recorded = Recorded(writer.ledger)
    view = PoolView(ROOT, needs_key=True)
    events: list[str] = []
    catalogue = Catalogue({"m": Entry("m", frozenset({"a" * 64}))})
    trust = Trust(view, writer, catalogue, emit=lambda kind, **_: events.append(kind), refresh_s=60.0)
    node = born(view, trust, 0, PINNED, sha256="b" * 64)
    await settled(trust)
    for seq in range(1, 1001):
        born(view, trust, seq, PINNED, sha256="b" * 64)
        if seq % 100 == 0:
            await settled(trust)
    await settled(trust)
    assert recorded.done.count("quarantine") == 1
    assert events == ["node_quarantined"]  # never released in between, so never quarantined again
    assert node.quarantine is not None and "catalogue does not list" in node.quarantine
    [record] = writer.ledger.nodes()
    assert record.quarantine_kind == FILE
    writer.close()


@pytest.mark.asyncio
async def test_receipts_go_before_ledger_calls_queued_ahead_of_them(tmp_path: Path) -> None:
    writer = LedgerWriter(Ledger.open(str(tmp_path / "ledger.sqlite3")))
    recorded = Recorded(writer.ledger)

    def call() -> None:
        recorded.done.append("call")

    async with writer_held(writer):
        calls = [asyncio.ensure_future(writer.call(call)) for _ in range(100)]
        for _ in range(3):
            await asyncio.sleep(0)
        committed = [asyncio.ensure_future(writer.commit(receipt(f"j{i}/0"))) for i in range(5)]
        while writer.waiting < 5:
            await asyncio.sleep(0)
    await asyncio.gather(*committed, *calls)
    # One call at most, then the five receipts in one transaction, then the other calls.
    assert recorded.done.index("write") <= 1 and recorded.done.count("call") == 100
    assert recorded.done.count("write") == 1 and writer.committed == 5
    writer.close()
