"""Line latency while clients send huge bodies a model cannot take (issue 13: decoding must not stall).

    .venv/bin/python bench/big_bodies.py [--model surface_defect] [--body-mb 40] [--clients 4] [--duration 20]

1. Closed loop at 32 clients measures the served capacity C of the model (rows/s).
2. Line alone: Poisson line requests at line_share * C (binary); line p50/p99.
3. The same line load while `--clients` connections each send, again and again, a JSON body of
   `--body-mb` MB holding a BYTES tensor aimed at the model's FP32 input (declared with
   Content-Length, or chunked with `--chunked`); line p99 again, and what the big bodies got.
   Target (issue 13): line p99 with big bodies <= 2x line p99 alone.

The big-body clients run in a process of their own, at normal priority: on a real line they are
remote, here they share the box's two cores with the node.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from multiprocessing.connection import Connection as Pipe
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_parser, report, serve
from loadgen import Prepared, closed_loop, open_loop
from throughput import sample_input


def big_body(model: str, input_name: str, size_bytes: int, *, is_chunked: bool) -> bytes:
    """The whole request on the wire: a BYTES tensor of ~size_bytes where the model wants FP32."""
    item = '"' + "a" * 1020 + '"'
    count = size_bytes // (len(item) + 1)
    data = ",".join([item] * count)
    body = (
        f'{{"inputs":[{{"name":"{input_name}","datatype":"BYTES","shape":[{count}],"data":[{data}]}}]}}'
    ).encode()
    head = [f"POST /v2/models/{model}/infer HTTP/1.1", "Host: bench", "Content-Type: application/json"]
    if not is_chunked:
        return ("\r\n".join([*head, f"Content-Length: {len(body)}"]) + "\r\n\r\n").encode() + body
    chunks = b"".join(
        f"{len(part):x}\r\n".encode() + part + b"\r\n"
        for part in (body[i : i + 65536] for i in range(0, len(body), 65536))
    )
    return ("\r\n".join([*head, "Transfer-Encoding: chunked"]) + "\r\n\r\n").encode() + chunks + b"0\r\n\r\n"


async def _one_big(host: str, port: int, wire: bytes, statuses: dict[str, int]) -> None:
    """Send one big request on a new connection; count its status (or how the connection ended)."""
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
    except OSError as exc:
        statuses[f"connect:{type(exc).__name__}"] = statuses.get(f"connect:{type(exc).__name__}", 0) + 1
        return
    reading = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
    try:
        for offset in range(0, len(wire), 1 << 20):
            if reading.done():
                break  # answered before the body was sent: the server refused it early
            writer.write(wire[offset : offset + (1 << 20)])
            await writer.drain()
    except OSError:
        pass  # the server closed the connection on us: its answer may be waiting to be read
    try:
        head = await asyncio.wait_for(reading, 120)
        key = head[9:12].decode()
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        key = type(exc).__name__
    finally:
        writer.close()
    statuses[key] = statuses.get(key, 0) + 1


def _big_clients(host: str, port: int, wire: bytes, clients: int, duration_s: float, out: Pipe) -> None:
    statuses: dict[str, int] = {}

    async def client() -> None:
        stop_at = time.perf_counter() + duration_s
        while time.perf_counter() < stop_at:
            await _one_big(host, port, wire, statuses)

    async def run() -> None:
        await asyncio.gather(*(client() for _ in range(clients)))

    asyncio.run(run())
    out.send(statuses)


async def line_with_big_bodies(
    host: str, port: int, line: Prepared, wire: bytes, *, rate: float, duration_s: float, clients: int
) -> tuple[dict[str, float], dict[str, int]]:
    receiver, sender = multiprocessing.Pipe(duplex=False)
    flood = multiprocessing.Process(
        target=_big_clients, args=(host, port, wire, clients, duration_s + 1.0, sender), daemon=True
    )
    flood.start()
    await asyncio.sleep(1.0)  # the big bodies are flowing before the line is measured
    line_result = await open_loop(host, port, line, rate_per_s=rate, duration_s=duration_s)
    statuses = await asyncio.to_thread(receiver.recv)
    flood.join(60)
    return line_result.summary(), statuses


def main() -> None:
    parser = bench_parser(__doc__, duration_s=20.0)
    parser.add_argument("--line-share", type=float, default=0.3)
    parser.set_defaults(model="surface_defect")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--body-mb", type=float, default=40.0)
    parser.add_argument("--chunked", action="store_true", help="send the big bodies without Content-Length")
    args = parser.parse_args()

    inputs = sample_input(args.repository / args.model)
    input_name = next(iter(inputs))
    wire = big_body(args.model, input_name, int(args.body_mb * 1e6), is_chunked=args.chunked)
    with serve(args.repository) as server:
        host, port = server.host, server.port
        line = Prepared.infer(host, args.model, inputs, binary=True)
        capacity = asyncio.run(closed_loop(host, port, line, clients=32, duration_s=args.duration / 2)).rate
        rate = capacity * args.line_share
        alone = asyncio.run(open_loop(host, port, line, rate_per_s=rate, duration_s=args.duration)).summary()
        with_big, statuses = asyncio.run(
            line_with_big_bodies(
                host, port, line, wire, rate=rate, duration_s=args.duration, clients=args.clients
            )
        )
    report(
        "big_bodies",
        {
            "model": args.model,
            "clients": args.clients,
            "body_mb": round(len(wire) / 1e6, 1),
            "chunked": args.chunked,
            "capacity_rows_per_s": round(capacity, 1),
            "line_rate_per_s": round(rate, 1),
            "line_alone": alone,
            "line_with_big_bodies": with_big,
            "big_bodies": statuses,
            "p99_ratio": round(with_big["p99_ms"] / alone["p99_ms"], 3),
            "p50_ratio": round(with_big["p50_ms"] / alone["p50_ms"], 3),
        },
    )


if __name__ == "__main__":
    main()
