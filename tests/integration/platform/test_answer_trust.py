"""Who an answer can be held against, on real parts: mosquitto with the README's ACL, a gateway and its
ledger (SQLite, or PostgreSQL where one answers), and simulated nodes that sign with their own keys.

A node can answer only the attempts it was sent (each CorrelationData holds a random nonce), an answer
that cannot be verified costs nobody, and a node that signs figures no honest node can is refused (its
answers never billed, never in the way of anyone else's receipts) and quarantined.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from acl_pool import login
from checks_fixtures import DISHONEST, INT8, NAME, catalogue, repository, request
from gateway_harness import run_gateway, run_nodes, until
from ledger_databases import ledger_url
from pool_brokers import Broker
from pool_recorder import Names
from sim_nodes import INFER, MODEL, SimNode, buyer_body, refusal
from sqlalchemy import select

from appliance.platform import receipts as kinds
from appliance.platform.ledger import Ledger
from appliance.platform.report import summary
from appliance.platform.schema import receipts


def offering(gateway: Any, name: str) -> Callable[[], Any]:
    return lambda: (gateway.node(name) or {}).get("models", {}).get(MODEL, {}).get("is_offer_usable")


def ledger_of(gateway: Any) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every receipt row, and the billing report by node name."""
    url = gateway.gateway.platform.ledger.url or str(gateway.gateway.settings.state_dir / "ledger.sqlite3")
    ledger = Ledger.open(url, is_writer=False)
    try:
        with ledger.engine.connect() as connection:
            rows = [dict(row._mapping) for row in connection.execute(select(receipts))]
        return rows, {row["node"].rpartition("/")[2]: row for row in summary(ledger)}
    finally:
        ledger.close()


async def buy(http: httpx.AsyncClient, body: bytes, headers: dict[str, str]) -> httpx.Response:
    """One job; a 503 for want of credit (two shared cores, nodes at idle priority) is tried again after
    its Retry-After, as a buyer would. A job both its nodes lost is a 503 too, and fails the test."""
    for _ in range(30):
        answer = await http.post(f"/v2/models/{NAME}/infer", content=body, headers=headers)
        if answer.status_code != 503 or "spare capacity" not in answer.text:
            break
        await asyncio.sleep(float(answer.headers.get("retry-after", "1")))
    return answer


