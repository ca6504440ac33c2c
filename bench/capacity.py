"""How close the reported max_ips_at_slo is to the rate that really sustains the SLO.

    .venv/bin/python bench/capacity.py [--model surface_defect_224_u8] [--duration 10]

Warms the model with traffic so the latency profile is refined, reads max_ips_at_slo from
GET /capacity, then searches (bisection over Poisson open-loop rates) for the highest rate
whose p99 stays within the model's SLO with no errors. Target (issue 3): within 15%.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_parser, report, serve
from loadgen import Prepared, closed_loop, open_loop
from throughput import sample_input


def main() -> None:
    parser = bench_parser(__doc__, duration_s=10.0)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    inputs = sample_input(args.repository / args.model)
    with serve(args.repository) as server:
        host, port = server.host, server.port
        request = Prepared.infer(host, args.model, inputs, binary=True)
        asyncio.run(closed_loop(host, port, request, clients=16, duration_s=args.duration / 2))
        capacity = httpx.get(f"http://{host}:{port}/capacity").json()["models"][args.model]
        reported = capacity["max_ips_at_slo"]
        slo_ms = capacity["slo_p99_ms"]
        low, high = 0.2 * reported, 2.0 * reported
        trials = []
        for _ in range(args.steps):
            rate = (low + high) / 2
            result = asyncio.run(open_loop(host, port, request, rate_per_s=rate, duration_s=args.duration))
            summary = result.summary()
            meets = summary["errors"] == 0 and summary["p99_ms"] <= slo_ms
            trials.append({"rate": round(rate, 1), **summary, "meets_slo": meets})
            low, high = (rate, high) if meets else (low, rate)
    report(
        "capacity",
        {
            "model": args.model,
            "slo_p99_ms": slo_ms,
            "reported_max_ips_at_slo": reported,
            "measured_sustainable_ips": round(low, 1),
            "reported_vs_measured": round(reported / low, 3) if low else None,
            "profile": capacity["profile"],
            "trials": trials,
        },
    )


if __name__ == "__main__":
    main()
