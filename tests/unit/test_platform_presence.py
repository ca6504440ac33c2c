"""Gateway presence counts only gateways the shared ledger lists, signed, fresh, and at most max_gateways."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.errors import ModelNotReady
from appliance.platform import presence
from appliance.platform.presence import OFFLINE, ONLINE, Presence
from appliance.pool import signing
from appliance.pool.wire import Outbound

ROOT = "ecp/v1"


class Clocks:
    """Wall clock (ms) and monotonic clock (s), moved by the test; one host's (the wall clock set where
    hosts' clocks differ)."""

    def __init__(self, wall_ms: int = 1_800_000_000_000) -> None:
        self.ms = wall_ms
        self.s = 1000.0

    def wall(self) -> int:
        return self.ms

    def monotonic(self) -> float:
        return self.s

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)
        self.s += seconds


class Peer:
    """Another gateway: its key, and what it publishes."""

    def __init__(self, gateway_id: str, clocks: Clocks) -> None:
        self.id = gateway_id
        self.key = Ed25519PrivateKey.generate()
        self.presence = Presence(ROOT, gateway_id, key=self.key, clock_ms=clocks.wall)

    def says(self, state: str) -> bytes:
        return self.presence.document(state)

    def key_text(self) -> str:
        return signing.public_key_text(self.key)


def gateway(clocks: Clocks, *peers: Peer, own_id: str = "gw-a", **options: Any) -> Presence:
    found = Presence(
        ROOT,
        own_id,
        key=Ed25519PrivateKey.generate(),
        clock_ms=clocks.wall,
        monotonic=clocks.monotonic,
        **options,
    )
    found.known({peer.id: [peer.key_text()] for peer in peers})
    return found


def topic(gateway_id: str) -> str:
    return presence.topic(ROOT, gateway_id)


def test_only_a_presence_signed_with_a_key_the_ledger_lists_for_its_id_counts() -> None:
    clocks = Clocks()
    b, stranger = Peer("gw-b", clocks), Peer("gw-x", clocks)
    a = gateway(clocks, b)
    unsigned = orjson.dumps({"gateway": "gw-b", "state": ONLINE, "ts_ms": clocks.ms})
    forged = orjson.loads(stranger.says(ONLINE)) | {"gateway": "gw-b"}  # signed, by a key not gw-b's
    for payload in (unsigned, orjson.dumps(forged), stranger.says(ONLINE), b"\xff", b"[]", b"x" * 5000):
        assert a.ingest(topic("gw-b"), payload)
    assert a.share() == 1.0 and a.live() == ["gw-a"]
    assert a.ingest(topic("gw-c"), b.says(ONLINE))  # gw-b's own words, under another id's topic
    assert a.share() == 1.0 and a.ignored == 7
    a.ingest(topic("gw-b"), b.says(ONLINE))
    assert a.share() == 0.5 and a.live() == ["gw-a", "gw-b"]
    assert not a.ingest(f"{ROOT}/s/n/birth", b.says(ONLINE))  # not a presence topic at all


def test_ten_thousand_made_up_gateways_change_nothing_and_are_not_kept() -> None:
    clocks = Clocks()
    b = Peer("gw-b", clocks)
    a = gateway(clocks, b)
    a.ingest(topic("gw-b"), b.says(ONLINE))
    for index in range(10_000):
        made_up = Peer(f"fake-{index}", clocks) if index % 1000 == 0 else None
        payload = (
            made_up.says(ONLINE) if made_up else orjson.dumps({"gateway": f"fake-{index}", "state": ONLINE})
        )
        a.ingest(topic(f"fake-{index}"), payload)
    assert a.share() == 0.5 and a.live() == ["gw-a", "gw-b"] and a.ignored == 10_000
    assert len(a._peers) == 1 and len(a._unknown) <= presence.MAX_UNKNOWN


