"""What a market must survive, on real parts: a node killed under load, a refusing node, expired offers,
a broker restart, and two gateways sharing one broker."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from gateway_harness import WAIT_S, request_body, run_gateway, run_nodes, until
from pool_brokers import Broker
from pool_recorder import Names

from appliance.platform.link import GatewayLink
from appliance.platform.presence import Presence
from appliance.platform.presence import topic as presence_topic
from appliance.platform.settings import PlatformSettings
from appliance.platform.view import PoolView
from appliance.pool.wire import Outbound

INFER = "/v2/models/batchable/infer"


def usable(gateway: Any, name: str) -> Any:
    def check() -> bool:
        node = gateway.node(name)
        return bool(node and node["models"].get("batchable", {}).get("is_offer_usable"))

    return check


async def infer(http: httpx.AsyncClient, rows: int = 1) -> httpx.Response:
    _, body, headers = request_body(rows)
    return await http.post(INFER, content=body, headers=headers)


@pytest.mark.asyncio
async def test_sigkill_of_a_node_under_load_loses_no_request(
    tmp_path: Path, pool_repository: Path, broker: Broker, names: Names
) -> None:
    with (
        run_nodes(tmp_path, pool_repository, broker, names, 2) as nodes,
        # The victim's jobs move on its Last Will, not on the job timeout: a busy box may keep the
        # survivor's answers past the default 10 s.
        run_gateway(broker, names, job_timeout_s=120.0) as gateway,
    ):
        victim, survivor = nodes
        for node in nodes:
            await until(usable(gateway, node.name), what=f"{node.name} offering")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            # Freeze the victim so that jobs sent to it stay in flight, then kill it with them.
            victim.signal(signal.SIGSTOP)
            load = [asyncio.create_task(infer(http)) for _ in range(40)]
            # Jobs sent to it, a count that only grows: the rows in flight could be polled too late, once
            # the frozen node's reports had stopped long enough for its jobs to move (seen once in a run of
            # the whole suite on a busy box).
            await until(
                lambda: (gateway.node(victim.name) or {"models": {}})["models"]["batchable"]["jobs_sent"] > 0,
                what="jobs sent to the frozen node",
            )
            stuck = gateway.node(victim.name)["models"]["batchable"]["jobs_sent"]
            victim.signal(signal.SIGKILL)
            answers = await asyncio.gather(*load)
            more = await asyncio.gather(*(infer(http) for _ in range(10)))
        assert [a.status_code for a in answers + more] == [200] * 50, [
            a.text for a in answers if a.status_code != 200
        ]
        by = [a.json()["parameters"]["pool_node"] for a in answers + more]
        assert by.count(f"{names.site}/{survivor.name}") == 50  # the victim answered nothing: all moved
        fleet = gateway.node(victim.name)
        assert stuck >= 1 and fleet["models"]["batchable"]["jobs_lost"] == stuck
        assert fleet["state"] == "offline"
        assert gateway.gateway.metrics.jobs[("batchable", "resent")] == stuck


@pytest.mark.asyncio
async def test_a_node_that_refuses_gets_nothing_more_for_a_while(
    tmp_path: Path, pool_repository: Path, broker: Broker, names: Names
) -> None:
    # node-0 takes one job per 1000 s from any sender: after its first job it refuses with 429 and a
    # retry_after_s of about 1000 s, while still advertising spare capacity.
    pool = {"node-0": {"max_jobs_per_sender_per_s": 0.001}}
    with (
        run_nodes(tmp_path, pool_repository, broker, names, 2, **pool) as _,
        run_gateway(broker, names) as gateway,
    ):
        for name in ("node-0", "node-1"):
            await until(usable(gateway, name), what=f"{name} offering")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            # Work spreads in proportion to free credit, so node-0 gets its share: its second job is
            # refused and moved to node-1. The buyer never sees the refusal.
            for _ in range(2000):
                answer = await infer(http)
                assert answer.status_code == 200, answer.text
                refuser = gateway.node("node-0")["models"]["batchable"]
                if refuser["jobs_refused"]:
                    break
            assert refuser["jobs_refused"] == 1 and refuser["withheld_for_s"] > 900
            sent_before = refuser["jobs_sent"]
            answers = [await infer(http) for _ in range(30)]
        assert [a.status_code for a in answers] == [200] * 30
        assert {a.json()["parameters"]["pool_node"] for a in answers} == {f"{names.site}/node-1"}
        assert gateway.node("node-0")["models"]["batchable"]["jobs_sent"] == sent_before


@pytest.mark.asyncio
async def test_expired_offers_are_never_used(
    tmp_path: Path, pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    with (
        run_nodes(tmp_path, pool_repository, broker, names, 1) as (node,),
        run_gateway(broker, names) as gateway,
    ):
        await until(usable(gateway, node.name), what="the node offering")
        recorder = await recorder_factory(
            broker, Names(names.root, names.site, node.name), f"{names.root}/{names.site}/{node.name}/cmd/#"
        )
        node.signal(signal.SIGSTOP)  # its reports stop; its connection (and state `online`) stays a while
        await until(lambda: gateway.node(node.name)["reason"] == "reports stopped", what="the offer expiring")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            refused = await infer(http)
            assert refused.status_code == 503 and "no node has spare capacity" in refused.json()["error"]
            assert int(refused.headers["retry-after"]) >= 1
            assert not [m for m in recorder.messages if "/cmd/infer/" in m.topic]
            node.signal(signal.SIGCONT)
            await until(usable(gateway, node.name), what="a fresh offer after SIGCONT")
            assert (await infer(http)).status_code == 200


@pytest.mark.asyncio
async def test_a_retained_offer_holds_no_longer_than_the_broker_keeps_it(
    broker: Broker, names: Names, recorder_factory: Any
) -> None:
    """The broker forwards a retained report with what is left of its message expiry: a gateway that
    (re)connects late must not count the report's whole valid_for_s again from its own receipt."""
    if not broker.is_v5:
        pytest.skip("message expiry is MQTT 5")
    node = Names(names.root, names.site, "n")
    publisher = await recorder_factory(broker, node, f"{node.base}/cmd/#")
    report = {"spare_ips_at_slo": 10.0, "accepts_pool_jobs": True, "slo_p99_ms": 100.0}
    publisher.publish(f"{node.base}/state", {"session": 1, "seq": 1, "state": "online"}, retain=True)
    document = {"session": 1, "seq": 2, "valid_for_s": 3600, "models": {"batchable": report}}
    publisher.publish(f"{node.base}/capacity", document, retain=True, expiry_s=600)
    overrides = {"gateway": {"broker": broker.url, "topic_root": names.root, "site": names.site}}
    settings = PlatformSettings.load(None, environ={}, overrides=overrides).gateway
    view = PoolView(names.root)
    link = GatewayLink(
        settings,
        view,
        Presence(names.root, settings.gateway_id),
        on_answer=lambda *_: None,
        on_state=lambda: None,
    )
    link.start(asyncio.get_running_loop())
    try:
        found = await until(
            lambda: view.get(names.site, "n") if view.ingested >= 2 else None,
            what="the retained state and report ingested",
        )
        assert found.capacity is not None and 0 < found.capacity_valid_for_s <= 600
    finally:
        await link.close()


