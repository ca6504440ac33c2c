"""On a real gateway and mosquitto, with a node played over MQTT: what a buyer's request may hold while
its body comes (places, bytes, time), who reads the fleet view, an answer whose outputs repeat a name,
and golden samples every box holds."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from checks_fixtures import INT8, NAME, SAMPLES, sha256
from gateway_harness import RunningGateway, run_gateway, until, watched
from pool_brokers import Broker
from pool_recorder import Names, Recorder
from tests_support import buyers_file

from appliance.platform.buyers import token_digest
from appliance.pool import identity, signing
from appliance.protocol import codec

MODEL, SHA = "sim", "5" * 64
TENSOR = {"datatype": "FP32", "shape": [-1, 4]}
NODE = "played"
BAD = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [0, 0, 0, 0, 0]}]}'


async def play_node(recorder_factory: Any, broker: Broker, names: Names, gateway: RunningGateway) -> Any:
    """A node serving MQTT `sim` (x -> y, [N, 4] FP32) as births and reports say, answering nothing
    itself; (its recorder, its key) once the gateway offers it to buyers."""
    base = f"{names.root}/{names.site}/{NODE}"
    recorder = await recorder_factory(broker, Names(names.root, names.site, NODE), f"{base}/cmd/#")
    key = identity.generate()
    model = {
        "sha256": SHA, "version": "1", "precision": "fp32", "provider": "cpu", "slo_p99_ms": 100.0,
        "inputs": [{"name": "x", **TENSOR}], "outputs": [{"name": "y", **TENSOR}],
    }  # fmt: skip
    public_key = signing.public_key_text(key)
    recorder.publish(
        f"{base}/birth", {"session": 1, "seq": 0, "models": {MODEL: model}, "public_key": public_key}
    )
    recorder.publish(f"{base}/state", {"session": 1, "seq": 1, "state": "online"})
    offer = {
        "spare_ips_at_slo": 1000.0,
        "max_ips_at_slo": 1000.0,
        "accepts_pool_jobs": True,
        "slo_p99_ms": 100.0,
    }
    capacity = {"session": 1, "seq": 2, "valid_for_s": 600, "models": {MODEL: offer}}
    recorder.publish(f"{base}/capacity", capacity)

    def offered() -> bool:
        node = gateway.gateway.view.get(names.site, NODE)
        return (
            node is not None
            and node.is_trusted
            and node.offer(MODEL, node.capacity_received_s or 0) is not None
        )

    await until(offered, what="the played node offered to buyers")
    return recorder, key


async def post_slowly(url: str, token: str | None, declared: int, sent: bytes) -> Any:
    """A buyer's POST whose body stops after `sent` of its `declared` bytes: (reader, writer)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {declared}\r\n\r\n"
    writer.write(head.encode() + sent)
    await writer.drain()
    return reader, writer


def admission(gateway: RunningGateway) -> Any:
    return gateway.gateway.app.admission


def buyers(tmp_path: Path, **entries: str) -> str:
    return str(buyers_file(tmp_path, **entries))


