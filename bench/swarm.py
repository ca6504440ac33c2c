"""The swarm benchmark: the gateway in front of N simulated nodes on one mosquitto.

    python bench/swarm.py [--nodes 100 1000 5000] [--runs 3] [--rate 500] [--duration 10]

Per run: a fresh mosquitto, the simulator (one process: N nodes speaking the node contract over a few
MQTT connections: retained birth and state, capacity every --interval-s with MQTT 5 expiry, and jobs
on cmd/infer/sim answered with trivial compute, y = 2x + 1, each answer signed with that node's own
Ed25519 key, as a real node signs) and `appliance platform gateway` (which verifies each answer and
commits its receipt to its SQLite ledger before answering). Then two
open-loop phases at --rate jobs/s with a 2 KB request (FP32 [1, 512], binary): jobs sent straight to
simulated nodes over MQTT 5 (the direct baseline), then the same through the gateway over HTTP.
Figures: reports ingested/s (the gateway's counter), jobs/s, dispatch overhead (gateway p50/p99 minus
direct p50/p99), the gateway's RSS, every process's CPU over the gateway phase. Every process shares
the same cores; the whole bench runs at nice 19 so that others' work on a shared box goes first.
`--gateways N` runs N gateway processes on the broker (each takes 1/N of every offer, each with its own
key, all sharing one SQLite ledger as gateways on one broker must) and spreads the load generator's
connections over them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import orjson
import paho.mqtt.client as mqtt
import psutil
from common import ROOT, free_port, report
from cpu_split import profiled
from loadgen import Prepared, open_loop
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.pool import identity, signing
from appliance.protocol import codec

MODEL, WIDTH = "sim", 512
SHA256 = "5" * 64
READY = re.compile(r"ready on http://([\d.]+):(\d+)")


def _client(broker: str, name: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(0)  # 0 = no limit: the broker's receive maximum governs
    client.max_queued_messages_set(0)
    client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    host, port = broker.removeprefix("mqtt://").split(":")
    client.connect(host, int(port), keepalive=60)
    client.loop_start()
    return client


def _properties(**values: object) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)
    for key, value in values.items():
        setattr(properties, key, value)
    return properties


def simulate(broker: str, root: str, nodes: int, interval_s: float, connections: int) -> None:
    """Run N simulated nodes until killed (the `sim` sub-command)."""
    session = int(time.time())
    names = [f"sim-{i:05d}" for i in range(nodes)]
    clients = [_client(broker, f"sim-{uuid.uuid4().hex[:8]}") for _ in range(connections)]
    keys = {name: identity.generate() for name in names}  # each signs its answers, as a real node does
    tensor = {"name": "x", "datatype": "FP32", "shape": [-1, WIDTH]}
    output = {"name": "y", "datatype": "FP32", "shape": [-1, WIDTH]}
    for index, name in enumerate(names):
        client, base = clients[index % connections], f"{root}/{name}"
        birth = {"node": name, "session": session, "seq": 0, "ts_ms": 0, "models": {MODEL: {
            "state": "READY", "version": "1", "sha256": SHA256, "precision": "fp32", "provider": "cpu",
            "slo_p99_ms": 100.0, "inputs": [tensor], "outputs": [output]}},
            "public_key": signing.public_key_text(keys[name])}  # fmt: skip
        client.publish(f"{base}/birth", orjson.dumps(birth), qos=1, retain=True)
        state = {"node": name, "session": session, "seq": 1, "state": "online", "reason": ""}
        client.publish(f"{base}/state", orjson.dumps(state), qos=1, retain=True)

    def answer(c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        props = message.properties
        length = dict(getattr(props, "UserProperty", None) or []).get(codec.HEADER_LENGTH)
        request = codec.decode_request(message.payload, int(length) if length else None)
        x = request.inputs["x"]
        encoded = codec.encode_response(
            model_name=MODEL, model_version="1", request=request, outputs={"y": x * 2 + 1}
        )
        name = message.topic.split("/")[-4]
        statement = signing.Statement(
            job_id=signing.job_id(props.CorrelationData, None, request.id), model_sha256=SHA256,
            input_sha256=signing.tensor_digest(request.inputs),
            output_sha256=signing.tensor_digest({"y": x * 2 + 1}),
            queue_ms=0.0, compute_ms=0.01, node=name, session=session,
        )  # fmt: skip
        proof = {**statement.fields(), "signature": signing.sign(keys[name], statement)}
        header, *blobs = encoded.parts
        signed = signing.attach(bytes(header), proof)
        encoded = codec.EncodedResponse([signed, *blobs], len(signed) if blobs else None)
        user = [("status", "200")]
        if encoded.header_length is not None:
            user.append((codec.HEADER_LENGTH, str(encoded.header_length)))
        c.publish(props.ResponseTopic, encoded.body(), qos=1, properties=_properties(
            CorrelationData=props.CorrelationData, UserProperty=user))  # fmt: skip

    jobs = clients[0]
    jobs.on_message = answer
    jobs.subscribe(f"{root}/+/cmd/infer/#", qos=1)
    valid_for_s = max(1, round(3 * interval_s))
    due = {name: time.monotonic() + random.uniform(0, interval_s) for name in names}
    seqs = dict.fromkeys(names, 2)
    expiry = _properties(MessageExpiryInterval=valid_for_s)
    while True:
        now = time.monotonic()
        for index, name in enumerate(names):
            if due[name] > now:
                continue
            due[name] = now + interval_s * random.uniform(0.9, 1.1)
            seqs[name] += 1
            report_doc = {"node": name, "session": session, "seq": seqs[name],
                "ts_ms": int(time.time() * 1e3), "valid_for_s": valid_for_s,
                "models": {MODEL: {"state": "READY", "max_ips_at_slo": 250.0,
                "spare_ips_at_slo": 200.0, "served_ips": 0.0, "accepts_pool_jobs": True,
                "slo_p99_ms": 100.0, "precision": "fp32", "provider": "cpu"}}}  # fmt: skip
            clients[index % connections].publish(
                f"{root}/{name}/capacity", orjson.dumps(report_doc), qos=0, retain=True, properties=expiry
            )
        time.sleep(0.01)


class Direct:
    """The baseline: jobs straight to simulated nodes over MQTT 5, open loop, answers timed."""

    def __init__(self, broker: str, root: str, nodes: int) -> None:
        self.root, self.nodes = root, nodes
        self.client = _client(broker, f"direct-{uuid.uuid4().hex[:8]}")
        self.sent: dict[bytes, float] = {}
        self.latencies_s: list[float] = []
        self.client.on_message = self._answered
        self.reply = f"{root.rsplit('/', 1)[0]}/_reply/direct"
        self.client.subscribe(f"{self.reply}/#", qos=1)
        time.sleep(0.5)  # the SUBACK; a bench may wait, tests may not

    def _answered(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        sent = self.sent.pop(message.properties.CorrelationData, None)
        if sent is not None:
            self.latencies_s.append(time.perf_counter() - sent)

    def run(self, body: bytes, header_length: int, rate_per_s: float, duration_s: float) -> dict[str, float]:
        rng = random.Random(1)
        user = [(codec.HEADER_LENGTH, str(header_length))]
        start = scheduled = time.perf_counter()
        count = 0
        while scheduled < start + duration_s:
            scheduled += rng.expovariate(rate_per_s)
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            correlation = f"{count}".encode()
            count += 1
            self.sent[correlation] = scheduled
            node = f"sim-{rng.randrange(self.nodes):05d}"
            self.client.publish(f"{self.root}/{node}/cmd/infer/{MODEL}", body, qos=1, properties=_properties(
                ResponseTopic=f"{self.reply}/{count}", CorrelationData=correlation,
                MessageExpiryInterval=10, UserProperty=user))  # fmt: skip
        deadline = time.monotonic() + 10
        while self.sent and time.monotonic() < deadline:
            time.sleep(0.05)
        lat = np.array(self.latencies_s) * 1e3
        return {"sent": count, "lost": len(self.sent), "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99))}  # fmt: skip


def start_mosquitto(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """mosquitto on a free port, with TCP_NODELAY (jobs are small and latency-bound)."""
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"
        "set_tcp_nodelay true\nmax_queued_messages 100000\n"
    )
    process = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)],
                               stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(100):  # a bench may poll; tests may not
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"mqtt://127.0.0.1:{port}"
        time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def _ingested(url: str) -> tuple[float, float, float]:
    """The gateway's reports ingested, nodes online and live gateways (itself included)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = re.search(r"^appliance_gateway_reports_ingested_total (\S+)", text, re.M)
    online = re.search(r'^appliance_gateway_nodes\{state="online"\} (\S+)', text, re.M)
    live = re.search(r"^appliance_gateway_live_gateways (\S+)", text, re.M)
    return tuple(float(m.group(1)) if m else 0.0 for m in (found, online, live))  # type: ignore[return-value]


