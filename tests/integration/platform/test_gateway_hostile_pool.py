"""A hostile pool on real parts (mosquitto, a gateway, simulated nodes): what one node publishes, within
what the broker lets it, never makes nodes of its own, breaks a document buyers or operators read, or
makes the gateway hold more than its bounds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from acl_pool import login
from gateway_harness import run_gateway, until
from pool_brokers import Broker
from pool_recorder import Names, Recorder
from sim_nodes import INFER, MODEL, SHA, SPEC, SimNode, buyer_body

from appliance.pool import identity, signing

OTHER = "c" * 64  # a file of the intruder's choosing
DEEP = b"[" * 300 + b"]" * 300  # orjson reads 1024 levels but writes only 254


def offering(gateway: Any, name: str) -> Callable[[], Any]:
    return lambda: (gateway.node(name) or {}).get("models", {}).get(MODEL, {}).get("is_offer_usable")


def deep(document: dict[str, Any]) -> bytes:
    """`document` with every "@deep" string replaced by JSON nested 300 deep (orjson would not write it)."""
    return orjson.dumps(document).replace(b'"@deep"', DEEP)


def announce(recorder: Recorder, base: str, *, sha256: str, spare: float) -> None:
    """A birth with a key of its own, `online`, and an offer for MODEL, all retained, under `base`."""
    model = {"sha256": sha256, "slo_p99_ms": 100.0, "inputs": [{"name": "x", **SPEC}]}
    key = signing.public_key_text(identity.generate())
    birth = {"session": 1, "seq": 0, "models": {MODEL: model}, "public_key": key}
    recorder.publish(f"{base}/birth", birth, retain=True)
    recorder.publish(f"{base}/state", {"session": 1, "seq": 1, "state": "online", "reason": ""}, retain=True)
    offer = {"spare_ips_at_slo": spare, "max_ips_at_slo": spare, "accepts_pool_jobs": spare > 0}
    report = {"session": 1, "seq": 2, "valid_for_s": 600, "models": {MODEL: offer}}
    recorder.publish(f"{base}/capacity", report, retain=True)


async def buy_from(honest: SimNode, http: httpx.AsyncClient) -> httpx.Response:
    """One buyer job, answered by `honest` when it is sent there."""
    buying = asyncio.create_task(http.post(INFER, content=buyer_body(1)))
    job = asyncio.create_task(honest.job())
    done, _ = await asyncio.wait({buying, job}, return_when=asyncio.FIRST_COMPLETED)
    if job in done:
        honest.answer(job.result())
    else:
        job.cancel()
    return await buying


@pytest.mark.asyncio
async def test_what_a_node_publishes_under_reply_is_no_node(
    acl_broker: Broker, names: Names, recorder_factory: Any
) -> None:
    """The README's ACL lets every node write answers under <root>/_reply/#, and a gateway of every site
    subscribes to <root>/+/+/birth: what `evil` publishes as <root>/_reply/<name>/{birth,state,capacity}
    is still no node. None is in the view, none is pinned, none outvotes honest on the model's file, and
    none is sent a job."""
    with run_gateway(acl_broker, names, site="+", **login("platform")) as gateway:
        view = gateway.gateway.view
        honest = await SimNode.start(
            recorder_factory, acl_broker, names, "honest", spare=100.0, **login("honest")
        )
        await until(offering(gateway, "honest"), what="honest offering")
        evil = await recorder_factory(
            acl_broker,
            Names(names.root, names.site, "evil"),
            f"{names.root}/{names.site}/evil/cmd/#",
            **login("evil"),
        )
        for index in range(5):
            announce(evil, f"{names.root}/_reply/fake-{index}", sha256=OTHER, spare=1e9)
        # Then a message of its own, which the gateway reads after those (one publisher, in order).
        mark = {"session": 1, "seq": 0, "state": "draining", "reason": "marker"}
        evil.publish(f"{names.root}/{names.site}/evil/state", mark, retain=True)
        await until(lambda: view.get(names.site, "evil") is not None, what="evil's own state")
        assert [node.name for node in view.nodes()] == [f"{names.site}/evil", f"{names.site}/honest"]
        assert view.rejected["topic"] == 15 and view.offering(MODEL) == [view.get(names.site, "honest")]
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            metadata = await http.get(f"/v2/models/{MODEL}")
            assert metadata.status_code == 200 and metadata.json()["parameters"]["sha256"] == SHA
            bought = await buy_from(honest, http)
        assert bought.status_code == 200, bought.text
        assert bought.json()["parameters"]["pool_node"] == f"{names.site}/honest"


@pytest.mark.asyncio
async def test_one_nodes_deeply_nested_messages_break_nothing_anyone_reads(
    broker: Broker, names: Names, recorder_factory: Any
) -> None:
    """JSON nested 300 deep in fields the gateway does not read (orjson writes no more than 254 levels)
    once made the model's metadata, the index, infer and the fleet view 500 for everyone."""
    with run_gateway(broker, names) as gateway:
        view = gateway.gateway.view
        honest = await SimNode.start(recorder_factory, broker, names, "honest", spare=100.0)
        await until(offering(gateway, "honest"), what="honest offering")
        stranger = await recorder_factory(
            broker, Names(names.root, names.site, "evil"), f"{names.root}/{names.site}/evil/cmd/#"
        )
        base = f"{names.root}/{names.site}/evil"
        model = {"sha256": SHA, "inputs": [{"name": "x", **SPEC, "doc": "@deep"}], "profile": "@deep"}
        key = signing.public_key_text(identity.generate())
        birth = {"session": 1, "seq": 0, "models": {MODEL: model}, "public_key": key, "hardware": "@deep"}
        stranger.publish(f"{base}/birth", deep(birth), retain=True)
        offer = {"spare_ips_at_slo": 0.0, "accepts_pool_jobs": False, "queue_depth": "@deep"}
        report = {"session": 1, "seq": 1, "valid_for_s": 600, "models": {MODEL: offer}}
        stranger.publish(f"{base}/capacity", deep(report), retain=True)
        stranger.publish(f"{base}/state", {"session": 1, "seq": 2, "state": "online"}, retain=True)
        await until(
            lambda: (found := view.get(names.site, "evil")) and found.state == "online" and found.is_trusted,
            what="evil online, its key pinned",
        )
        evil = view.get(names.site, "evil")
        assert evil is not None and evil.model_birth(MODEL) == {
            "sha256": SHA,
            "inputs": [{"name": "x", **SPEC}],
        }
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            metadata = await http.get(f"/v2/models/{MODEL}")
            assert metadata.status_code == 200, metadata.text
            assert metadata.json()["inputs"] == [{"name": "x", **SPEC}]
            index = await http.post("/v2/repository/index")
            assert index.status_code == 200 and [entry["name"] for entry in index.json()] == [MODEL]
            fleet = await http.get("/v2/pool/nodes")
            assert fleet.status_code == 200 and len(fleet.json()["nodes"]) == 2
            bought = await buy_from(honest, http)
        assert bought.status_code == 200, bought.text