@pytest.mark.asyncio
async def test_a_buyer_holds_only_its_places_while_bodies_come_slowly(
    tmp_path: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    listed = buyers(
        tmp_path, acme="rate_per_s = 1000\nmax_requests_in_progress = 2", beta="rate_per_s = 1000"
    )
    with run_gateway(broker, names, buyers_file=listed) as gateway:
        await play_node(recorder_factory, broker, names, gateway)
        held = [await post_slowly(gateway.url, "acme-secret", 4000, b"{") for _ in range(2)]
        await until(lambda: admission(gateway).in_progress("acme") == 2, what="both slow bodies admitted")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:

            async def post(buyer: str) -> httpx.Response:
                headers = {"Authorization": f"Bearer {buyer}-secret"}
                return await http.post(f"/v2/models/{MODEL}/infer", content=BAD, headers=headers)

            third = await post("acme")
            assert third.status_code == 429, third.text
            assert (
                "max_requests_in_progress" in third.json()["error"] and int(third.headers["retry-after"]) >= 1
            )
            assert (await post("beta")).status_code == 400  # another buyer's places are its own
            for _, writer in held:
                writer.close()
            await until(lambda: admission(gateway).in_progress("acme") == 0, what="the places given back")
            assert (await post("acme")).status_code == 400
            metrics = (await http.get("/metrics")).text
        assert 'appliance_gateway_refusals_total{reason="requests_in_progress"} 1.0' in metrics


@pytest.mark.asyncio
async def test_a_body_not_sent_in_time_is_408_and_the_connection_closes(
    tmp_path: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    with run_gateway(broker, names, body_timeout_s=0.5, default_max_body_bytes=1000) as gateway:
        await play_node(recorder_factory, broker, names, gateway)

        async def answer_to(declared: int) -> tuple[bytes, bytes]:
            """(head, body) of the answer to a POST whose body stalls, read to the connection's close."""
            reader, writer = await post_slowly(gateway.url, None, declared, b'{"inputs": ')
            answer = await asyncio.wait_for(reader.read(), 60)
            writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert b"connection: close" in head.lower(), answer[:300]
            return head, body

        head, body = await answer_to(900)
        assert head.startswith(b"HTTP/1.1 408") and b"gateway.body_timeout_s" in body
        # Too large: refused at once, and its body read and dropped (so that the 413 is not lost to a
        # reset), but only for as long as a body may take: then the 413 goes out, and the connection.
        head, body = await answer_to(2000)
        assert head.startswith(b"HTTP/1.1 413") and b"may send 1000 bytes" in body
        assert (
            admission(gateway).in_progress("anonymous") == 0 and admission(gateway).reading.taken_bytes == 0
        )


@pytest.mark.asyncio
async def test_bodies_being_read_stay_within_the_gateways_budget(
    tmp_path: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    with run_gateway(broker, names, max_reading_bytes=1000) as gateway:
        await play_node(recorder_factory, broker, names, gateway)
        _, writer = await post_slowly(gateway.url, None, 900, b"{")
        await until(lambda: admission(gateway).reading.taken_bytes == 900, what="the slow body counted")
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            refused = await http.post(f"/v2/models/{MODEL}/infer", content=BAD + b" " * 200)
            assert refused.status_code == 503, refused.text
            assert "gateway.max_reading_bytes" in refused.json()["error"]
            assert int(refused.headers["retry-after"]) >= 1
            writer.close()
            await until(lambda: admission(gateway).reading.taken_bytes == 0, what="its bytes given back")
            assert (await http.post(f"/v2/models/{MODEL}/infer", content=BAD + b" " * 200)).status_code == 400


@pytest.mark.asyncio
async def test_the_fleet_view_is_for_operators_only(tmp_path: Path, broker: Broker, names: Names) -> None:
    ops = token_digest("ops-secret")
    listed = buyers(tmp_path, acme="")
    with run_gateway(
        broker, names, buyers_file=listed, operator_token_sha256=[ops], token="ops-secret"
    ) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            as_buyer = await http.get("/v2/pool/nodes", headers={"Authorization": "Bearer acme-secret"})
            assert as_buyer.status_code == 403 and "operator_token_sha256" in as_buyer.json()["error"]
            assert (await http.get("/v2/pool/nodes")).status_code == 401
            assert (
                await http.post("/v2/repository/index", headers={"Authorization": "Bearer ops-secret"})
            ).status_code == 401
        assert gateway.nodes()["gateway"] == gateway.gateway.settings.gateway_id  # the operator's token
        code, printed = await watched(gateway.url, "ops-secret")
        assert code == 0 and "gateways:" in printed
    # No buyers file (no token asked anywhere) but an operator listed: the view is the operator's only.
    with run_gateway(broker, names, operator_token_sha256=ops) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            assert (await http.get("/v2/pool/nodes")).status_code == 403
            opened = await http.get("/v2/pool/nodes", headers={"Authorization": "Bearer ops-secret"})
            assert opened.status_code == 200 and opened.json()["nodes"] == []


@pytest.mark.asyncio
async def test_an_answer_naming_an_output_twice_never_reaches_the_buyer(
    tmp_path: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    """tritonclient reads the first `y`, the gateway's decoding (signature, checks) the last: a node
    answering a wrong first `y` and a right last one would be paid and verified for what the buyer
    never got."""
    with run_gateway(broker, names) as gateway:
        recorder, key = await play_node(recorder_factory, broker, names, gateway)
        two_faced = [False]

        async def answer_jobs(node: Recorder) -> None:
            seen = 0
            while True:
                job = await node.expect(lambda m: "/cmd/infer/" in m.topic, since=seen, timeout_s=3600)
                seen = node.messages.index(job) + 1
                request = codec.decode_request(job.payload)
                y = request.inputs["x"] * 2 + 1
                statement = signing.Statement(
                    job_id=(job.correlation or b"").decode(), model_sha256=SHA,
                    input_sha256=signing.tensor_digest(request.inputs),
                    output_sha256=signing.tensor_digest({"y": y}), queue_ms=0.0, compute_ms=0.01,
                    node=NODE, session=1,
                )  # fmt: skip
                right = {"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}
                outputs = [{**right, "data": [-666.0] * y.size}, right] if two_faced[0] else [right]
                proof = {**statement.fields(), "signature": signing.sign(key, statement)}
                document = {"parameters": {"pool_signature": proof}, "model_name": MODEL, "outputs": outputs}
                node.publish(
                    job.response_topic or "", orjson.dumps(document), correlation=job.correlation,
                    user={"status": "200"},
                )  # fmt: skip

        answering = asyncio.create_task(answer_jobs(recorder))
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        request = codec.encode_request({"x": x}, binary=False, binary_output=False).body()
        try:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
                honest = await http.post(f"/v2/models/{MODEL}/infer", content=request)
                assert honest.status_code == 200, honest.text  # the played node signs as a node does
                assert honest.json()["outputs"][0]["data"] == (x * 2 + 1).ravel().tolist()
                two_faced[0] = True
                jobs_before = len([m for m in recorder.messages if "/cmd/infer/" in m.topic])
                answer = await http.post(f"/v2/models/{MODEL}/infer", content=request)
        finally:
            answering.cancel()
        assert len([m for m in recorder.messages if "/cmd/infer/" in m.topic]) > jobs_before  # it was asked
        assert answer.status_code == 503, answer.text  # its answer refused, and no other node to ask


@pytest.mark.asyncio
async def test_a_gateway_warns_when_canaries_come_from_samples_every_box_holds(
    tmp_path: Path, broker: Broker, names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    def catalogue(samples: Path) -> str:
        path = tmp_path / f"catalogue-{samples.stem}.toml"
        path.write_text(
            f'[models.{NAME}]\nsha256 = ["{sha256(INT8)}"]\nmodel_files = ["{INT8}"]\nsamples = "{samples}"\n'
        )
        return str(path)

    caplog.set_level(logging.WARNING, logger="appliance.platform.checks")
    with run_gateway(broker, names, catalogue=catalogue(SAMPLES)):
        pass
    (warning,) = [r.getMessage() for r in caplog.records if "nodes can tell its canaries" in r.getMessage()]
    assert f"model {NAME!r}" in warning and "every box installed from the package holds" in warning
    caplog.clear()
    with np.load(SAMPLES) as archive:
        images = archive["input__image"]
    secret = tmp_path / "secret.npz"  # the operator's own, never shipped
    np.savez(secret, input__image=np.clip(images[::-1] * 0.9 + 0.05, 0, 1))
    with run_gateway(broker, names, catalogue=catalogue(secret)):
        pass
    assert not [r for r in caplog.records if "nodes can tell its canaries" in r.getMessage()]
