"""A KServe v2 load generator: raw asyncio HTTP/1.1 keep-alive, pre-encoded bodies, closed and open loop.

Kept cheap on purpose: on a 2-core box the generator shares the CPU with the server, so
each request costs one write and two reads here, and no per-request encoding.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from appliance.protocol import codec


@dataclass
class Prepared:
    """One request, encoded once and sent many times."""

    wire: bytes

    @classmethod
    def infer(
        cls,
        host: str,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        binary: bool,
        parameters: Mapping[str, object] | None = None,
    ) -> Prepared:
        encoded = codec.encode_request(inputs, binary=binary, binary_output=binary, parameters=parameters)
        body = encoded.body()
        head = [
            f"POST /v2/models/{model}/infer HTTP/1.1",
            f"Host: {host}",
            f"Content-Length: {len(body)}",
        ]
        if encoded.header_length is not None:
            head.append(f"Inference-Header-Content-Length: {encoded.header_length}")
        else:
            head.append("Content-Type: application/json")
        return cls(("\r\n".join(head) + "\r\n\r\n").encode() + body)


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        return cls(reader, writer)

    async def send(self, request: Prepared) -> int:
        """Send one request and read the whole response; return the HTTP status."""
        self.writer.write(request.wire)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


@dataclass
class Result:
    """Latencies (s) of successful requests and counts of each status, over `elapsed_s`."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def record(self, status: int, latency_s: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.latencies_s.append(latency_s)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else float("nan")

    def summary(self) -> dict[str, float]:
        return {
            "ok_per_s": round(self.rate, 1),
            "p50_ms": round(self.percentile_ms(50), 2),
            "p99_ms": round(self.percentile_ms(99), 2),
            "errors": sum(n for s, n in self.statuses.items() if s != 200),
        }


async def closed_loop(
    host: str,
    port: int,
    request: Prepared | Sequence[Prepared],
    *,
    clients: int,
    duration_s: float,
    warmup_s: float = 1.0,
) -> Result:
    """`clients` connections, each sending its next request as soon as the last one is answered; with
    a sequence of requests, client i always sends the i-th (its own shared-memory region, say)."""
    requests = [request] * clients if isinstance(request, Prepared) else list(request)
    connections = [await Connection.open(host, port) for _ in range(clients)]
    result = Result()
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def client(connection: Connection, request: Prepared) -> None:
        while (now := time.perf_counter()) < stop_at:
            status = await connection.send(request)
            if now >= measure_from:
                result.record(status, time.perf_counter() - now)

    try:
        await asyncio.gather(*(client(c, r) for c, r in zip(connections, requests, strict=True)))
    finally:
        for connection in connections:
            connection.close()
    result.elapsed_s = time.perf_counter() - measure_from
    return result


async def open_loop(
    host: str,
    port: int,
    request: Prepared,
    *,
    rate_per_s: float,
    duration_s: float,
    connections: int = 64,
    seed: int = 0,
    more_ports: Sequence[int] = (),
) -> Result:
    """Poisson arrivals at `rate_per_s`; latency counts from the scheduled time (no coordinated omission).
    With `more_ports`, the connections are spread evenly over `port` and those (more servers)."""
    rng = random.Random(seed)
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    ports = [port, *more_ports]
    for n in range(connections):
        idle.put_nowait(await Connection.open(host, ports[n % len(ports)]))
    result = Result()
    pending: set[asyncio.Task[None]] = set()
    start = time.perf_counter()

    async def one(scheduled: float) -> None:
        connection = await idle.get()
        try:
            status = await connection.send(request)
        finally:
            idle.put_nowait(connection)
        result.record(status, time.perf_counter() - scheduled)

    scheduled = start
    while scheduled < start + duration_s:
        scheduled += rng.expovariate(rate_per_s)
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    result.elapsed_s = time.perf_counter() - start
    while not idle.empty():
        idle.get_nowait().close()
    return result
