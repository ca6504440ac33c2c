"""Line latency over HTTP with and without pool jobs flooding in over MQTT; p99 ratio and utilisation.

    .venv/bin/python bench/pool_interference.py [--model surface_defect_224_u8] [--line-share 0.3]
        [--duration 20] [--pool-inflight 32] [--broker mqtt://host:port] [--max-interference-ms 10]

1. Closed loop at 32 clients measures the served capacity C (rows/s) over HTTP.
2. Line alone: Poisson line requests at line_share * C; line p50/p99.
3. Line plus pool: the same line load while a platform client keeps `pool_inflight` jobs
   outstanding on cmd/infer/<model> (MQTT 5, binary tensors), sending the next one as each
   answer arrives (when refused, after its retry_after_s, at most 1 s), from its own process.
   Line p99 again, pool jobs
   answered per second, refusals, and the utilisation the node reports on GET /capacity.
Without --broker, a mosquitto on a free 127.0.0.1 port is started for the run.

The broker and the platform client are remote on a real node; here they share its 2 cores.
`--flood-sched idle` runs both at SCHED_IDLE, so that they only use what the node leaves (see
interference.py for why not nice 19).
"""

from __future__ import annotations

import asyncio
import collections
import json
import multiprocessing
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_flood_arguments, bench_parser, free_port, report, serve, set_sched
from loadgen import Prepared, closed_loop, open_loop
from throughput import sample_input

from appliance.protocol import codec

MAX_REFUSED_PAUSE_S = (
    1.0  # a refusal's retry_after_s is honoured up to this (a platform would route elsewhere)
)


def start_mosquitto(directory: Path, sched: str = "normal") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    process = subprocess.Popen(
        [*(["chrt", "--idle", "0"] if sched == "idle" else []), binary, "-c", str(config)],
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):  # a bench may poll; tests may not
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"mqtt://127.0.0.1:{port}"
        time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