def one_run(nodes: int, args: argparse.Namespace, scratch: Path) -> dict[str, object]:
    mosquitto, broker = start_mosquitto(scratch)
    root = f"ecp/v1/swarm{uuid.uuid4().hex[:6]}"
    connections = max(1, nodes // 1000)
    sim = subprocess.Popen([sys.executable, __file__, "sim", "--broker", broker, "--root", root, "--nodes",
        str(nodes), "--interval-s", str(args.interval_s), "--connections", str(connections)])  # fmt: skip
    gateways: list[subprocess.Popen[str]] = []
    for n in range(args.gateways):
        env = {**os.environ, "APPLIANCE_GATEWAY__TOPIC_ROOT": root.rsplit("/", 1)[0],
               "APPLIANCE_GATEWAY__SITE": root.rsplit("/", 1)[1],
               "APPLIANCE_GATEWAY__GATEWAY_ID": f"swarm-{n}",
               "APPLIANCE_GATEWAY__MAX_JOBS_IN_FLIGHT": "20000",
               "APPLIANCE_GATEWAY__DEFAULT_RATE_PER_S": "100000",
               "APPLIANCE_GATEWAY__DEFAULT_MAX_REQUESTS_IN_PROGRESS": "20000",  # the load is one buyer
               "APPLIANCE_GATEWAY__STATE_DIR": str(scratch / f"gateway{n}"),  # its key
               # one ledger for all: gateways count only peers whose keys their ledger lists
               "APPLIANCE_LEDGER__URL": str(scratch / "ledger.sqlite3"),
               "APPLIANCE_CANARY__SECOND_OPINION_PROBABILITY": "0"}  # fmt: skip
        gateways.append(subprocess.Popen([sys.executable, "-m", "appliance", "platform", "gateway",
            "--broker", broker, "--port", "0"], env=env, stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        urls = [_gateway_url(gateway) for gateway in gateways]
        for url in urls:  # every node online, and every gateway taking its 1/N of each offer
            while _ingested(url)[1:] != (float(nodes), float(len(urls))):
                time.sleep(0.5)
        url = urls[0]
        x = np.random.default_rng(0).random((1, WIDTH), dtype=np.float32)
        encoded = codec.encode_request({"x": x}, binary=True, binary_output=True)
        direct = Direct(broker, root, nodes).run(
            encoded.body(), encoded.header_length or 0, args.rate, args.duration
        )
        processes = {"gateway": [psutil.Process(gateway.pid) for gateway in gateways],
                     "mosquitto": [psutil.Process(mosquitto.pid)], "simulator": [psutil.Process(sim.pid)],
                     "bench (load)": [psutil.Process()]}  # fmt: skip
        before = {name: sum(_cpu_s(p) for p in group) for name, group in processes.items()}
        ingested_before, started = _ingested(url)[0], time.perf_counter()
        host = url.removeprefix("http://").split(":")[0]
        ports = [int(u.rsplit(":", 1)[1]) for u in urls]
        request = Prepared.infer(host, MODEL, {"x": x}, binary=True)
        with profiled(gateways[0].pid, args.profile, f"gateway-{nodes}", args.duration, gil_only=True):
            result = asyncio.run(open_loop(host, ports[0], request, rate_per_s=args.rate,
                                           duration_s=args.duration, connections=128,
                                           more_ports=ports[1:]))  # fmt: skip
        elapsed = time.perf_counter() - started
        ingested = (_ingested(url)[0] - ingested_before) / elapsed
        cpu = {name: round(100 * (sum(_cpu_s(p) for p in group) - before[name]) / elapsed, 1)
               for name, group in processes.items()}  # fmt: skip
        rss_mb = max(p.memory_info().rss for p in processes["gateway"]) / 2**20
        through = result.summary()
        answered = through["ok_per_s"] * elapsed
        cpu_ms_per_job = cpu["gateway"] * 10 * elapsed / max(answered, 1)  # % of a core x s -> ms per job
        return {"nodes": nodes, "gateways": len(gateways), "reports_per_s": round(ingested, 1),
                "jobs_per_s": through["ok_per_s"], "errors": through["errors"], "direct_lost": direct["lost"],
                "gateway_p50_ms": through["p50_ms"], "gateway_p99_ms": through["p99_ms"],
                "direct_p50_ms": round(direct["p50_ms"], 2), "direct_p99_ms": round(direct["p99_ms"], 2),
                "overhead_p50_ms": round(through["p50_ms"] - direct["p50_ms"], 2),
                "overhead_p99_ms": round(through["p99_ms"] - direct["p99_ms"], 2),
                "gateway_rss_mb": round(rss_mb, 1), "cpu_pct_of_one_core": cpu,
                "gateway_cpu_ms_per_job": round(cpu_ms_per_job, 3)}  # fmt: skip
    finally:
        for process in (*gateways, sim, mosquitto):
            process.terminate()
            process.wait(30)


def _gateway_url(gateway: subprocess.Popen[str]) -> str:
    assert gateway.stderr is not None
    for line in gateway.stderr:
        if match := READY.search(line):
            threading.Thread(target=lambda: gateway.stderr and gateway.stderr.read(), daemon=True).start()
            return f"http://{match.group(1)}:{match.group(2)}"
    raise RuntimeError("gateway exited before it was ready")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "sim"])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500.0, help="jobs/s, both phases")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--interval-s", type=float, default=2.0, help="each node's report period")
    parser.add_argument("--profile", type=Path, help="folder for py-spy's stacks of the gateway per phase")
    parser.add_argument("--gateways", type=int, default=1,
                        help="gateway processes on the one broker; the load's connections are spread "
                        "over them (CPU: all of them; RSS: the largest; profile: the first)")  # fmt: skip
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "sim":
        simulate(args.broker, args.root, args.nodes[0], args.interval_s, args.connections)
        return
    os.nice(19)  # a shared box: everyone else's work first (children inherit it)
    for nodes in args.nodes:
        runs = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="swarm-") as scratch:
                runs.append(one_run(nodes, args, Path(scratch)))
            print(orjson.dumps(runs[-1]).decode(), flush=True)
        keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and k != "nodes"]
        summary = {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),  # type: ignore[misc]
                       "max": max(r[k] for r in runs)} for k in keys}  # type: ignore[misc]  # fmt: skip
        cpu = {name: statistics.median(r["cpu_pct_of_one_core"][name] for r in runs)  # type: ignore[index]
               for name in runs[0]["cpu_pct_of_one_core"]}  # type: ignore[union-attr]  # fmt: skip
        report("swarm", {"nodes": nodes, "runs": args.runs, "rate": args.rate, "duration_s": args.duration,
                         "interval_s": args.interval_s, "cores": os.cpu_count(), "median_cpu_pct": cpu,
                         **summary})  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
