"""SIGKILL of a gateway process mid-run, on SQLite and PostgreSQL: every answer a buyer got has its one
billed receipt, no receipt is partial or doubled, and a new gateway carries on with the same ledger."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import httpx
import orjson
import pytest
from gateway_harness import request_body, run_nodes, until
from ledger_databases import KINDS, ledger_url
from pool_brokers import Broker
from pool_recorder import Names
from sqlalchemy import select
from subprocesses import appliance, environment

from appliance.platform.ledger import Ledger
from appliance.platform.receipts import from_row, is_signed_by
from appliance.platform.schema import gateways, receipts
from appliance.pool import signing

READY = re.compile(r"gateway \S+ ready on (http://[\d.]+:\d+)")
INFER = "/v2/models/batchable/infer"
ANSWERS_BEFORE_KILL = 150


def gateway_env(tmp_path: Path, broker: Broker, names: Names) -> dict[str, str]:
    return environment(
        tmp_path,
        gateway__broker=broker.url,
        gateway__topic_root=names.root,
        gateway__site=names.site,
        gateway__gateway_id="gw-crash",
        gateway__state_dir=str(tmp_path / "gateway"),
        gateway__port="0",
        canary__second_opinion_probability="0.3",  # checks in flight too when it dies
    )


@contextlib.contextmanager
def writes_held(kind: str, url: str) -> Iterator[None]:
    """Hold the ledger's receipts table from another connection: the gateway's commits wait behind it."""
    if kind == "sqlite":
        with contextlib.closing(sqlite3.connect(url, isolation_level=None)) as connection:
            connection.execute("BEGIN IMMEDIATE")
            yield
            connection.execute("ROLLBACK")
        return
    import psycopg

    plain, _, options = url.partition("?options=")
    with psycopg.connect(plain, options=unquote(options)) as connection:
        connection.execute("LOCK TABLE receipts IN SHARE MODE")  # INSERT waits for it
        yield
        connection.rollback()


def offered(url: str) -> bool:
    """The gateway has heard a node offer `batchable` (a new one reads the retained offers first)."""
    nodes = httpx.get(f"{url}/v2/pool/nodes", timeout=10).json()["nodes"]
    return any(node["models"].get("batchable", {}).get("is_offer_usable") for node in nodes)


def commits_waiting(url: str) -> float:
    """How many receipts the gateway is waiting to commit (its /metrics)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("appliance_gateway_ledger_commits_waiting "):
            return float(line.split()[1])
    raise AssertionError("no appliance_gateway_ledger_commits_waiting in /metrics")


async def load(url: str, answered: list[str], enough: asyncio.Event) -> None:
    """One buyer, closed loop, until the gateway is gone; the job id of every 200 it got."""
    _, body, headers = request_body(2)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while True:
            try:
                response = await http.post(INFER, content=body, headers=headers)
            except httpx.HTTPError:
                return
            if response.status_code == 200:
                answered.append(response.json()["parameters"]["pool_job_id"])
                if len(answered) >= ANSWERS_BEFORE_KILL:
                    enough.set()


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", KINDS)
async def test_sigkill_mid_run_leaves_the_ledger_whole_and_every_answer_receipted(
    tmp_path: Path, pool_repository: Path, broker: Broker, names: Names, kind: str
) -> None:
    env = gateway_env(tmp_path, broker, names)
    args = ["platform", "gateway", "--log-level", "INFO"]
    with ledger_url(kind, tmp_path) as url, run_nodes(tmp_path, pool_repository, broker, names, 2):
        answered: list[str] = []
        with appliance([*args, "--ledger", url], tmp_path, env) as gateway:
            base = gateway.wait_for(READY, 60).group(1)
            enough = asyncio.Event()
            buyers = [asyncio.create_task(load(base, answered, enough)) for _ in range(12)]
            async with asyncio.timeout(300):
                await enough.wait()
            # Kill it while answers it has are waiting for their receipts' commit: none may have been
            # given out (if receipts were committed after answering, these would be lost).
            with writes_held(kind, url):
                await until(lambda: commits_waiting(base) >= 12, what="every buyer's answer held")
                gateway.popen.send_signal(signal.SIGKILL)
                assert gateway.popen.wait(30) == -signal.SIGKILL
            await asyncio.gather(*buyers)
        ledger = Ledger.open(url, is_writer=False)
        try:
            with ledger.engine.connect() as connection:
                rows = [dict(r._mapping) for r in connection.execute(select(receipts))]
                keys = connection.execute(select(gateways.c.gateway, gateways.c.public_key)).all()
        finally:
            ledger.close()
        billed = [row["job"] for row in rows if row["billed"]]
        assert len(billed) == len(set(billed)), "a job billed twice"
        missing = set(answered) - set(billed)
        assert not missing, f"{len(missing)} answers the buyers got have no receipt"
        [(gateway_id, text)] = keys  # one gateway, one key
        key = signing.parse_public_key(text)
        assert gateway_id == "gw-crash"
        assert all(is_signed_by(from_row(row), key) for row in rows), "a receipt that is not whole"
        assert all(row["node_signature"] and row["output_sha256"] for row in rows if row["billed"])
        if kind == "sqlite":
            with contextlib.closing(sqlite3.connect(url)) as connection:
                assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # A new gateway on the same ledger and state (the same key) carries on.
        with appliance([*args, "--ledger", url], tmp_path, env) as again:
            base = again.wait_for(READY, 60).group(1)
            await until(lambda: offered(base), what="the new gateway hearing the nodes' offers")
            _, body, headers = request_body(2)
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                for _ in range(3):
                    response = await http.post(INFER, content=body, headers=headers)
                    assert response.status_code == 200, response.text
            again.popen.send_signal(signal.SIGTERM)
            assert again.popen.wait(60) == 0
        report = subprocess.run(
            [sys.executable, "-m", "appliance", "platform", "ledger", "--ledger", url, "--json"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        figures = orjson.loads(report.stdout)["rows"]
        assert sum(row["jobs"] for row in figures) == len(billed) + 3
        assert {row["node"] for row in figures} <= {f"{names.site}/node-0", f"{names.site}/node-1"}
        csv = subprocess.run(
            [sys.executable, "-m", "appliance", "platform", "ledger", "--ledger", url, "--csv",
             "--since", "2000-01-01T00:00:00Z", "--until", "2000-01-02"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        assert csv.stdout.splitlines() == [
            "node,model,jobs,rows,compute_s,slo_met_pct,canaries_passed,canaries_failed,flagged_jobs,unbilled_answers"
        ]