@pytest.mark.asyncio
async def test_a_broker_restart_is_survived(
    tmp_path: Path, pool_repository: Path, broker: Broker, names: Names
) -> None:
    with (
        run_nodes(tmp_path, pool_repository, broker, names, 1) as (node,),
        run_gateway(broker, names) as gateway,
    ):
        await until(usable(gateway, node.name), what="the node offering")
        session = gateway.node(node.name)["session"]
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            assert (await infer(http)).status_code == 200
            broker.stop()
            await until(lambda: not gateway.gateway.link.connected.is_set(), what="the gateway noticing")
            away = await infer(http)
            assert away.status_code == 503 and "retry-after" in away.headers
            broker.start()
            await until(
                lambda: gateway.node(node.name)["session"] > session and usable(gateway, node.name)(),
                what="the node back in a new session",
            )
            assert (await infer(http)).status_code == 200
        assert gateway.gateway.link.connections >= 2


@pytest.mark.asyncio
async def test_two_gateways_share_each_offer_and_both_serve(
    tmp_path: Path, pool_repository: Path, broker: Broker, names: Names
) -> None:
    shared = {"url": str(tmp_path / "ledger.sqlite3")}  # each counts the other: its key is in the ledger
    with (
        run_nodes(tmp_path, pool_repository, broker, names, 1) as (node,),
        run_gateway(broker, names, gateway_id="gw-a", ledger=shared) as first,
    ):
        await until(usable(first, node.name), what="the node offering")
        with run_gateway(broker, names, gateway_id="gw-b", ledger=shared) as second:
            for gateway in (first, second):
                await until(lambda g=gateway: g.nodes()["gateways"] == ["gw-a", "gw-b"], what="presence")
            for gateway in (first, second):
                view = gateway.gateway.view.get(names.site, node.name)
                offer = view.offer("batchable", view.capacity_received_s or 0.0)
                assert offer is not None
                credit = gateway.gateway.credit.credit_rows(
                    view, "batchable", view.capacity_received_s or 0.0
                )
                assert credit == pytest.approx(offer.spare_ips * offer.slo_window_s / 2)
                async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
                    assert (await infer(http)).status_code == 200
        # gw-b said `offline` on its way out: gw-a takes the whole offer again.
        await until(lambda: first.nodes()["gateways"] == ["gw-a"], what="gw-b gone")
        assert first.gateway.presence.share() == 1.0


