"""Soak: line traffic, pool jobs, bad inputs and reloads at once, for a long time (issue 13, not CI).

    .venv/bin/python bench/soak.py [--duration 1800] [--warmup 120] [--model surface_defect]

A real `appliance serve` with a pool link to its own mosquitto (ephemeral port). At once:
- line: Poisson binary requests at `--line-share` of the capacity measured first;
- pool: MQTT 5 jobs at `--pool-rate` per second, each answered on its ResponseTopic;
- bad: malformed requests (wrong shapes, datatypes, names, junk, huge declared sizes, bad header
  lengths, unknown models) at `--bad-rate` per second;
- reloads: the model is reloaded over HTTP every `--reload-every` seconds.
Every `--sample-every` seconds the server's RSS (with its pool processes) and open fds are read.
Reports RSS growth after warm-up, fd counts, unanswered requests and jobs, and 5xx by status.
Targets (issue 13): RSS growth <= 5%, 0 unanswered, 0 500s.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_parser, free_port, report, serve
from loadgen import Prepared, closed_loop, open_loop
from throughput import sample_input

from appliance.protocol import codec

SITE, NODE = "soak", "box-1"


def start_broker(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    process = subprocess.Popen(
        [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return process, port
        except OSError:
            time.sleep(0.05)  # a bench, not a test: waiting for a process to listen
    raise RuntimeError("mosquitto did not start")


class PoolJobs:
    """Sends jobs over MQTT 5 and counts the answers by status; what never came back is unanswered."""

    def __init__(self, port: int, model: str, inputs: dict[str, np.ndarray]) -> None:
        encoded = codec.encode_request(inputs, binary=True, binary_output=True)
        self.body, self.header_length = encoded.body(), encoded.header_length
        self.model = model
        self.reply_topic = f"_reply/soak-{uuid.uuid4().hex[:8]}"
        self.sent = 0
        self.statuses: dict[str, int] = {}
        self.pending: set[bytes] = set()
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(self.reply_topic, qos=1)
        self.client.loop_start()

    def send(self) -> None:
        correlation = uuid.uuid4().bytes
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = self.reply_topic
        properties.CorrelationData = correlation
        properties.MessageExpiryInterval = 10
        properties.UserProperty = [(codec.HEADER_LENGTH, str(self.header_length))]
        with self.lock:
            self.pending.add(correlation)
            self.sent += 1
        topic = f"ecp/v1/{SITE}/{NODE}/cmd/infer/{self.model}"
        self.client.publish(topic, self.body, qos=1, properties=properties)

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        properties = message.properties
        status = dict(getattr(properties, "UserProperty", None) or []).get("status", "?")
        with self.lock:
            self.pending.discard(getattr(properties, "CorrelationData", b""))
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def bad_requests(model: str, inputs: dict[str, np.ndarray]) -> list[tuple[str, bytes, dict[str, object]]]:
    """Malformed requests a line client or an attacker might send; none may be answered with a 5xx."""
    name = next(iter(inputs))
    good = codec.encode_request(inputs, binary=True)
    path = f"/v2/models/{model}/infer"
    shape = list(inputs[name].shape)

    def declared(datatype: str, dims: list[int], data: str) -> bytes:
        entry = f'{{"name":"{name}","datatype":"{datatype}","shape":{dims},"data":{data}}}'
        return ('{"inputs":[' + entry + "]}").encode()

    return [
        (path, b"{not json", {}),
        (path, b'{"inputs": "x"}', {}),
        (path, codec.encode_request({name: inputs[name][..., :-1]}, binary=False).body(), {}),
        (path, codec.encode_request({"nope": inputs[name]}, binary=False).body(), {}),
        (path, good.body(), {codec.HEADER_LENGTH: "\u00b2".encode()}),
        (path, good.body(), {codec.HEADER_LENGTH: str(10**9)}),
        (path, declared("FP32", [0, 10**10, 10**10], "[]"), {}),
        (path, declared("FP32", [1] * 70, "[1]"), {}),
        (path, declared("BYTES", shape, '["a"]'), {}),
        (path, b'{"inputs":' + b"[" * 5000 + b"]" * 5000 + b"}", {}),
        (path, os.urandom(4096), {}),
        (f"/v2/models/nosuch-{uuid.uuid4().hex[:6]}/infer", good.body(), {}),
        ("/v2/repository/models/nosuch/load", b"", {}),
    ]


def _refusals(metrics: str) -> dict[str, float]:
    """The server's own count of refusals, by model, priority and reason (appliance_refusals_total)."""
    prefix = "appliance_refusals_total{"
    return {
        line[len(prefix) : line.rindex("}")]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(prefix)
    }


def tree_memory(pid: int) -> tuple[int, int, int]:
    """RSS (bytes) of the server and its children (pool processes), and the server's open fds."""
    process = psutil.Process(pid)
    children = sum(c.memory_info().rss for c in process.children(recursive=True))
    return process.memory_info().rss + children, children, process.num_fds()