class PoolFlood:
    """Keeps `inflight` jobs outstanding on one node; counts answers (ok / refused) in shared counters."""

    def __init__(
        self, url: str, topic: str, body: bytes, header_length: int, inflight: int, counts: Any
    ) -> None:
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.topic, self.inflight, self.body, self.counts = topic, inflight, body, counts
        self.reply_topic = f"bench/replies/{uuid.uuid4().hex[:8]}"
        self.properties = Properties(PacketTypes.PUBLISH)
        self.properties.ResponseTopic = self.reply_topic
        self.properties.MessageExpiryInterval = 10
        self.properties.UserProperty = [(codec.HEADER_LENGTH, str(header_length))]
        self.outstanding = 0
        self.paused_until_s = 0.0
        self.refusals: collections.Counter[str] = collections.Counter()
        self.condition = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._answered
        self.client.connect(host, int(port))
        self.client.subscribe(self.reply_topic, qos=1)
        self.client.loop_start()

    def run(self, stop: Any) -> None:
        while not stop.is_set():
            with self.condition:
                if not self.condition.wait_for(lambda: self.outstanding < self.inflight, timeout=0.1):
                    continue
                pause_s = self.paused_until_s - time.monotonic()
                self.outstanding += 1
            if pause_s > 0:
                time.sleep(pause_s)
            self.client.publish(self.topic, self.body, qos=1, properties=self.properties)
        self.client.disconnect()
        self.client.loop_stop()

    def _answered(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        is_ok = dict(getattr(message.properties, "UserProperty", None) or []).get("status") == "200"
        if not is_ok:
            self.refusals[_refusal_kind(message.payload)] += 1
        with self.counts.get_lock():
            self.counts[0 if is_ok else 1] += 1
        with self.condition:
            self.outstanding -= 1
            if not is_ok:
                self.paused_until_s = time.monotonic() + _retry_after_s(message.payload)
            self.condition.notify_all()


def _refusal_kind(payload: bytes) -> str:
    """The refusal's message with its numbers taken out, so that alike refusals count together."""
    try:
        error = str(json.loads(payload).get("error", ""))
    except (ValueError, AttributeError):
        error = "unreadable answer"
    return re.sub(r"\d+(\.\d+)?", "N", error)[:90]


def _retry_after_s(payload: bytes) -> float:
    try:
        retry_after_s = float(json.loads(payload).get("retry_after_s", 0.01))
    except (ValueError, AttributeError):
        retry_after_s = 0.01
    return min(max(retry_after_s, 0.01), MAX_REFUSED_PAUSE_S)


def _flood(
    url: str,
    topic: str,
    body: bytes,
    header_length: int,
    inflight: int,
    counts: Any,
    stop: Any,
    sched: str,
    reasons: Any,
) -> None:
    set_sched(sched)
    flood = PoolFlood(url, topic, body, header_length, inflight, counts)
    flood.run(stop)
    reasons.put(dict(flood.refusals))


class FloodProcess:
    """The flood in its own process, so that it shares no GIL with the line load generator."""

    def __init__(self, url: str, topic: str, job: codec.EncodedResponse, inflight: int, sched: str) -> None:
        self.counts = multiprocessing.Array("q", 2)  # answered ok, refused
        self.stop_event = multiprocessing.Event()
        assert job.header_length is not None
        self.reasons: Any = multiprocessing.Queue()  # refusals by reason, over the whole flood
        arguments = (
            url,
            topic,
            job.body(),
            job.header_length,
            inflight,
            self.counts,
            self.stop_event,
            sched,
            self.reasons,
        )
        self.process = multiprocessing.Process(target=_flood, args=arguments, daemon=True)

    def start(self) -> None:
        self.process.start()

    def stop(self) -> dict[str, int]:
        self.stop_event.set()
        reasons = self.reasons.get(timeout=30)
        self.process.join(30)
        return reasons

    def count(self) -> tuple[int, int]:
        with self.counts.get_lock():
            return self.counts[0], self.counts[1]


async def line_with_flood(
    host: str, port: int, line: Prepared, flood: FloodProcess, *, rate: float, duration_s: float, model: str
) -> tuple[dict[str, float], dict[str, object], dict[str, object]]:
    flood.start()
    await asyncio.sleep(1.0)  # let the flood reach steady state before measuring the line
    # Made before measuring, and used from a thread: creating an httpx client loads the CA bundle (55-100
    # ms here), and on the load generator's loop that stalled every line request scheduled meanwhile.
    with httpx.Client(base_url=f"http://{host}:{port}") as http:
        before, started_s = flood.count(), time.perf_counter()
        measuring = asyncio.create_task(open_loop(host, port, line, rate_per_s=rate, duration_s=duration_s))
        await asyncio.sleep(duration_s / 2)
        capacity = (await asyncio.to_thread(http.get, "/capacity")).json()
        line_result = await measuring
    line_statuses = {str(status): count for status, count in line_result.statuses.items()}
    elapsed_s = time.perf_counter() - started_s
    after = flood.count()
    reasons = flood.stop()
    ok, refused = after[0] - before[0], after[1] - before[1]
    pool = {
        "jobs_ok_per_s": round(ok / elapsed_s, 1),
        "refused_per_s": round(refused / elapsed_s, 1),
        "jobs_ok": ok,
        "jobs_refused": refused,
        "refusals_by_reason": reasons,
    }
    model_report = capacity["models"][model]
    node = {
        "utilisation": capacity["utilisation"],
        "model_utilisation": model_report["utilisation"],
        "max_ips_at_slo": model_report["max_ips_at_slo"],
        "served_ips": model_report["served_ips"],
        "spare_ips_at_slo": model_report["spare_ips_at_slo"],
        "cpu_budget": capacity.get("cpu"),
    }
    return {**line_result.summary(), "statuses": line_statuses}, pool, node


def main() -> None:
    parser = bench_parser(__doc__, duration_s=20.0)
    add_flood_arguments(
        parser, sched_help="CPU scheduling of the platform client and of the broker started here"
    )
    parser.add_argument("--pool-inflight", type=int, default=32)
    parser.add_argument("--broker", help="mqtt://host:port of a broker (default: start mosquitto)")
    parser.add_argument(
        "--max-interference-ms",
        type=float,
        help="pool.max_interference_ms for the node (default: its default)",
    )
    args = parser.parse_args()

    inputs = sample_input(args.repository / args.model)
    with tempfile.TemporaryDirectory() as scratch:
        broker_process, url = (
            (None, args.broker) if args.broker else start_mosquitto(Path(scratch), args.flood_sched)
        )
        node = f"bench-{uuid.uuid4().hex[:6]}"
        env = {
            "APPLIANCE_POOL__BROKER": url,
            "APPLIANCE_POOL__SITE": "bench",
            "APPLIANCE_POOL__NODE_ID": node,
            "APPLIANCE_POOL__REPORT_INTERVAL_S": "1",
            # The flood is one sender (one reply topic), standing for the whole pool: the per-sender
            # rate meant for hostile peers must not be what the bench measures.
            "APPLIANCE_POOL__MAX_JOBS_PER_SENDER_PER_S": "100000",
            "STATE_DIRECTORY": str(Path(scratch) / "state"),
        }
        if args.max_interference_ms is not None:
            env["APPLIANCE_POOL__MAX_INTERFERENCE_MS"] = str(args.max_interference_ms)
        try:
            with serve(args.repository, env=env) as server:
                host, port = server.host, server.port
                line = Prepared.infer(host, args.model, inputs, binary=True)
                measured = asyncio.run(
                    closed_loop(host, port, line, clients=32, duration_s=args.duration / 2)
                )
                capacity = measured.rate
                rate = capacity * args.line_share
                alone = asyncio.run(open_loop(host, port, line, rate_per_s=rate, duration_s=args.duration))
                job = codec.encode_request(inputs, binary=True, binary_output=True)
                flood = FloodProcess(
                    url,
                    f"ecp/v1/bench/{node}/cmd/infer/{args.model}",
                    job,
                    args.pool_inflight,
                    args.flood_sched,
                )
                with_pool, pool, node_report = asyncio.run(
                    line_with_flood(
                        host, port, line, flood, rate=rate, duration_s=args.duration, model=args.model
                    )
                )
        finally:
            if broker_process is not None:
                broker_process.terminate()
                broker_process.wait(10)
    alone_summary = alone.summary()
    report(
        "pool_interference",
        {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "model": args.model,
            "max_interference_ms": args.max_interference_ms,
            "flood_sched": args.flood_sched,
            "capacity_rows_per_s": round(capacity, 1),
            "line_rate_per_s": round(rate, 1),
            "line_alone": alone_summary,
            "line_with_pool": with_pool,
            "pool": pool,
            "node_during_flood": node_report,
            "p99_ratio": round(with_pool["p99_ms"] / alone_summary["p99_ms"], 3),
            "p50_ratio": round(with_pool["p50_ms"] / alone_summary["p50_ms"], 3),
            "rows_served_share_of_capacity": round(
                (with_pool["ok_per_s"] + pool["jobs_ok_per_s"]) / capacity, 3
            ),
        },
    )


if __name__ == "__main__":
    main()
