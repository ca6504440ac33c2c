"""When only the gateway's own broker connection drops (broker and nodes stay up), on real parts: the broker
keeps its session, so an answer sent meanwhile reaches the buyer, and its peers hear every drop's Will."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import WAIT_S, RunningGateway, run_gateway, until
from pool_brokers import Broker
from pool_recorder import Names
from sim_nodes import INFER, MODEL, SimNode, buyer_body


def offering(gateway: RunningGateway, name: str) -> Any:
    return lambda: (gateway.node(name) or {}).get("models", {}).get(MODEL, {}).get("is_offer_usable")


@contextmanager
def held_reconnects(gateway: RunningGateway) -> Iterator[threading.Event]:
    """The gateway's link reconnects only once the event is set (then at once, every time after)."""
    client = gateway.gateway.link._client
    back = threading.Event()
    reconnect = client.reconnect

    def when_let(*args: Any, **kwargs: Any) -> Any:
        assert back.wait(WAIT_S), "the test never let the gateway reconnect"
        return reconnect(*args, **kwargs)

    client.reconnect = when_let  # type: ignore[method-assign]
    try:
        yield back
    finally:
        back.set()
        client.reconnect = reconnect  # type: ignore[method-assign]


async def drop(gateway: RunningGateway) -> None:
    """End the gateway's TCP connection to the broker under it (as a network fault would)."""
    link = gateway.gateway.link
    assert link._loop is not None
    link._loop.call_soon_threadsafe(lambda: link._client.socket().shutdown(socket.SHUT_RDWR))
    await until(lambda: not link.connected.is_set(), what="the gateway losing the broker")


@pytest.mark.asyncio
async def test_an_answer_sent_while_the_gateways_connection_is_down_reaches_its_buyer(
    broker: Broker, names: Names, recorder_factory: Any
) -> None:
    # A withheld node would make the next buyer's job fail: the node must not be withheld.
    with run_gateway(broker, names, job_timeout_s=15.0, timeout_withhold_s=600.0) as gateway:
        link = gateway.gateway.link
        node = await SimNode.start(recorder_factory, broker, names, "solo", spare=1000.0)
        spy = await recorder_factory(broker, Names(names.root, names.site, "spy"), f"{names.root}/_reply/#")
        await until(offering(gateway, "solo"), what="solo offering")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=WAIT_S) as http:
            buying = asyncio.create_task(http.post(INFER, content=buyer_body(1)))
            job = await node.job()
            with held_reconnects(gateway) as back:
                await drop(gateway)
                node.answer(job)
                # The broker has routed it (to the spy, and to the gateway's session) while it is away.
                await spy.expect(lambda m: m.correlation == job.correlation)
                back.set()
                bought = await buying
            assert bought.status_code == 200, bought.text
            assert link.drops == 1 and link.connections == 2
            serving = asyncio.create_task(node.serve())
            try:
                again = await http.post(INFER, content=buyer_body(2))  # subscriptions and credit intact
            finally:
                serving.cancel()
            assert again.status_code == 200, again.text
        assert gateway.gateway.dispatcher.late_answers == 0


@pytest.mark.asyncio
async def test_peers_hear_the_will_of_every_drop_of_a_gateways_connection(
    tmp_path: Path, broker: Broker, names: Names
) -> None:
    shared = {"url": str(tmp_path / "ledger.sqlite3")}
    slow = {"presence_refresh_s": 600.0}  # gw-a is not counted again by expiry: only by its Will
    with (
        run_gateway(broker, names, gateway_id="gw-a", ledger=shared, **slow) as first,
        run_gateway(broker, names, gateway_id="gw-b", ledger=shared, **slow) as second,
    ):
        peer = second.gateway.presence
        await until(
            lambda: first.gateway.presence.share() == 0.5 and peer.share() == 0.5, what="both counted"
        )
        for round_ in range(3):
            with held_reconnects(first) as back:
                await drop(first)
                await until(lambda: peer.share() == 1.0, what=f"gw-a's Last Will of drop {round_ + 1} taken")
                back.set()
                await until(lambda: peer.share() == 0.5, what=f"gw-a counted again after drop {round_ + 1}")
        assert first.gateway.link.drops == 3
