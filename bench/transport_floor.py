"""What the transports cost with nothing behind them: a do-nothing uvicorn server (httptools, uvloop,
raw ASGI: it reads the body and answers 3 KB) and a do-nothing grpc.aio server (a generic handler that
answers 3 KB), each in its own process, driven by the generators of `local_clients.py` (raw HTTP/1.1
keep-alive with a pre-encoded body; grpc.aio channels sending a pre-serialised message), N clients in
a closed loop with the same 602 KB body. Per request: the server's CPU, the generator's CPU, and the
rate. The floor under `local_clients.py`'s figures: what a transport costs before any inference.

    python bench/transport_floor.py [--clients 32] [--duration 5] [--runs 3] [--bytes 602112]
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any

import grpc
import numpy as np
import psutil
from common import bench_parser, free_port, report
from loadgen import Prepared, closed_loop

ANSWER = b"\0" * 3072


async def _asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    headers = [(b"content-length", str(len(ANSWER)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


def _serve_http(port: int) -> None:
    import uvicorn

    uvicorn.run(_asgi, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="error")


def _serve_grpc(port: int) -> None:
    async def answer(_request: bytes, _context: object) -> bytes:
        return ANSWER

    async def main() -> None:
        handler = grpc.method_handlers_generic_handler(
            "floor", {"echo": grpc.unary_unary_rpc_method_handler(answer)}
        )
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        server.add_generic_rpc_handlers([handler])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


async def _grpc_load(port: int, body: bytes, clients: int, duration_s: float) -> int:
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(clients)]
    stop_at = time.perf_counter() + duration_s
    done = 0

    async def client(channel: grpc.aio.Channel) -> None:
        nonlocal done
        call = channel.unary_unary("/floor/echo")
        while time.perf_counter() < stop_at:
            await call(body, timeout=60)
            done += 1

    try:
        await asyncio.gather(*(client(c) for c in channels))
    finally:
        for channel in channels:
            await channel.close()
    return done


async def _http_load(port: int, body: bytes, clients: int, duration_s: float) -> int:
    head = f"POST /floor HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
    result = await closed_loop(
        "127.0.0.1", port, Prepared(head.encode() + body), clients=clients, duration_s=duration_s, warmup_s=0
    )
    assert set(result.statuses) == {200}, result.statuses
    return result.ok


def _measure(transport: str, body: bytes, clients: int, duration_s: float) -> dict[str, float]:
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, f"serve-{transport}", str(port)])
    try:
        for _ in range(200):  # a bench may poll; tests may not
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        load = _grpc_load if transport == "grpc" else _http_load
        asyncio.run(load(port, body, clients, 1.0))  # warm up: connections, caches
        process = psutil.Process(server.pid)
        server_s, own_s = sum(process.cpu_times()[:2]), time.process_time()
        done = asyncio.run(load(port, body, clients, duration_s))
        server_s, own_s = sum(process.cpu_times()[:2]) - server_s, time.process_time() - own_s
    finally:
        server.terminate()
        server.wait(30)
    return {
        "per_s": round(done / duration_s, 1),
        "server_ms_per_request": round(server_s / done * 1e3, 3),
        "generator_ms_per_request": round(own_s / done * 1e3, 3),
        "both_ms_per_request": round((server_s + own_s) / done * 1e3, 3),
    }


def main() -> None:
    parser = bench_parser(__doc__, duration_s=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=224 * 224 * 3 * 4, help="request body (602,112 B)")
    args = parser.parse_args()
    body = os.urandom(args.bytes)
    runs: dict[str, list[dict[str, float]]] = {"http": [], "grpc": []}
    for _ in range(args.runs):
        for transport in runs:  # alternating, so that a slower minute hits both
            runs[transport].append(_measure(transport, body, args.clients, args.duration))
    figures: dict[str, Any] = {"clients": args.clients, "bytes": args.bytes, "runs": runs}
    for transport, measured in runs.items():
        figures[transport] = {key: float(np.median([m[key] for m in measured])) for key in measured[0]}
    figures["grpc_over_http_cpu_per_request"] = round(
        figures["grpc"]["both_ms_per_request"] / figures["http"]["both_ms_per_request"], 2
    )
    report("transport_floor", figures)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1].startswith("serve-"):
        (_serve_grpc if sys.argv[1] == "serve-grpc" else _serve_http)(int(sys.argv[2]))
    else:
        main()
