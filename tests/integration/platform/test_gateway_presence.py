"""Gateway presence on real parts: only gateways the shared ledger lists count, whatever strangers say."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import run_gateway, until
from pool_brokers import Broker
from pool_recorder import Names

from appliance.platform.presence import topic as presence_topic

FAKES = 500


@pytest.mark.asyncio
async def test_a_strangers_presences_neither_shrink_nor_grow_a_gateways_share(
    tmp_path: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    shared = {"url": str(tmp_path / "ledger.sqlite3")}
    # The stranger listens only to its own commands: it is here to publish.
    stranger = await recorder_factory(
        broker, Names(names.root, names.site, "stranger"), f"{names.root}/{names.site}/stranger/cmd/#"
    )
    seq = itertools.count()
    with (
        run_gateway(broker, names, gateway_id="gw-a", ledger=shared) as first,
        run_gateway(broker, names, gateway_id="gw-b", ledger=shared) as second,
    ):
        for gateway in (first, second):
            await until(lambda g=gateway: g.gateway.presence.share() == 0.5, what="both gateways counted")
        # gw-b is running; a stranger says (retained) that it is offline, and brings FAKES more gateways.
        now_ms = int(time.time() * 1000)
        offline = {"gateway": "gw-b", "state": "offline", "ts_ms": now_ms + 60_000}
        stranger.publish(presence_topic(names.root, "gw-b"), offline, retain=True)
        for index in range(FAKES):
            fake = {"gateway": f"fake-{index}", "state": "online", "ts_ms": now_ms}
            stranger.publish(presence_topic(names.root, f"fake-{index}"), fake, retain=True)
        marker = next(seq)  # behind them, from the same client: once gw-a has it, it has read them
        state = {"session": 1, "seq": marker, "state": "online"}
        stranger.publish(f"{names.root}/{names.site}/stranger/state", state, retain=True)

        def has_read() -> bool:
            found = first.gateway.view.get(names.site, "stranger")
            return found is not None and found.seqs.get("state") == marker

        await until(has_read, what="gw-a reading the stranger's presences")
        assert first.gateway.presence.share() == 0.5
        assert first.nodes()["gateways"] == ["gw-a", "gw-b"]
        # A gateway starting now reads the stranger's retained words first, and counts the two others.
        with run_gateway(broker, names, gateway_id="gw-c", ledger=shared) as third:
            for gateway in (first, second, third):
                await until(
                    lambda g=gateway: g.gateway.presence.live() == ["gw-a", "gw-b", "gw-c"],
                    what="three gateways counted",
                )
            assert third.gateway.presence.share() == pytest.approx(1 / 3)
        await until(lambda: first.gateway.presence.share() == 0.5, what="gw-c gone")
