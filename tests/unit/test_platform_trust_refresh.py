"""A gateway's own quarantine holds against ledger reads made before it was written."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.platform.catalogue import Catalogue
from appliance.platform.ledger import Ledger
from appliance.platform.trust import Trust
from appliance.platform.view import PoolView
from appliance.platform.writer import LedgerWriter
from appliance.pool import signing

ROOT = "ecp/v1"
WAIT_S = 60.0  # a failure bound only


@pytest.mark.asyncio
async def test_a_ledger_read_from_before_a_failed_check_does_not_release_the_node(tmp_path: Path) -> None:
    """The refresh reads the node's record (not quarantined) on the ledger thread; a canary fails on the
    loop meanwhile; the refresh then applies what it read. The node must stay quarantined: released,
    it took buyer jobs until the next refresh read the quarantine back (helper-31's reproducer)."""
    writer = LedgerWriter(Ledger.open(str(tmp_path / "ledger.sqlite3")))
    view = PoolView(ROOT, needs_key=True)
    events: list[str] = []
    trust = Trust(view, writer, Catalogue(None), emit=lambda kind, **_: events.append(kind), refresh_s=0.01)
    key = signing.public_key_text(Ed25519PrivateKey.generate())
    birth = {"session": 1, "seq": 0, "public_key": key, "models": {"m": {"sha256": "a" * 64}}}
    node = view.ingest(f"{ROOT}/s/cheat/birth", orjson.dumps(birth), 0.0)
    assert node is not None
    trust.born(node)
    while trust._tasks:
        await asyncio.wait(set(trust._tasks))
    assert node.is_trusted and node.quarantine is None

    read, proceed = threading.Event(), threading.Event()
    real_nodes, real_apply = writer.ledger.nodes, trust._apply
    applied = asyncio.Event()

    def nodes(since_ms: int = 0) -> Any:  # the refresh's read, on the ledger thread, held
        records = real_nodes(since_ms)
        if not proceed.is_set():
            read.set()
            proceed.wait(WAIT_S)
        return records

    def apply(target: Any, record: Any) -> None:
        real_apply(target, record)
        applied.set()

    writer.ledger.nodes = nodes  # type: ignore[method-assign]
    trust._apply = apply  # type: ignore[method-assign]
    refresh = asyncio.create_task(trust.refresh_forever())
    try:
        assert await asyncio.to_thread(read.wait, WAIT_S)  # the record read says "not quarantined"
        trust.fail(node, "canary failed on model 'm': output 'y' differs")
        proceed.set()
        await asyncio.wait_for(applied.wait(), WAIT_S)  # the refresh applied the stale record
        assert node.quarantine == "canary failed on model 'm': output 'y' differs"
        assert events == ["node_quarantined"]
    finally:
        proceed.set()
        refresh.cancel()
        while trust._tasks:
            await asyncio.wait(set(trust._tasks))
        writer.close()
    assert real_nodes()[0].quarantine == "canary failed on model 'm': output 'y' differs"
