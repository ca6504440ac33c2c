"""Canaries, second opinions and quarantine on real parts: mosquitto, `appliance serve` nodes serving the
bundled int8 and fp32 models (and dishonest ones), the gateway and its SQLite ledger."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from checks_fixtures import DISHONEST, FP32, INT8, NAME, catalogue, repository, request, sha256
from gateway_harness import WAIT_S, checks_settled, ledger_rows, run_gateway, run_nodes, until
from pool_brokers import Broker
from pool_recorder import Names, validate

from appliance.platform import receipts as kinds
from appliance.platform.ledger import Ledger
from appliance.platform.receipts import from_row, is_signed_by
from appliance.platform.report import summary
from appliance.pool import signing

INFER = f"/v2/models/{NAME}/infer"


def usable(gateway: Any, name: str) -> Any:
    return lambda: (gateway.node(name) or {}).get("models", {}).get(NAME, {}).get("is_offer_usable")


def quarantined(gateway: Any, name: str) -> Any:
    return lambda: (gateway.node(name) or {}).get("quarantine")


def by_node(gateway: Any) -> dict[str, dict[str, Any]]:
    ledger = Ledger.open(str(gateway.gateway.settings.state_dir / "ledger.sqlite3"), is_writer=False)
    try:
        return {row["node"].rpartition("/")[2]: row for row in summary(ledger)}
    finally:
        ledger.close()


def node_of(response: httpx.Response) -> str:
    """parameters.pool_node of a (binary) answer."""
    length = int(response.headers["inference-header-content-length"])
    return orjson.loads(response.content[:length])["parameters"]["pool_node"]


async def buy(
    http: httpx.AsyncClient, rng: np.random.Generator, count: int, rows: int = 1
) -> list[httpx.Response]:
    """`count` jobs, one after the other; a 503 (the pool is busy with checks on two shared cores) is
    tried again after its Retry-After, as a buyer would."""
    answers = []
    for _ in range(count):
        body, headers = request(rng, rows)
        for _ in range(30):
            answer = await http.post(INFER, content=body, headers=headers)
            if answer.status_code != 503:
                break
            await asyncio.sleep(float(answer.headers.get("retry-after", "1")))
        answers.append(answer)
    return answers


async def checks_done(gateway: Any) -> None:
    await until(
        lambda: not gateway.gateway.checks._tasks and not gateway.gateway.metering._pending, what="checks"
    )


@pytest.mark.asyncio
async def test_honest_int8_and_fp32_nodes_pass_every_check_and_every_record_verifies(
    tmp_path: Path, broker: Broker, names: Names
) -> None:
    repos = {"node-0": repository(tmp_path, "int8"), "node-1": repository(tmp_path, "fp32")}
    rng = np.random.default_rng(2024)
    with (
        run_nodes(tmp_path, repos["node-0"], broker, names, 2, repositories=repos) as _,
        run_gateway(
            broker, names, catalogue=catalogue(tmp_path, INT8, FP32),
            canary={"probability": 1.0, "second_opinion_probability": 1.0},
        ) as gateway,
    ):  # fmt: skip
        for name in repos:
            await until(usable(gateway, name), what=f"{name} offering")
        births = {name: gateway.gateway.view.get(names.site, name).birth for name in repos}
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            for rows in (1, 2, 3):
                answers = await buy(http, rng, 8, rows)
                assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
                await checks_done(gateway)
        fleet = {name: gateway.node(name) for name in repos}
        rows = ledger_rows(gateway)
    assert all(node["quarantine"] is None for node in fleet.values()), fleet
    verdicts = {(r["kind"], r["verdict"]) for r in rows}
    assert (kinds.CANARY, kinds.CANARY_PASSED) in verdicts and (
        kinds.SECOND_OPINION,
        kinds.AGREED,
    ) in verdicts
    # A slow honest node's answer may come after its job was re-sent: recorded late, never billed.
    honest = {(kinds.BUYER, kinds.ACCEPTED), (kinds.BUYER, kinds.LATE), (kinds.CANARY, kinds.CANARY_PASSED)}
    assert verdicts <= honest | {(kinds.SECOND_OPINION, kinds.AGREED)}, verdicts
    assert sum(r["billed"] for r in rows) == 24 and not any(
        r["billed"] for r in rows if r["kind"] != kinds.BUYER
    )
    # Every record: the node's signature over what it did, the gateway's over what it recorded.
    gateway_key = signing.parse_public_key(signing.public_key_text(gateway.gateway.key))
    for row in rows:
        receipt = from_row(row)
        assert is_signed_by(receipt, gateway_key)
        node = receipt.node.rpartition("/")[2]
        statement = signing.Statement(
            receipt.job_id, receipt.model_sha256, receipt.input_sha256, receipt.output_sha256,
            receipt.queue_ms, receipt.compute_ms, node, receipt.session,
        )  # fmt: skip
        assert signing.verify(
            signing.parse_public_key(births[node]["public_key"]), statement, receipt.node_signature
        )
        assert receipt.model_sha256 == sha256(INT8 if node == "node-0" else FP32)


@pytest.mark.asyncio
async def test_a_node_serving_another_file_is_quarantined_and_its_receipts_flagged(
    tmp_path: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    # node-1 serves a cheat under the catalogue's name and claims the catalogue's file; node-2 honestly
    # serves a file the catalogue does not list.
    repos = {
        "node-0": repository(tmp_path, "int8"),
        "node-1": repository(tmp_path, "cheat"),
        "node-2": repository(tmp_path, "fp32"),
    }
    liar = {"PYTHONPATH": str(DISHONEST), "LIE_SHA256": sha256(INT8)}
    events = await recorder_factory(broker, names, f"{names.root}/_gateways/+/evt/#")
    rng = np.random.default_rng(2025)
    nodes = run_nodes(
        tmp_path, repos["node-0"], broker, names, 3, repositories=repos, environments={"node-1": liar}
    )
    checked = run_gateway(
        broker, names, catalogue=catalogue(tmp_path, INT8), canary={"recheck_interval_s": 0.5}
    )
    with nodes as _, checked as gateway:
        for name in ("node-0", "node-1"):
            await until(usable(gateway, name), what=f"{name} offering")
        reason = await until(quarantined(gateway, "node-2"), what="node-2 quarantined")
        assert f"from file {sha256(FP32)}, which the catalogue does not list" in reason
        node_1 = gateway.gateway.view.get(names.site, "node-1")
        assert node_1.model_birth(NAME)["sha256"] == sha256(INT8)  # the lie the birth tells
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            before = await buy(http, rng, 16)
            served = {node_of(a) for a in before}
            assert (
                f"{names.site}/node-1" in served
            )  # the cheat earns, for now (it is fast: it computes nothing)
            loop = gateway.gateway.link._loop
            verdict = None
            while verdict is None:  # None: not taken (on a busy box its offer can lapse): offer, then again
                await until(usable(gateway, "node-1"), what="node-1 offering again")
                canary = gateway.gateway.checks.canary(NAME, 1, "anonymous", target=node_1)
                verdict = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(canary, loop))
            assert verdict == kinds.CANARY_FAILED
            reason = await until(quarantined(gateway, "node-1"), what="node-1 quarantined")
            assert reason.startswith(f"canary failed on model {NAME!r}: output 'defect_prob'")
            after = await buy(http, rng, 8)
            assert {node_of(a) for a in after} == {f"{names.site}/node-0"}
            # It stays quarantined: every recheck canary fails again.
            await until(lambda: by_node(gateway)["node-1"]["canaries_failed"] >= 3, what="rechecks failing")
            assert gateway.node("node-1")["quarantine"] is not None
            await checks_settled(gateway)
        # Published once the ledger has flagged its receipts (trust.py): the figures below count them.
        seen = await events.expect(
            lambda m: (
                orjson.loads(m.payload)["event"] == "receipts_flagged"
                and orjson.loads(m.payload)["node"].endswith("node-1")
            ),
            timeout_s=WAIT_S,
        )
        figures = by_node(gateway)
    cheated = sum(1 for a in before if node_of(a).endswith("node-1"))
    assert figures["node-1"]["jobs"] == cheated and figures["node-1"]["flagged_jobs"] == cheated
    assert figures["node-0"]["flagged_jobs"] == 0 and figures["node-0"]["jobs"] == 24 - cheated
    assert orjson.loads(seen.payload)["flagged"] >= cheated  # its jobs, and the canary it failed
    for message in events.messages:
        validate("gateway_evt", orjson.loads(message.payload))
    quarantines = {
        orjson.loads(m.payload)["node"]
        for m in events.messages
        if orjson.loads(m.payload)["event"] == "node_quarantined"
    }
    assert quarantines == {f"{names.site}/node-1", f"{names.site}/node-2"}


@pytest.mark.asyncio
async def test_a_quarantined_node_is_freed_by_the_first_canary_it_passes(
    tmp_path: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    repo = repository(tmp_path, "int8")
    events = await recorder_factory(broker, names, f"{names.root}/_gateways/+/evt/#")
    rng = np.random.default_rng(11)
    checked = run_gateway(
        broker, names, catalogue=catalogue(tmp_path, INT8), canary={"recheck_interval_s": 0.5}
    )
    with run_nodes(tmp_path, repo, broker, names, 1) as _, checked as gateway:
        await until(usable(gateway, "node-0"), what="node-0 offering")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            assert [a.status_code for a in await buy(http, rng, 3)] == [200] * 3
            node = gateway.gateway.view.get(names.site, "node-0")
            loop = gateway.gateway.link._loop
            loop.call_soon_threadsafe(gateway.gateway.trust.fail, node, "an operator's test of quarantine")
            assert await until(quarantined(gateway, "node-0")) == "an operator's test of quarantine"
            refused = await http.post(INFER, content=request(rng)[0], headers=request(rng)[1])
            assert refused.status_code == 503  # no buyer job goes to it
            await until(lambda: not quarantined(gateway, "node-0")(), what="freed by a passing canary")
            assert [a.status_code for a in await buy(http, rng, 2)] == [200] * 2
            await checks_done(gateway)
        figures = by_node(gateway)["node-0"]
        released = await events.expect(lambda m: orjson.loads(m.payload)["event"] == "node_released")
    assert figures["canaries_passed"] >= 1 and figures["canaries_failed"] == 0
    assert figures["flagged_jobs"] == 3  # the jobs before the (pretended) failure stay flagged for review
    assert orjson.loads(released.payload)["node"] == f"{names.site}/node-0"
