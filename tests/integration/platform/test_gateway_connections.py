"""On a real gateway and mosquitto, over raw sockets (and TLS): the buyer API's connections are held to
the box's bounds (server/connections.py) under [gateway]'s names: headers never finished, headers too
large, connections beyond the limits while an established buyer goes on, a drain on stop."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from gateway_harness import RunningGateway, run_gateway, until
from pool_brokers import Broker, tls_files
from pool_recorder import Names
from test_gateway_admission import MODEL, play_node

READ_TIMEOUT_S = 60.0  # generous: a test only fails on it if the gateway never answers or never closes
TRICKLE_PACE_S = 0.05  # a slowloris's pace: one header byte this often
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: gateway\r\n"  # a request whose headers are not finished


class Client:
    """One raw connection to the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def until_closed(self) -> bytes:
        """Everything the gateway sends until it closes the connection (a reset counts as closed)."""
        chunks = []
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):
            async with asyncio.timeout(READ_TIMEOUT_S):
                while chunk := await self.reader.read(65536):
                    chunks.append(chunk)
        return b"".join(chunks)


@contextlib.asynccontextmanager
async def connected(
    gateway: RunningGateway, source: str = "127.0.0.1", tls: ssl.SSLContext | None = None
) -> AsyncIterator[Client]:
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(
        host, int(port), local_addr=(source, 0), ssl=tls, server_hostname="127.0.0.1" if tls else None
    )
    try:
        yield Client(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def refused(raw: bytes) -> tuple[int, dict[str, str], str]:
    """A refusal: status, headers and the OIP error message; it closes the connection."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    assert headers.get("connection") == "close", raw[:300]
    return int(lines[0].split()[1]), headers, orjson.loads(body)["error"]


def refusals(metrics: str, reason: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'appliance_gateway_refusals_total{{reason="{reason}"}} '):
            return float(line.split()[-1])
    return 0.0


async def trickle(client: Client) -> None:
    """A slowloris: header bytes, one at a time, never the blank line that ends them."""
    with contextlib.suppress(ConnectionError):
        while True:
            client.writer.write(b"a")
            await client.writer.drain()
            await asyncio.sleep(TRICKLE_PACE_S)


@pytest.mark.asyncio
async def test_headers_never_finished_get_408_at_the_deadline_and_the_connection_closes(
    broker: Broker, names: Names
) -> None:
    with run_gateway(broker, names, header_timeout_s=0.5) as gateway:
        async with connected(gateway) as silent, connected(gateway) as slow:
            silent.writer.write(LIVE)  # and nothing more
            slow.writer.write(LIVE + b"X-Slow: ")
            trickling = asyncio.create_task(trickle(slow))
            try:
                for client in (silent, slow):  # the trickled bytes do not extend the deadline
                    status, _, message = refused(await client.until_closed())
                    assert status == 408
                    assert message == (
                        "request line and headers not received within 0.5 s (gateway.header_timeout_s)"
                    )
            finally:
                trickling.cancel()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=READ_TIMEOUT_S) as http:
            assert refusals((await http.get("/metrics")).text, "header_timeout") == 2


@pytest.mark.asyncio
async def test_headers_beyond_max_header_bytes_get_431_and_the_connection_closes(
    broker: Broker, names: Names
) -> None:
    with run_gateway(broker, names, max_header_bytes=1024) as gateway:
        async with connected(gateway) as client:
            client.writer.write(LIVE + b"X-Big: " + b"a" * 4096 + b"\r\n\r\n")
            status, _, message = refused(await client.until_closed())
        assert status == 431
        assert message == "request line and headers are larger than 1024 bytes (gateway.max_header_bytes)"
        async with httpx.AsyncClient(base_url=gateway.url, timeout=READ_TIMEOUT_S) as http:
            assert (await http.get("/v2/health/live", headers={"X-Fits": "a" * 512})).status_code == 200
            assert refusals((await http.get("/metrics")).text, "header_too_large") == 1


@pytest.mark.asyncio
async def test_connections_beyond_the_limits_get_503_while_an_established_buyer_is_served(
    broker: Broker, names: Names
) -> None:
    settings = {"max_connections": 3, "max_connections_per_peer": 2, "retry_after_s": 3}
    with run_gateway(broker, names, **settings) as gateway:
        places = gateway.gateway.gate
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with (
            httpx.AsyncClient(base_url=gateway.url, timeout=READ_TIMEOUT_S, transport=transport) as buyer,
            contextlib.AsyncExitStack() as idle,
        ):
            assert (await buyer.get("/v2/health/live")).status_code == 200  # its kept-alive connection
            first = await idle.enter_async_context(connected(gateway))
            await idle.enter_async_context(connected(gateway))
            await until(lambda: places.open == 3, what="the buyer's and two idle connections admitted")
            async with connected(gateway) as third:  # a third from 127.0.0.1
                status, headers, message = refused(await third.until_closed())
            assert status == 503 and headers["retry-after"] == "3"
            assert message == (
                "too many connections from 127.0.0.1: 2 open, at most 2 per client address "
                "(gateway.max_connections_per_peer)"
            )
            async with connected(gateway, "127.0.0.3") as other:
                status, headers, message = refused(await other.until_closed())
            assert status == 503 and headers["retry-after"] == "3"
            assert message == "too many connections: 3 open, at most 3 (gateway.max_connections)"
            assert (await buyer.get("/v2/health/live")).status_code == 200  # never starved of its own
            first.writer.close()
            await until(lambda: places.open == 2, what="the closed connection's place given back")
            async with connected(gateway, "127.0.0.3") as later:
                later.writer.write(LIVE + b"Connection: close\r\n\r\n")
                assert (await later.until_closed()).startswith(b"HTTP/1.1 200 ")
            assert refusals((await buyer.get("/metrics")).text, "connection_limit") == 2


@pytest.mark.asyncio
async def test_the_bounds_hold_over_tls(tmp_path: Path, broker: Broker, names: Names) -> None:
    files = tls_files(tmp_path)
    tls = ssl.create_default_context(cafile=str(files.ca))
    settings: dict[str, Any] = {
        "tls_cert_file": str(files.cert),
        "tls_key_file": str(files.key),
        "header_timeout_s": 0.5,
        "max_connections": 2,
    }
    with run_gateway(broker, names, **settings) as gateway:
        url = gateway.url.replace("http://", "https://")
        places = gateway.gateway.gate
        async with (
            httpx.AsyncClient(base_url=url, timeout=READ_TIMEOUT_S, verify=tls) as buyer,
            httpx.AsyncClient(base_url=url, timeout=READ_TIMEOUT_S, verify=tls) as other_buyer,
        ):
            assert (await buyer.get("/v2/health/live")).status_code == 200
            async with connected(gateway, tls=tls) as slow:
                slow.writer.write(LIVE)  # never finished
                status, _, message = refused(await slow.until_closed())
            assert status == 408 and "(gateway.header_timeout_s)" in message
            async with connected(gateway, tls=tls) as big:
                big.writer.write(LIVE + b"X-Big: " + b"a" * 32 * 1024 + b"\r\n\r\n")
                status, _, message = refused(await big.until_closed())
            assert status == 431 and "(gateway.max_header_bytes)" in message
            await until(lambda: places.open == 1, what="the refused connections' places given back")
            assert (await other_buyer.get("/v2/health/live")).status_code == 200  # 2 of 2 now
            async with connected(gateway, tls=tls) as third:
                status, _, message = refused(await third.until_closed())
            assert status == 503
            assert message == "too many connections: 2 open, at most 2 (gateway.max_connections)"
            assert (await buyer.get("/v2/health/live")).status_code == 200


@pytest.mark.asyncio
async def test_a_request_still_incomplete_when_the_gateway_stops_gets_503_within_the_drain(
    broker: Broker, names: Names, recorder_factory: Any
) -> None:
    with run_gateway(broker, names, drain_timeout_s=0.5) as gateway:
        await play_node(recorder_factory, broker, names, gateway)
        async with connected(gateway) as client:
            head = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: gateway\r\nContent-Length: 100\r\n\r\n"
            client.writer.write(head.encode() + b"{")  # and the body's rest never comes
            admission = gateway.gateway.app.admission
            await until(lambda: admission.in_progress("anonymous") == 1, what="its body being read")
            gateway.gateway.stop()
            status, _, message = refused(await client.until_closed())
        assert status == 503
        assert message == (
            "the service is stopping and the request was not complete within 0.5 s (gateway.drain_timeout_s)"
        )
