"""Local clients vs raw ONNX Runtime, in one run: HTTP binary, shared memory and gRPC (issue 14 item 5).

    .venv/bin/python bench/local_clients.py [--model surface_defect_224] [--clients 32] [--duration 10]

For each transport: served rows/s at N closed-loop clients as a ratio of the best raw ORT rows/s (2
callers x 1 thread or 1 x 2 threads, batch 1, 8 or 32; measured before and after, the better counts)
and of raw ORT measured again just before the phase (on a shared box the other tenants come and go);
then the one-client p50 minus raw ORT's batch-1 p50 (one session, every core), also measured just
before, with the server's own compute time per batch of one. `--order` rotates the transports across
runs, so that none is always measured first. Shared-memory clients
each own a region holding their input and outputs, registered once, as a camera process would; the
input is written once (a camera captures into it), so a request carries only its JSON header. gRPC
clients each have their own channel (HTTP/2 connection) and send pre-serialised ModelInferRequests,
the HTTP generator pre-encoded bodies: both clients cost as little as they can.

`--slices K` splits each N-client phase into K slices, each right after a raw ORT slice as long
(raw's best layout from the start): on a shared VM whose speed drifts within minutes, the median of
the K pairs' ratios is the figure to trust (`vs_raw_ort_interleaved`; `--profile` is not taken then).

Where the time goes: during each N-client phase, CPU seconds of the server by thread (the event
loop; the workers, where ONNX Runtime computes; the rest: gRPC's threads, decode threads), of this
process (the load generator) and of everything else on the box, as shares of the cores.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RawOrt, bench_parser, raw_ort_latency_ms, raw_ort_throughput, report, serve
from cpu_split import CpuSplit, profiled
from loadgen import Prepared, Result, closed_loop
from throughput import sample_input

from appliance.server.grpc import messages
from appliance.tensors import oip_datatype

DEADLINE_US = 2_000_000  # parameters.timeout: this measures throughput; the SLO has its own bench
ALIGN_BYTES = 64


TRANSPORTS = ("http_binary", "shared_memory", "grpc")


def main() -> None:
    parser = bench_parser(__doc__, duration_s=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--order", default=",".join(TRANSPORTS), help="transports in the order measured (rotate across runs)"
    )
    parser.add_argument(
        "--slices",
        type=int,
        default=0,
        help="split each N-client phase into this many slices, each after a raw ORT slice as long",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="folder for py-spy's collapsed stacks of the server in each N-client phase",
    )
    parser.set_defaults(model="surface_defect_224")
    args = parser.parse_args()
    order = args.order.split(",")
    assert sorted(order) == sorted(TRANSPORTS), f"--order takes {', '.join(TRANSPORTS)}"
    model_dir = args.repository / args.model
    model_path = sorted(model_dir.glob("*/model.onnx"))[-1]
    inputs = sample_input(model_dir)
    outputs = _output_bytes(model_path, inputs)

    before = raw_ort_throughput(model_path, inputs, duration_s=args.duration / 2)
    figures: dict[str, Any] = {"model": args.model, "clients": args.clients, "order": order}
    with serve(args.repository) as server, ExitStack() as regions:
        assert server.grpc_port is not None
        shm = _shared_memory(server.host, server.port, args.model, inputs, outputs, args.clients, regions)
        loads: dict[str, Callable[[int, float], Coroutine[Any, Any, Result]]] = {
            "http_binary": _http(server.host, server.port, args.model, inputs),
            "shared_memory": lambda clients, duration_s: closed_loop(
                server.host, server.port, shm[:clients], clients=clients, duration_s=duration_s
            ),
            "grpc": _grpc(server.host, server.grpc_port, args.model, inputs),
        }
        config = httpx.get(f"http://{server.host}:{server.port}/v2/models/{args.model}/config").json()
        figures["served_layout"] = {k: config["appliance"][k] for k in ("instances", "threads_per_call")}
        for name in order:
            figures[name] = _measure(server, loads[name], name, args, model_path, inputs, before)
    after = raw_ort_throughput(model_path, inputs, duration_s=args.duration / 2)
    best = max(before, after, key=lambda found: found["rows_per_s"])
    figures["raw_ort"] = best
    figures["raw_ort_before_after"] = [round(before["rows_per_s"], 1), round(after["rows_per_s"], 1)]
    for name in order:
        found = figures[name]
        found["vs_raw_ort"] = round(found["ok_per_s"] / best["rows_per_s"], 3)
        found["vs_raw_ort_adjacent"] = round(found["ok_per_s"] / found["raw_ort_adjacent"]["rows_per_s"], 3)
        # The same per CPU second spent (server and generator against raw ORT's own): what the
        # transport costs, whatever share of the box other people's work took meanwhile.
        raw_per_cpu_s = best["rows_per_s"] / best["cpu_cores"]
        spent = sum(v for k, v in found["cpu_cores"].items() if k != "others_on_box")
        found["per_cpu_s_vs_raw_ort"] = round(found["ok_per_s"] / spent / raw_per_cpu_s, 3)
    figures["grpc_vs_http_binary"] = round(
        figures["grpc"]["ok_per_s"] / figures["http_binary"]["ok_per_s"], 3
    )
    if args.slices:
        interleaved = {name: figures[name]["vs_raw_ort_interleaved"]["median"] for name in order}
        ratio = interleaved["grpc"] / interleaved["http_binary"]
        figures["grpc_vs_http_binary_interleaved"] = round(ratio, 3)
    report("local_clients", figures)


def _measure(
    server: Any, load: Any, name: str, args: Any, model_path: Path, inputs: dict[str, np.ndarray], before: Any
) -> dict[str, Any]:
    """One transport: raw ORT just before it (the box's other tenants come and go), N clients with
    the cores' split, then raw ORT's batch-1 p50 and one client's p50 with the server's compute time.

    With `--slices K`, the N-client phase is K slices, each right after a slice of raw ORT of the same
    length in its best layout: the pairs' ratios (median, min-max) are what a box whose speed drifts by
    a third within minutes (a shared VM) still measures fairly."""
    rows = (int(before["batch_rows"]),)
    adjacent = raw_ort_throughput(model_path, inputs, duration_s=args.duration / 2, batch_sizes=rows)
    if args.slices:
        found = _interleaved(server, load, args, model_path, inputs, before)
        found["raw_ort_adjacent"] = adjacent
    else:
        split = CpuSplit(server.process.pid)
        with profiled(server.process.pid, args.profile, name, args.duration):
            many = asyncio.run(load(args.clients, args.duration))
        found = {**many.summary(), "statuses": {str(k): n for k, n in many.statuses.items()}}
        found |= {"cpu_cores": split.shares(), "raw_ort_adjacent": adjacent}
    raw_p50_ms = raw_ort_latency_ms(model_path, inputs, runs=300)
    computed = _batch_one_compute(server.host, server.port, args.model)
    one = asyncio.run(load(1, args.duration / 2))
    ended = _batch_one_compute(server.host, server.port, args.model)
    count, compute_s, queued, queue_s = (
        after - before for after, before in zip(ended, computed, strict=True)
    )
    found["one_client"] = {
        **one.summary(),
        "server_compute_ms": round(compute_s / max(count, 1) * 1e3, 3),
        "server_queue_ms": round(queue_s / max(queued, 1) * 1e3, 3),  # the batcher's wait, mostly
        "raw_ort_batch1_p50_ms": round(raw_p50_ms, 3),
        "p50_over_raw_ms": round(one.percentile_ms(50) - raw_p50_ms, 3),
    }
    return found


def _interleaved(
    server: Any, load: Any, args: Any, model_path: Path, inputs: dict[str, np.ndarray], before: Any
) -> dict[str, Any]:
    """K pairs of (raw ORT slice, N-client slice); CPU shares averaged over the served slices."""
    raw = RawOrt(model_path, inputs, threads=int(before["threads"]), callers=int(before["callers"]))
    slice_s = args.duration / args.slices
    served, ratios, raw_rates = Result(), [], []
    shares: dict[str, float] = {}
    for _ in range(args.slices):
        raw_rate, _ = raw.rows_per_s(int(before["batch_rows"]), slice_s)
        split = CpuSplit(server.process.pid)
        part = asyncio.run(load(args.clients, slice_s))
        for key, value in split.shares().items():
            shares[key] = shares.get(key, 0.0) + value / args.slices
        served.latencies_s += part.latencies_s
        for status, count in part.statuses.items():
            served.statuses[status] = served.statuses.get(status, 0) + count
        served.elapsed_s += part.elapsed_s
        raw_rates.append(raw_rate)
        ratios.append(part.rate / raw_rate)
    found = {**served.summary(), "statuses": {str(k): n for k, n in served.statuses.items()}}
    found["cpu_cores"] = {key: round(value, 2) for key, value in shares.items()}
    found["vs_raw_ort_interleaved"] = {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
        "slices": args.slices,
        "raw_rows_per_s": [round(r) for r in raw_rates],
    }
    return found


def _batch_one_compute(host: str, port: int, model: str) -> tuple[float, float, float, float]:
    """Batches of one row the server has run and their ONNX Runtime seconds; requests that waited
    in the queue and their seconds there (the server's statistics)."""
    stats = httpx.get(f"http://{host}:{port}/v2/models/{model}/stats", timeout=30).json()["model_stats"][0]
    queue = stats["inference_stats"]["queue"]
    for batch in stats["batch_stats"]:
        if batch["batch_size"] == 1:
            ran = batch["compute_infer"]
            return ran["count"], ran["ns"] / 1e9, queue["count"], queue["ns"] / 1e9
    return 0.0, 0.0, queue["count"], queue["ns"] / 1e9


def _output_bytes(model_path: Path, inputs: dict[str, np.ndarray]) -> dict[str, int]:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return {name: array.nbytes for name, array in zip(names, session.run(None, inputs), strict=True)}


def _http(host: str, port: int, model: str, inputs: dict[str, np.ndarray]) -> Any:
    request = Prepared.infer(host, model, inputs, binary=True, parameters={"timeout": DEADLINE_US})

    def load(clients: int, duration_s: float) -> Coroutine[Any, Any, Result]:
        return closed_loop(host, port, request, clients=clients, duration_s=duration_s)

    return load


def _shared_memory(
    host: str,
    port: int,
    model: str,
    inputs: dict[str, np.ndarray],
    outputs: dict[str, int],
    clients: int,
    regions: ExitStack,
) -> list[Prepared]:
    """One region per client (its inputs, then room for its outputs), registered; their requests."""
    from multiprocessing import shared_memory

    sizes = {**{n: a.nbytes for n, a in inputs.items()}, **outputs}
    offsets, total = {}, 0
    for name, size in sizes.items():
        offsets[name] = total
        total += -(-size // ALIGN_BYTES) * ALIGN_BYTES
    requests = []
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as http:
        for index in range(clients):
            segment = shared_memory.SharedMemory(create=True, size=total)
            regions.callback(segment.unlink)
            regions.callback(segment.close)
            for name, array in inputs.items():
                segment.buf[offsets[name] : offsets[name] + array.nbytes] = array.tobytes()
            region = f"client{index}"
            body = {"key": f"/{segment.name.lstrip('/')}", "offset": 0, "byte_size": total}
            http.post(f"/v2/systemsharedmemory/region/{region}/register", json=body).raise_for_status()
            document = {
                "parameters": {"timeout": DEADLINE_US},
                "inputs": [
                    {"name": n, "datatype": oip_datatype(a.dtype), "shape": list(a.shape),
                     "parameters": _place(region, offsets[n], a.nbytes)}
                    for n, a in inputs.items()
                ],
                "outputs": [
                    {"name": n, "parameters": _place(region, offsets[n], size)} for n, size in outputs.items()
                ],
            }  # fmt: skip
            body_bytes = orjson.dumps(document)
            head = (
                f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body_bytes)}"
            )
            requests.append(
                Prepared((head + "\r\nContent-Type: application/json\r\n\r\n").encode() + body_bytes)
            )
    return requests


def _place(region: str, offset: int, byte_size: int) -> dict[str, Any]:
    return {
        "shared_memory_region": region,
        "shared_memory_offset": offset,
        "shared_memory_byte_size": byte_size,
    }


def _grpc(host: str, port: int, model: str, inputs: dict[str, np.ndarray]) -> Any:
    request = messages.ModelInferRequest(model_name=model)
    request.parameters["timeout"].int64_param = DEADLINE_US
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=oip_datatype(array.dtype), shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    wire = request.SerializeToString()
    method = f"/{messages.SERVICE}/ModelInfer"

    async def load(clients: int, duration_s: float, warmup_s: float = 1.0) -> Result:
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
        channels = [grpc.aio.insecure_channel(f"{host}:{port}", options=options) for _ in range(clients)]
        result = Result()
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

        async def client(channel: grpc.aio.Channel) -> None:
            call = channel.unary_unary(method)
            while (now := time.perf_counter()) < stop_at:
                try:
                    await call(wire, timeout=60)
                    status = 200
                except grpc.aio.AioRpcError as exc:
                    status = exc.code().name  # type: ignore[assignment]
                if now >= measure_from:
                    result.record(status, time.perf_counter() - now)

        try:
            await asyncio.gather(*(client(c) for c in channels))
        finally:
            for channel in channels:
                await channel.close()
        result.elapsed_s = time.perf_counter() - measure_from
        return result

    return load


if __name__ == "__main__":
    main()