@pytest.mark.asyncio
async def test_the_broker_keeps_packets_larger_than_max_packet_bytes_from_the_gateway(
    broker: Broker, names: Names, recorder_factory: Any
) -> None:
    """The gateway's CONNECT carries MQTT 5 Maximum Packet Size: a retained birth padded past it is never
    sent to it (re-read at every reconnect it would be), while answers below it still come."""
    with run_gateway(broker, names, max_packet_bytes=128 * 1024) as gateway:
        view = gateway.gateway.view
        honest = await SimNode.start(recorder_factory, broker, names, "honest", spare=100.0)
        await until(offering(gateway, "honest"), what="honest offering")
        stranger = await recorder_factory(
            broker, Names(names.root, names.site, "fat"), f"{names.root}/{names.site}/fat/cmd/#"
        )
        base = f"{names.root}/{names.site}/fat"
        padded = {"session": 1, "seq": 0, "models": {}, "pad": "x" * (200 * 1024)}  # under intake's bound
        stranger.publish(f"{base}/birth", padded, retain=True)
        stranger.publish(f"{base}/state", {"session": 1, "seq": 1, "state": "online"}, retain=True)
        await until(lambda: view.get(names.site, "fat") is not None, what="the state behind the birth")
        fat = view.get(names.site, "fat")
        assert fat is not None and fat.birth is None and "birth" not in fat.seqs
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            bought = await buy_from(honest, http)
        assert bought.status_code == 200, bought.text


@pytest.mark.asyncio
async def test_the_gateway_holds_at_most_max_nodes(
    broker: Broker, names: Names, recorder_factory: Any
) -> None:
    with run_gateway(broker, names, max_nodes=2, forget_after_s=600) as gateway:
        view = gateway.gateway.view
        assert (view.max_nodes, view.forget_after_s) == (2, 600.0)
        for name in ("a", "b"):
            await SimNode.start(recorder_factory, broker, names, name, spare=10.0)
            await until(offering(gateway, name), what=f"{name} offering")
        late = await recorder_factory(
            broker, Names(names.root, names.site, "c"), f"{names.root}/{names.site}/c/cmd/#"
        )
        announce(late, f"{names.root}/{names.site}/c", sha256=SHA, spare=10.0)
        await until(lambda: view.rejected["node_limit"] == 3, what="c's three messages")
        assert [node["node"] for node in gateway.nodes()["nodes"]] == ["a", "b"]
        # a node already known is still heard
        late.publish(f"{names.root}/{names.site}/a/state", {"session": 7, "seq": 9, "state": "draining"})
        await until(lambda: gateway.node("a")["state"] == "draining", what="a draining")
