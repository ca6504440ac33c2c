"""The buyer API on real parts: mosquitto, two `appliance serve` nodes and the gateway."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from gateway_harness import request_body, run_gateway, run_nodes, until, watched
from pool_brokers import Broker
from pool_recorder import Names

from appliance.platform.buyers import token_digest
from appliance.pool import identity, signing
from appliance.protocol import codec


def offering(gateway: Any, count: int) -> Any:
    return lambda: (
        len([n for n in gateway.nodes()["nodes"] if n["models"].get("batchable", {}).get("is_offer_usable")])
        >= count
    )


@pytest.mark.asyncio
async def test_buyers_call_the_pool_as_one_kserve_server(
    tmp_path: Path, pool_repository: Path, broker: Broker, names: Names
) -> None:
    buyers = tmp_path / "buyers.toml"
    buyers.write_text(
        f'[buyers.acme]\ntoken_sha256 = "{token_digest("acme-secret")}"\nrate_per_s = 1000\n'
        f'[buyers.tiny]\ntoken_sha256 = "{token_digest("tiny-secret")}"\n'
        "rate_per_s = 1\nmax_body_bytes = 200\n"
        f'[buyers.slim]\ntoken_sha256 = "{token_digest("slim-secret")}"\n'
        "rate_per_s = 1000\nmax_body_bytes = 200\n"
    )
    with (
        run_nodes(tmp_path, pool_repository, broker, names, 2) as _,
        run_gateway(
            broker,
            names,
            token="ops-secret",  # the fleet view's: an operator's token, not a buyer's
            buyers_file=str(buyers),
            operator_token_sha256=[token_digest("ops-secret")],
        ) as gateway,
    ):
        await until(offering(gateway, 2), what="both nodes offering")
        acme = {"Authorization": "Bearer acme-secret"}
        async with httpx.AsyncClient(base_url=gateway.url, headers=acme, timeout=30) as http:
            index = (await http.post("/v2/repository/index")).json()
            (entry,) = index
            assert entry["name"] == "batchable" and entry["state"] == "READY"
            assert entry["parameters"]["pool_spare_ips_at_slo"] > 0
            metadata = (await http.get("/v2/models/batchable")).json()
            assert (
                metadata["inputs"][0]["name"] == "x" and metadata["parameters"]["pool_spare_ips_at_slo"] > 0
            )

            x, body, headers = request_body(3)
            answer = await http.post("/v2/models/batchable/infer", content=body, headers=headers)
            assert answer.status_code == 200, answer.text
            document = answer.json()
            assert document["outputs"][0]["data"] == (x * 2 + 1).ravel().tolist()
            assert document["parameters"]["pool_node"] in {f"{names.site}/node-0", f"{names.site}/node-1"}
            assert len(document["parameters"]["pool_job_id"]) == 32

            x, body, headers = request_body(2, binary=True)
            answer = await http.post("/v2/models/batchable/infer", content=body, headers=headers)
            assert answer.status_code == 200, answer.text
            length = int(answer.headers["inference-header-content-length"])
            outputs = codec.decode_response(answer.content, length)
            np.testing.assert_array_equal(outputs["y"], x * 2 + 1)

            # NaN and infinities cross as Triton's JSON tokens: buyer -> gateway -> node -> gateway -> buyer.
            odd = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": %s}]}' % (
                b"[NaN, Infinity, -Infinity, 1]"
            )
            answer = await http.post("/v2/models/batchable/infer", content=odd)
            assert answer.status_code == 200, answer.text
            assert b'"data":[NaN,Infinity,-Infinity,3.0]' in answer.content
            assert json.loads(answer.content)["parameters"]["pool_node"].startswith(names.site)

            # Bad input never reaches a node: precise 4xx from the gateway itself.
            bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [0.0] * 5}]}
            refused = await http.post("/v2/models/batchable/infer", json=bad)
            assert refused.status_code == 400 and "model expects [N, 4]" in refused.json()["error"]
            assert (await http.post("/v2/models/batchable/infer", content=b"{nope")).status_code == 400
            missing = await http.post("/v2/models/nosuch/infer", content=body, headers=headers)
            assert missing.status_code == 404 and "not served by the pool" in missing.json()["error"]

            fleet = gateway.nodes()
            sent = sum(n["models"]["batchable"]["jobs_sent"] for n in fleet["nodes"])
            answered = sum(n["models"]["batchable"]["jobs_answered"] for n in fleet["nodes"])
            assert (sent, answered) == (3, 3)  # the refused requests cost the nodes nothing
            assert {n["state"] for n in fleet["nodes"]} == {"online"}
            assert all(n["report_age_s"] is not None and n["session"] >= 1 for n in fleet["nodes"])
            model = fleet["nodes"][0]["models"]["batchable"]
            assert len(model["sha256"]) == 64 and model["precision"] == "fp32" and model["provider"] == "cpu"

        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            assert (await http.post("/v2/repository/index")).status_code == 401
            wrong = await http.post("/v2/models/batchable/infer", headers={"Authorization": "Bearer x"})
            assert wrong.status_code == 401
            assert (await http.get("/v2/health/ready")).status_code == 200  # open, as /metrics
            metrics = (await http.get("/metrics")).text
            assert 'appliance_gateway_jobs_total{model="batchable",outcome="answered"} 3.0' in metrics
            assert "appliance_gateway_reports_ingested_total" in metrics

            slim = {"Authorization": "Bearer slim-secret"}

            async def chunks():  # no Content-Length: the limit holds on the bytes received
                for _ in range(3):
                    yield b"x" * 100

            chunked = await http.post("/v2/models/batchable/infer", content=chunks(), headers=slim)
            assert chunked.status_code == 413 and "may send 200 bytes" in chunked.json()["error"]
            assert chunked.headers.get("connection") != "close"  # the rest read and dropped: stays open
            got = await http.get("/v2/models/batchable/infer", headers=slim)
            assert got.status_code == 405 and "use POST" in got.json()["error"]

            tiny = {"Authorization": "Bearer tiny-secret"}
            big = await http.post("/v2/models/batchable/infer", content=b"x" * 201, headers=tiny)
            assert big.status_code == 413 and "may send 200 bytes" in big.json()["error"]
            statuses = [
                (await http.post("/v2/models/batchable/infer", json=bad, headers=tiny)).status_code
                for _ in range(3)
            ]
            assert statuses[-1] == 429  # one job per second: the quota answers before anything else
            over = await http.post("/v2/models/batchable/infer", json=bad, headers=tiny)
            assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1

        _, table = await watched(gateway.url, "ops-secret")
        assert f"{names.site}/node-0" in table and f"{names.site}/node-1" in table and "online" in table


@pytest.mark.asyncio
async def test_a_gateway_that_has_just_connected_says_try_again_for_a_model_it_has_not_heard_of(
    tmp_path: Path, broker: Broker, names: Names
) -> None:
    # No node: whatever the buyer names has not been heard of. Within the learning window after the
    # connection (the pool's retained births may still be arriving), that is 503, not 404...
    _, body, headers = request_body(1)
    with run_gateway(broker, names, learning_s=3600.0) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            await until(lambda: gateway.gateway.link.connected.is_set(), what="the gateway connected")
            early = await http.post("/v2/models/batchable/infer", content=body, headers=headers)
            assert early.status_code == 503 and "not known yet" in early.json()["error"]
            assert int(early.headers["retry-after"]) >= 1
            assert (await http.get("/v2/models/batchable")).status_code == 503
    # ...but a catalogue says what is served: a name outside it is 404 whenever asked.
    listed = tmp_path / "catalogue.toml"
    listed.write_text(f'[models.other]\nsha256 = ["{"0" * 64}"]\n')
    with run_gateway(broker, names, learning_s=3600.0, catalogue=str(listed)) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            await until(lambda: gateway.gateway.link.connected.is_set(), what="the gateway connected")
            unknown = await http.post("/v2/models/batchable/infer", content=body, headers=headers)
            assert unknown.status_code == 404 and "not served by the pool" in unknown.json()["error"]


@pytest.mark.asyncio
async def test_a_gateway_on_a_tls_broker_with_passwords_serves_buyers(
    tmp_path: Path, pool_repository: Path, broker_factory: Any, names: Names
) -> None:
    """mqtts:// with a CA file and a user on both sides; many answers at once, so that TLS records carry
    several of them (the gateway's loop must read what its TLS socket has already decrypted)."""
    broker: Broker = broker_factory(tls=True, users={"node": "n0de-secret", "platform": "pl4tform"})
    assert broker.tls is not None
    login = {"*": {"username": "node", "password": "n0de-secret"}}
    with (
        run_nodes(tmp_path, pool_repository, broker, names, 2, **login) as _,
        run_gateway(
            broker, names, username="platform", password="pl4tform", ca_file=str(broker.tls.ca)
        ) as gateway,
    ):
        assert gateway.gateway.link.broker.is_tls
        await until(offering(gateway, 2), what="both nodes offering over TLS")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            jobs = [request_body(1 + index % 4) for index in range(32)]
            answers = await asyncio.gather(
                *(
                    http.post("/v2/models/batchable/infer", content=body, headers=headers)
                    for _, body, headers in jobs
                )
            )
        for (x, _, _), answer in zip(jobs, answers, strict=True):
            assert answer.status_code == 200, answer.text
            assert answer.json()["outputs"][0]["data"] == (x * 2 + 1).ravel().tolist()


@pytest.mark.asyncio
async def test_a_strangers_births_and_reports_break_nothing_for_buyers(
    tmp_path: Path, pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    """One node's birth or capacity report of the wrong shape, or a birth describing the model wrongly,
    must cost the buyers of the honest nodes nothing: no 500, no 400, no other signature."""
    sha256 = hashlib.sha256((pool_repository / "batchable" / "1" / "model.onnx").read_bytes()).hexdigest()
    # The stranger listens only to its commands: its own messages would fail the recorder's schemas.
    stranger = await recorder_factory(
        broker, Names(names.root, names.site, "evil"), f"{names.root}/{names.site}/evil/cmd/#"
    )
    seq = itertools.count()
    key = signing.public_key_text(identity.generate())
    idle = {"spare_ips_at_slo": 0.0, "accepts_pool_jobs": False}  # it reports the model, takes no jobs
    wrong_inputs = [{"name": "x", "datatype": "INT8", "shape": [1]}]
    with run_gateway(broker, names) as gateway:
        view = gateway.gateway.view

        async def publish(kind: str, **fields: Any) -> None:
            """Publish, then a state behind it: once the gateway has that, it has read the first."""
            topic = f"{names.root}/{names.site}/evil"
            stranger.publish(f"{topic}/{kind}", {"session": 1, "seq": next(seq), **fields}, retain=True)
            marker = next(seq)
            stranger.publish(f"{topic}/state", {"session": 1, "seq": marker, "state": "online"}, retain=True)

            def has_read() -> bool:
                found = view.get(names.site, "evil")
                return found is not None and found.seqs.get("state") == marker

            await until(has_read, what=f"the gateway reading {kind} {fields}")

        # Heard of before the honest node, trusted, describing the model otherwise: heard, not believed.
        await publish("capacity", valid_for_s=600, models={"batchable": idle})
        await publish(
            "birth", models={"batchable": {"sha256": sha256, "inputs": wrong_inputs}}, public_key=key
        )
        await until(lambda: view.get(names.site, "evil").is_trusted, what="the stranger's key pinned")
        with run_nodes(tmp_path, pool_repository, broker, names, 1) as _:
            await until(offering(gateway, 1), what="node-0 offering")
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:

                async def described() -> dict[str, Any]:
                    metadata = await http.get("/v2/models/batchable")
                    assert metadata.status_code == 200, metadata.text
                    return {k: v for k, v in metadata.json().items() if k != "parameters"}

                told = await described()
                assert told["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]

                async def buyers_are_served() -> None:
                    x, body, headers = request_body(2)
                    answer = await http.post("/v2/models/batchable/infer", content=body, headers=headers)
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["outputs"][0]["data"] == (x * 2 + 1).ravel().tolist()
                    assert await described() == told
                    index = await http.post("/v2/repository/index")
                    assert index.status_code == 200 and [m["name"] for m in index.json()] == ["batchable"]
                    assert (await http.get("/v2/pool/nodes")).status_code == 200

                await buyers_are_served()
                births = [
                    "zz",
                    {"batchable": "zz"},
                    {"batchable": {"sha256": sha256, "inputs": [{"name": "x"}]}},
                    {
                        "batchable": {
                            "sha256": sha256,
                            "inputs": [{"name": "x", "datatype": "FP32", "shape": "N"}],
                        }
                    },
                ]
                for models in births:
                    await publish("birth", models=models, public_key=key)
                    await buyers_are_served()
                reports: list[Any] = [
                    [1],
                    {"spare_ips_at_slo": "lots", "accepts_pool_jobs": True},
                    {"spare_ips_at_slo": 5.0, "accepts_pool_jobs": True, "slo_p99_ms": "fast"},
                    {"spare_ips_at_slo": 1e300, "accepts_pool_jobs": True, "slo_p99_ms": 1e12},
                ]
                for report in reports:
                    await publish("capacity", valid_for_s=60, models={"batchable": report})
                    await buyers_are_served()
                metrics = (await http.get("/metrics")).text
            assert 'appliance_gateway_reports_rejected_total{kind="birth"} 4.0' in metrics
            assert 'appliance_gateway_reports_rejected_total{kind="capacity"} 4.0' in metrics
            assert gateway.node("evil")["models"] == {}
            assert gateway.node("node-0")["models"]["batchable"]["jobs_sent"] == 9