@pytest.mark.asyncio
async def test_a_gateway_started_before_its_broker_connects_once_the_broker_is_up(
    broker_factory: Any, names: Names, recorder_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    broker: Broker = broker_factory(start=False)
    overrides = {"gateway": {"broker": broker.url, "topic_root": names.root, "site": names.site}}
    settings = PlatformSettings.load(None, environ={}, overrides=overrides).gateway
    presence = Presence(names.root, settings.gateway_id)
    link = GatewayLink(
        settings, PoolView(names.root), presence, on_answer=lambda *_: None, on_state=lambda: None
    )
    with caplog.at_level(logging.WARNING, logger="appliance.platform.link"):
        link.start(asyncio.get_running_loop())
        await until(lambda: "cannot connect to broker" in caplog.text, what="a refused connection")
        assert not link.connected.is_set()
        await asyncio.to_thread(broker.start)
        assert await link.wait_connected(WAIT_S), "the gateway did not connect once the broker was up"
    topic = presence_topic(names.root, settings.gateway_id)
    recorder = await recorder_factory(broker, names, topic)
    said = await recorder.expect(lambda m: m.topic == topic and orjson.loads(m.payload)["state"] == "online")
    await link.close()  # says `offline` before it disconnects
    await recorder.expect(
        lambda m: m.topic == topic and orjson.loads(m.payload)["state"] == "offline",
        since=recorder.messages.index(said) + 1,
    )
    assert not link.connected.is_set()


@pytest.mark.asyncio
async def test_a_job_larger_than_the_socket_buffer_is_written_whole(
    broker: Broker, names: Names, recorder_factory: Any
) -> None:
    """The loop writes what paho queued once per turn and watches the socket only while its buffer is
    full: a 16 MB job (several buffers' worth) must still leave whole, with small jobs behind it."""
    overrides = {"gateway": {"broker": broker.url, "topic_root": names.root, "site": names.site}}
    settings = PlatformSettings.load(None, environ={}, overrides=overrides).gateway
    link = GatewayLink(
        settings,
        PoolView(names.root),
        Presence(names.root, settings.gateway_id),
        on_answer=lambda *_: None,
        on_state=lambda: None,
    )
    topic = f"{names.root}/{names.site}/big/cmd/infer/m"
    recorder = await recorder_factory(broker, names, topic)
    link.start(asyncio.get_running_loop())
    assert await link.wait_connected(WAIT_S)
    big = bytes(range(256)) * (16 * 4096)
    link.publish(Outbound(topic, big, correlation=b"big"))
    for index in range(3):
        link.publish(Outbound(topic, b"small", correlation=f"small-{index}".encode()))
    arrived = await recorder.expect(lambda m: m.correlation == b"small-2")
    first = await recorder.expect(lambda m: m.correlation == b"big")
    assert first.payload == big and recorder.messages.index(first) < recorder.messages.index(arrived)
    await link.close()