async def soak(args, host: str, port: int, pid: int, broker_port: int, inputs) -> dict[str, object]:
    line = Prepared.infer(host, args.model, inputs, binary=True)
    capacity = (await closed_loop(host, port, line, clients=16, duration_s=10)).rate
    rate = capacity * args.line_share
    jobs = PoolJobs(broker_port, args.model, inputs)
    bad = bad_requests(args.model, inputs)
    bad_statuses: dict[int, int] = {}
    reloads: dict[int, int] = {}
    samples: list[tuple[float, int, int, int]] = []  # (s, RSS of all, of the children, fds)
    started = time.monotonic()
    stop_at = started + args.duration
    rng = random.Random(0)

    async def send_jobs() -> None:
        while time.monotonic() < stop_at:
            jobs.send()
            await asyncio.sleep(rng.expovariate(args.pool_rate))

    async def send_bad(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            path, body, headers = rng.choice(bad)
            try:
                status = (await client.post(path, content=body, headers=headers)).status_code
            except httpx.HTTPError:
                status = -1  # the server closed on us (a refused body): not a 5xx, not unanswered
            bad_statuses[status] = bad_statuses.get(status, 0) + 1
            await asyncio.sleep(rng.expovariate(args.bad_rate))

    async def reload(client: httpx.AsyncClient) -> None:
        while time.monotonic() + args.reload_every < stop_at:
            await asyncio.sleep(args.reload_every)
            status = (await client.post(f"/v2/repository/models/{args.model}/load")).status_code
            reloads[status] = reloads.get(status, 0) + 1

    async def sample() -> None:
        while time.monotonic() < stop_at:
            samples.append((time.monotonic() - started, *tree_memory(pid)))
            await asyncio.sleep(args.sample_every)

    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=60) as client:
        background = [
            asyncio.create_task(t) for t in (send_jobs(), send_bad(client), reload(client), sample())
        ]
        line_result = await open_loop(
            host, port, line, rate_per_s=rate, duration_s=args.duration, connections=32
        )
        await asyncio.gather(*background)
        refusals = _refusals((await client.get("/metrics")).text)
    await asyncio.sleep(15)  # the last jobs' expiry (10 s) has passed: anything still pending is lost
    rss_end, children_end, fds_end = tree_memory(pid)
    samples.append((time.monotonic() - started, rss_end, children_end, fds_end))
    jobs.close()
    after_warmup = [s for s in samples if s[0] >= args.warmup] or samples
    rss_base = after_warmup[0][1]
    line_sent = sum(line_result.statuses.values())
    return {
        "capacity_rows_per_s": round(capacity, 1),
        "line": {**line_result.summary(), "statuses": line_result.statuses, "sent": line_sent},
        "pool_jobs": {"sent": jobs.sent, "statuses": jobs.statuses, "unanswered": len(jobs.pending)},
        "bad_requests": bad_statuses,
        "refusals": refusals,
        "reloads": reloads,
        "rss_mb": {
            "after_warmup": round(rss_base / 1e6, 1),
            "end": round(rss_end / 1e6, 1),
            "max": round(max(s[1] for s in after_warmup) / 1e6, 1),
            "children_after_warmup": round(after_warmup[0][2] / 1e6, 1),  # the pool processes
            "children_end": round(children_end / 1e6, 1),
        },
        "rss_growth_pct": round((rss_end - rss_base) / rss_base * 100, 2),
        # About ten points: seconds, MB of the server alone, MB of its pool processes.
        "rss_series_mb": [
            (round(s[0]), round((s[1] - s[2]) / 1e6, 1), round(s[2] / 1e6, 1))
            for s in samples[:: max(1, len(samples) // 10)]
        ],
        "fds": {"after_warmup": after_warmup[0][3], "end": fds_end, "max": max(s[3] for s in samples)},
        "http_5xx": {
            str(s): n
            for statuses in (line_result.statuses, bad_statuses, reloads)
            for s, n in statuses.items()
            if s >= 500 and s != 503
        },
    }


def main() -> None:
    parser = bench_parser(__doc__, duration_s=1800.0)
    parser.set_defaults(model="surface_defect")
    parser.add_argument("--warmup", type=float, default=120.0)
    parser.add_argument("--line-share", type=float, default=0.3)
    parser.add_argument("--pool-rate", type=float, default=20.0)
    parser.add_argument("--bad-rate", type=float, default=20.0)
    parser.add_argument("--reload-every", type=float, default=60.0)
    parser.add_argument("--sample-every", type=float, default=10.0)
    args = parser.parse_args()
    inputs = sample_input(args.repository / args.model)
    with tempfile.TemporaryDirectory(prefix="appliance-soak-") as scratch:
        broker, broker_port = start_broker(Path(scratch))
        env = {
            "APPLIANCE_POOL__BROKER": f"mqtt://127.0.0.1:{broker_port}",
            "APPLIANCE_POOL__SITE": SITE,
            "APPLIANCE_POOL__NODE_ID": NODE,
            "APPLIANCE_POOL__REPORT_INTERVAL_S": "2",
            "STATE_DIRECTORY": str(Path(scratch) / "state"),
        }
        try:
            with serve(args.repository, env=env) as server:
                figures = asyncio.run(
                    soak(args, server.host, server.port, server.process.pid, broker_port, inputs)
                )
        finally:
            broker.terminate()
            broker.wait(30)
    report("soak", {"model": args.model, "duration_s": args.duration, "warmup_s": args.warmup, **figures})


if __name__ == "__main__":
    main()