@pytest.mark.asyncio
async def test_a_node_cannot_get_another_quarantined_by_answering_its_attempt(
    acl_broker: Broker, names: Names, recorder_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evil (the larger offer: sent the job first) refuses it, which moves the job to honest, then
    publishes junk 200s under the CorrelationData it guesses honest's attempt has. The broker lets it
    (every node may write under _reply/); the gateway holds none of it against honest."""
    with run_gateway(acl_broker, names, **login("platform")) as gateway:
        honest = await SimNode.start(
            recorder_factory, acl_broker, names, "honest", spare=100.0, **login("honest")
        )
        evil = await SimNode.start(recorder_factory, acl_broker, names, "evil", spare=1e6, **login("evil"))
        for name in ("honest", "evil"):
            await until(offering(gateway, name), what=f"{name} offering")
        arrived: list[bytes] = []  # every answer's CorrelationData, once the gateway has dealt with it
        dispatcher = gateway.gateway.dispatcher
        answered = dispatcher.answered

        def counted(message: Any, received_s: float) -> None:
            answered(message, received_s)
            arrived.append(message.correlation)

        monkeypatch.setattr(dispatcher, "answered", counted)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            buying = asyncio.create_task(http.post(INFER, content=buyer_body(1)))
            first = await evil.job()
            evil.reply(first, refusal(0.01), 503)
            second = await honest.job()
            job_id, _, rest = (first.correlation or b"").decode().partition("/")
            own_nonce = rest.partition("/")[2]
            guesses = [f"{job_id}/1".encode(), f"{job_id}/1/{own_nonce}".encode()]
            for guess in guesses:
                evil.reply(first, b'{"outputs": []}', 200, correlation=guess)
            await until(lambda: all(guess in arrived for guess in guesses), what="the forged answers")
            honest.answer(second)
            bought = await buying
        assert bought.status_code == 200, bought.text
        assert bought.json()["parameters"]["pool_node"] == f"{names.site}/honest"
        assert gateway.node("honest")["quarantine"] is None
        assert second.correlation not in guesses and dispatcher.late_answers >= len(guesses)
        rows, figures = ledger_of(gateway)
    assert [(r["node"], r["verdict"], r["billed"], r["flagged"]) for r in rows] == [
        (f"{names.site}/honest", kinds.ACCEPTED, True, False)
    ]
    assert figures["honest"]["jobs"] == 1 and figures["honest"]["flagged_jobs"] == 0


@pytest.mark.asyncio
async def test_an_answer_that_cannot_be_verified_is_noise_and_its_attempt_waits_for_the_real_one(
    acl_broker: Broker, names: Names, recorder_factory: Any
) -> None:
    """Junk under an attempt's own CorrelationData (as if its nonce had leaked) is counted, not
    recorded, held against nobody; the node's own signed answer, after it, is the buyer's."""
    with run_gateway(acl_broker, names, **login("platform")) as gateway:
        honest = await SimNode.start(
            recorder_factory, acl_broker, names, "honest", spare=100.0, **login("honest")
        )
        await until(offering(gateway, "honest"), what="honest offering")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            buying = asyncio.create_task(http.post(INFER, content=buyer_body(2)))
            job = await honest.job()
            for junk in (b"[]", b'{"outputs": []}', b"\xff"):
                honest.reply(job, junk, 200)
            await until(lambda: gateway.gateway.dispatcher.unverified_answers == 3, what="noise counted")
            honest.answer(job)
            bought = await buying
            metrics = (await http.get("/metrics")).text
        assert bought.status_code == 200 and gateway.node("honest")["quarantine"] is None
        assert "appliance_gateway_unverified_answers_total 3.0" in metrics
        assert f'appliance_gateway_jobs_total{{model="{MODEL}",outcome="unverified_answer"}} 3.0' in metrics
        rows, _ = ledger_of(gateway)
    assert [(r["verdict"], r["billed"]) for r in rows] == [(kinds.ACCEPTED, True)]


IMPOSSIBLE = [
    pytest.param("sqlite", {"session": 2**63}, "session 9223372036854775808 is outside", id="sqlite-session"),
    pytest.param("postgresql", {"session": 2**63}, "session 9223372036854775808", id="postgresql-session"),
    pytest.param("sqlite", {"queue_ms": math.nan}, "queue_ms nan is not a number of ms", id="sqlite-nan"),
    pytest.param(
        "sqlite", {"queue_ms": -1e12, "compute_ms": 1e12}, "queue_ms -1e+12 is not", id="sqlite-negative"
    ),
    pytest.param("sqlite", {"compute_ms": 60_000.0}, "longer than the", id="sqlite-past-latency"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("kind", "claims", "why"), IMPOSSIBLE)
async def test_a_node_signing_impossible_figures_is_refused_and_costs_nobody_else(
    tmp_path: Path,
    acl_broker: Broker,
    names: Names,
    recorder_factory: Any,
    kind: str,
    claims: dict[str, Any],
    why: str,
) -> None:
    """evil signs, with its own key, figures no receipt may hold or the gateway never saw: a session
    past 2^63 - 1, a NaN, a negative queue, more compute than the job was away. Its answers are refused
    (recorded unbilled, quoting what it signed), it is quarantined, and every buyer, served by honest,
    has its answer and its receipt: many jobs in flight at once, so receipts share transactions."""
    with ledger_url(kind, tmp_path) as url:
        gateway_run = run_gateway(
            acl_broker, names, ledger={"url": url}, default_rate_per_s=1000.0, **login("platform")
        )
        with gateway_run as gateway:
            honest = await SimNode.start(
                recorder_factory, acl_broker, names, "honest", spare=1000.0, **login("honest")
            )
            evil = await SimNode.start(
                recorder_factory, acl_broker, names, "evil", spare=1e6, **login("evil")
            )
            for name in ("honest", "evil"):
                await until(offering(gateway, name), what=f"{name} offering")
            answering = [asyncio.create_task(honest.serve()), asyncio.create_task(evil.serve(**claims))]
            try:
                async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
                    bought = await asyncio.gather(
                        *(http.post(INFER, content=buyer_body(i)) for i in range(40))
                    )
            finally:
                for task in answering:
                    task.cancel()
            await until(lambda: not gateway.gateway.metering._pending, what="refusals recorded")
            reason = gateway.node("evil")["quarantine"]
            rows, figures = ledger_of(gateway)
    assert [b.status_code for b in bought] == [200] * 40, {b.text for b in bought if b.status_code != 200}
    assert {b.json()["parameters"]["pool_node"] for b in bought} == {f"{names.site}/honest"}
    assert reason is not None and why in reason
    billed = [r for r in rows if r["billed"]]
    assert len(billed) == 40 and {r["node"] for r in billed} == {f"{names.site}/honest"}
    refused = [r for r in rows if r["node"].endswith("/evil")]
    assert refused and all(r["verdict"] == kinds.REFUSED and not r["billed"] for r in refused)
    assert all(why in r["detail"] and '"node":"evil"' in r["detail"] for r in refused)
    assert "evil" not in figures or figures["evil"]["jobs"] == figures["evil"]["compute_s"] == 0
    assert figures["honest"]["jobs"] == 40 and figures["honest"]["compute_s"] <= 40 * 0.01 / 1e3 + 1e-9


@pytest.mark.asyncio
async def test_a_real_node_signing_with_another_key_is_noise_and_its_jobs_move_on_after_the_timeout(
    tmp_path: Path, broker: Broker, names: Names
) -> None:
    """`appliance serve` nodes, one signing with a key its birth does not announce: whoever sent such
    answers, they prove nothing about the node, so it is not quarantined and nothing is recorded of
    them; its jobs time out and go to the other node, and buyers get every answer from that one."""
    repo = repository(tmp_path, "int8")
    tamper = {"PYTHONPATH": str(DISHONEST), "TAMPER_SIGNATURE": "1"}
    rng = np.random.default_rng(7)
    with (
        run_nodes(tmp_path, repo, broker, names, 2, environments={"node-1": tamper}) as _,
        run_gateway(broker, names, catalogue=catalogue(tmp_path, INT8), job_timeout_s=5.0) as gateway,
    ):
        for name in ("node-0", "node-1"):
            await until(lambda name=name: (gateway.node(name) or {}).get("models", {}).get(NAME, {}).get(
                "is_offer_usable"), what=f"{name} offering")  # fmt: skip
        answers: list[httpx.Response] = []
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            node_1 = gateway.gateway.view.get(names.site, "node-1")
            while not node_1.jobs.get(NAME, {}).get("unverified") and len(answers) < 60:
                answers += await asyncio.gather(*(buy(http, *request(rng)) for _ in range(4)))
            metrics = (await http.get("/metrics")).text
        await until(lambda: not gateway.gateway.metering._pending, what="receipts written")
        tampered = gateway.node("node-1")
        rows, _ = ledger_of(gateway)
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers]
    served = {
        orjson.loads(a.content[: int(a.headers["inference-header-content-length"])])["parameters"][
            "pool_node"
        ]
        for a in answers
    }
    assert served == {f"{names.site}/node-0"} and tampered["quarantine"] is None
    assert gateway.gateway.dispatcher.unverified_answers >= 1
    assert f'appliance_gateway_jobs_total{{model="{NAME}",outcome="unverified_answer"}}' in metrics
    assert all(r["node"].endswith("node-0") for r in rows)  # nothing recorded against node-1
    billed = [r for r in rows if r["billed"]]
    assert len(billed) == len(answers) and any(r["attempt"] >= 1 for r in billed)  # moved on, billed once
