"""Key pinning on real parts: a node that comes back with a new device key gets nothing until an
operator runs `appliance platform nodes trust`, which the running gateway then follows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from gateway_harness import request_body, run_gateway, until
from pool_brokers import Broker
from pool_process import READY, node_environment, node_process
from pool_recorder import Names, pool_section

from appliance.pool import identity

INFER = "/v2/models/batchable/infer"


def appliance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=120, check=False
    )


def node(gateway: Any) -> dict[str, Any]:
    return gateway.node("node-0") or {"models": {}}


@pytest.mark.asyncio
async def test_a_changed_key_is_refused_until_an_operator_trusts_it(
    tmp_path: Path, pool_repository: Path, broker: Broker, names: Names
) -> None:
    env = node_environment(tmp_path / "node-0", pool_section(broker, Names(names.root, names.site, "node-0")))
    key_file = tmp_path / "node-0" / "state" / identity.STATE_FILE
    _, body, headers = request_body()
    with run_gateway(broker, names, ledger={"refresh_s": 0.2}) as gateway:
        ledger = str(gateway.gateway.settings.state_dir / "ledger.sqlite3")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            with node_process(pool_repository, env) as first:
                first.wait_for(READY, 60)
                await until(lambda: node(gateway)["models"].get("batchable", {}).get("is_offer_usable"))
                assert (await http.post(INFER, content=body, headers=headers)).status_code == 200
            pinned = node(gateway)["public_key"]
            key_file.unlink()  # the box is re-imaged: it makes a new key at its next start
            with node_process(pool_repository, env) as second:
                second.wait_for(READY, 60)
                reason = await until(lambda: node(gateway).get("quarantine"), what="the new key refused")
                assert "its device key changed to ed25519:" in reason
                assert node(gateway)["public_key"] != pinned
                refused = await http.post(INFER, content=body, headers=headers)
                assert refused.status_code == 503  # no other node: nothing is sent to an unverifiable one
                listed = appliance("platform", "nodes", "list", "--ledger", ledger, "--json")
                assert listed.returncode == 0, listed.stderr
                [record] = orjson.loads(listed.stdout)["nodes"]
                assert (record["public_key"], record["quarantine_kind"]) == (pinned, "key")
                assert record["offered_key"] == node(gateway)["public_key"]
                trusted = appliance("platform", "nodes", "trust", "node-0", "--ledger", ledger)
                assert trusted.returncode == 0, trusted.stderr
                assert (
                    f"{names.site}/node-0: key {record['offered_key']} trusted (was {pinned})"
                    in trusted.stdout
                )
                await until(lambda: node(gateway)["models"].get("batchable", {}).get("is_offer_usable"))
                assert node(gateway)["quarantine"] is None
                assert (await http.post(INFER, content=body, headers=headers)).status_code == 200
                again = appliance("platform", "nodes", "trust", "node-0", "--ledger", ledger)
                assert again.returncode == 2 and "offers no new key; it is pinned to" in again.stderr