def test_a_strangers_offline_cannot_remove_a_live_peer_nor_can_replays() -> None:
    clocks = Clocks()
    b = Peer("gw-b", clocks)
    a = gateway(clocks, b)
    old_run_offline = b.says(OFFLINE)  # a clean stop of an earlier run, kept by whoever saw it
    b.presence = Presence(ROOT, "gw-b", key=b.key, clock_ms=clocks.wall)  # gw-b restarts: a new run
    clocks.advance(1)
    will = b.says(OFFLINE)  # its Last Will, signed as its run begins
    clocks.advance(1)
    a.ingest(topic("gw-b"), b.says(ONLINE))
    assert a.share() == 0.5
    unsigned = orjson.dumps({"gateway": "gw-b", "state": OFFLINE, "ts_ms": clocks.ms + 10_000})
    for payload in (unsigned, old_run_offline):
        a.ingest(topic("gw-b"), payload)
        assert a.share() == 0.5
    a.ingest(topic("gw-b"), will)  # the broker sends its Will: its connection is lost
    assert a.share() == 1.0
    clocks.advance(1)
    a.ingest(topic("gw-b"), b.says(ONLINE))  # it reconnects, same run
    assert a.share() == 0.5
    a.ingest(topic("gw-b"), will)  # a copy of the Will it has already had: a replay
    assert a.share() == 0.5
    clocks.advance(1)
    a.ingest(topic("gw-b"), b.says(OFFLINE))  # a clean stop, newer than anything it said
    assert a.share() == 1.0 and a.live() == ["gw-a"]


def test_an_old_online_is_not_counted_and_a_peer_that_stops_refreshing_expires() -> None:
    clocks = Clocks()
    b = Peer("gw-b", clocks)
    a = gateway(clocks, b, refresh_s=10.0)
    stale = b.says(ONLINE)
    clocks.advance(a.max_clock_skew_s + 1)
    a.ingest(topic("gw-b"), stale)  # what a dead gateway said long ago (past any clock skew), replayed
    assert a.share() == 1.0
    a.ingest(topic("gw-b"), b.says(ONLINE))
    assert a.share() == 0.5
    clocks.advance(a.expiry_s - 1)
    a.expire()
    assert a.share() == 0.5  # not yet three refreshes late
    clocks.advance(2)
    a.expire()
    assert a.share() == 1.0 and a.live() == ["gw-a"]


def test_at_most_max_gateways_are_counted() -> None:
    clocks = Clocks()
    peers = [Peer(f"gw-{index}", clocks) for index in range(10)]
    a = gateway(clocks, *peers, max_gateways=4)
    for peer in peers:
        a.ingest(topic(peer.id), peer.says(ONLINE))
    assert a.share() == 0.25 and len(a.live()) == 4 and "gw-a" in a.live()


def test_the_links_announcements_are_signed_by_the_gateways_presence() -> None:
    clocks = Clocks()
    b = Peer("gw-b", clocks)
    a = gateway(clocks, b)
    a.ingest(topic("gw-b"), b.presence.document(ONLINE))  # as GatewayLink builds it
    assert a.share() == 0.5
    keyless = Presence("ecp/v1", "nobody")
    said = orjson.loads(keyless.document(ONLINE))
    assert said["gateway"] == "nobody" and "signature" not in said


@pytest.mark.asyncio
async def test_refreshes_are_signed_retained_and_expire_and_a_new_signer_is_looked_up() -> None:
    clocks = Clocks()
    b = Peer("gw-b", clocks)
    a = gateway(clocks)  # the ledger did not list gw-b when gw-a started
    published: asyncio.Queue[Outbound] = asyncio.Queue()
    reads = asyncio.Queue[None]()

    def publish(message: Outbound) -> None:
        published.put_nowait(message)
        if published.qsize() == 1:
            raise ModelNotReady("not connected")  # said once: the next round publishes again

    async def read_keys() -> dict[str, list[str]]:
        reads.put_nowait(None)
        return {"gw-b": [b.key_text()]}

    refreshing = asyncio.create_task(a.refresh_forever(publish, read_keys))
    try:
        async with asyncio.timeout(30):
            first = await published.get()
            await reads.get()
            assert first.topic == topic("gw-a") and first.retain and first.expiry_s == int(a.expiry_s)
            a.known({})  # as if gw-b started after that read: its presence makes gw-a read the ledger
            a.ingest(topic("gw-b"), b.says(ONLINE))
            assert a.share() == 1.0
            await reads.get()
            assert a.share() == 0.5  # taken once the ledger listed its key
            greeting = await published.get()  # gw-a answers a newly counted peer with its own presence
            assert greeting.topic == topic("gw-a")
            checker = gateway(clocks, own_id="gw-z")
            assert a.key is not None
            checker.known({"gw-a": [signing.public_key_text(a.key)]})
            checker.ingest(greeting.topic, greeting.payload)
            assert checker.share() == 0.5
    finally:
        refreshing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await refreshing
