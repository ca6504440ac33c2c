"""Line latency with and without pool work saturating the idle capacity (HTTP priority 2 = pool class).

    .venv/bin/python bench/interference.py [--model surface_defect_224_u8] [--line-share 0.3] [--duration 20]

1. Closed loop at 32 clients measures the served capacity C (rows/s).
2. Line alone: Poisson line requests at line_share * C; line p50/p99.
3. Line plus pool: the same line load while 8 closed-loop clients send pool work
   (parameters.priority = 2) as fast as it is taken; line p99 again, pool rate and the
   share of C served in total. Target (issue 3): p99 ratio <= 1.2 at >= 90% utilisation.

The pool clients run in a process of their own (its own event loop: in the line generator's loop,
their 8 big bodies delayed the line's own sends and reads, which the node is not to blame for).
Pool clients are remote on a real node; here they take CPU from it. `--flood-sched idle` runs them
at SCHED_IDLE, so that they only use what the node leaves, as a remote client would. (nice 19 is
not enough: with the kernel's EEVDF scheduler a nice 19 task keeps the core for the rest of its
slice, and line worker threads were measured waiting 6-9 ms on the run queue behind it.)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_flood_arguments, bench_parser, report, serve, set_sched
from loadgen import Prepared, closed_loop, open_loop
from throughput import sample_input


def _flood(
    host: str, port: int, pool: Prepared, clients: int, duration_s: float, sched: str, out: Connection
) -> None:
    set_sched(sched)
    result = asyncio.run(closed_loop(host, port, pool, clients=clients, duration_s=duration_s, warmup_s=0.5))
    out.send(result.summary())


async def line_with_pool(
    host: str,
    port: int,
    line: Prepared,
    pool: Prepared,
    *,
    rate: float,
    duration_s: float,
    pool_clients: int,
    sched: str,
) -> tuple[dict[str, float], dict[str, float]]:
    receiver, sender = multiprocessing.Pipe(duplex=False)
    flood = multiprocessing.Process(
        target=_flood, args=(host, port, pool, pool_clients, duration_s + 1.0, sched, sender), daemon=True
    )
    flood.start()
    await asyncio.sleep(1.0)  # let the pool flood reach steady state before measuring the line
    line_result = await open_loop(host, port, line, rate_per_s=rate, duration_s=duration_s)
    pool_result = await asyncio.to_thread(receiver.recv)
    flood.join(30)
    return line_result.summary(), pool_result


def main() -> None:
    parser = bench_parser(__doc__, duration_s=20.0)
    add_flood_arguments(parser, sched_help="CPU scheduling of the pool clients")
    parser.add_argument("--pool-clients", type=int, default=8)
    args = parser.parse_args()

    inputs = sample_input(args.repository / args.model)
    with serve(args.repository) as server:
        host, port = server.host, server.port
        line = Prepared.infer(host, args.model, inputs, binary=True)
        pool = Prepared.infer(host, args.model, inputs, binary=True, parameters={"priority": 2})
        capacity = asyncio.run(closed_loop(host, port, line, clients=32, duration_s=args.duration / 2)).rate
        rate = capacity * args.line_share
        alone = asyncio.run(open_loop(host, port, line, rate_per_s=rate, duration_s=args.duration)).summary()
        with_pool, pool_rates = asyncio.run(
            line_with_pool(
                host,
                port,
                line,
                pool,
                rate=rate,
                duration_s=args.duration,
                pool_clients=args.pool_clients,
                sched=args.flood_sched,
            )
        )
        stats = httpx.get(f"http://{host}:{port}/v2/models/{args.model}/stats").json()["model_stats"][0]
    total = with_pool["ok_per_s"] + pool_rates["ok_per_s"]
    report(
        "interference",
        {
            "model": args.model,
            "pool_clients": args.pool_clients,
            "flood_sched": args.flood_sched,
            "capacity_rows_per_s": round(capacity, 1),
            "line_rate_per_s": round(rate, 1),
            "line_alone": alone,
            "line_with_pool": with_pool,
            "pool": pool_rates,
            "p99_ratio": round(with_pool["p99_ms"] / alone["p99_ms"], 3),
            "p50_ratio": round(with_pool["p50_ms"] / alone["p50_ms"], 3),
            "utilisation_of_capacity": round(total / capacity, 3),
            "preemptions": stats.get("preemptions"),
        },
    )


if __name__ == "__main__":
    main()
