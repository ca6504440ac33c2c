"""Shared bench plumbing: start `appliance serve` in a subprocess, raw ORT baselines, reporting."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"ready on http://([\d.]+):(\d+)")
GRPC = re.compile(r"KServe v2 gRPC on ([\d.]+):(\d+)")
SERVE = [sys.executable, "-m", "appliance", "serve"]


@dataclass
class Server:
    host: str
    port: int
    process: subprocess.Popen[str]
    grpc_port: int | None = None  # KServe v2 gRPC, on the same host


@contextmanager
def serve(
    repository: Path, *, env: dict[str, str] | None = None, timeout_s: float = 300.0
) -> Iterator[Server]:
    """Run `python -m appliance serve --port 0` until it logs ready; stop it with SIGTERM afterwards."""
    scratch = tempfile.TemporaryDirectory(prefix="appliance-bench-")  # its own admin socket
    environment = {"RUNTIME_DIRECTORY": scratch.name, **os.environ, **(env or {})}
    process = subprocess.Popen(
        [*SERVE, "--model-repository", str(repository), "--port", "0", "--grpc-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    match = None
    grpc_port = None
    lines = []
    while match is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("server exited:\n" + "".join(lines))
        lines.append(line)
        match = READY.search(line)
        if found := GRPC.search(line):
            grpc_port = int(found.group(2))
    if match is None:
        raise RuntimeError("server did not become ready:\n" + "".join(lines))
    log_path = os.environ.get("BENCH_SERVER_LOG")  # keep what the server logs, to look into a run
    log_file = open(log_path, "a") if log_path else None  # noqa: SIM115 (closed by the drain thread)

    def keep_draining() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            if log_file is not None:
                log_file.write(line)
        if log_file is not None:
            log_file.close()

    if log_file is not None:
        log_file.writelines(lines)
    drain = threading.Thread(target=keep_draining, daemon=True)
    drain.start()
    try:
        yield Server(match.group(1), int(match.group(2)), process, grpc_port)
    finally:
        process.terminate()
        process.wait(60)
        scratch.cleanup()


class RawOrt:
    """A bare ORT session in one layout: `threads` intra-op threads, called from `callers` Python threads
    at once (ORT releases the GIL); spinning only where one caller has the cores to itself."""

    def __init__(
        self, model_path: Path, inputs: dict[str, np.ndarray], *, threads: int, callers: int
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0" if callers > 1 else "1")
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.inputs, self.callers = inputs, callers

    def rows_per_s(self, rows: int, duration_s: float) -> tuple[float, float]:
        """Rows/s at batch `rows` over `duration_s`, and the CPU cores this process used meanwhile."""
        feed = {name: np.repeat(array, rows, axis=0) for name, array in self.inputs.items()}
        self.session.run(None, feed)
        counts = [0] * self.callers
        stop_at = time.perf_counter() + duration_s
        workers = [
            threading.Thread(target=_run_until, args=(self.session, feed, rows, stop_at, counts, i))
            for i in range(self.callers)
        ]
        started, cpu_started = time.perf_counter(), time.process_time()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed_s = time.perf_counter() - started
        return sum(counts) / elapsed_s, (time.process_time() - cpu_started) / elapsed_s


def raw_ort_throughput(
    model_path: Path,
    inputs: dict[str, np.ndarray],
    *,
    duration_s: float = 3.0,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
) -> dict[str, float]:
    """Best rows/s of a bare ORT session, over thread layouts and batch sizes, measured now.

    Layouts: one session with all cores, and one 1-thread session per core run from
    that many Python threads (ORT releases the GIL). Batch sizes 1, 8 and 32.
    """
    cores = len(os.sched_getaffinity(0))
    best: dict[str, float] = {"rows_per_s": 0.0}
    for threads, callers in sorted({(cores, 1), (1, cores)}):
        raw = RawOrt(model_path, inputs, threads=threads, callers=callers)
        for rows in batch_sizes:
            rate, cpu_cores = raw.rows_per_s(rows, duration_s)  # cpu_cores < cores on a busy box
            if rate > best["rows_per_s"]:
                best = {"rows_per_s": rate, "batch_rows": rows, "threads": threads, "callers": callers,
                        "cpu_cores": round(cpu_cores, 2)}  # fmt: skip
    return best


def _run_until(
    session: ort.InferenceSession,
    feed: dict[str, np.ndarray],
    rows: int,
    stop_at: float,
    counts: list[int],
    index: int,
) -> None:
    while time.perf_counter() < stop_at:
        session.run(None, feed)
        counts[index] += rows


def raw_ort_latency_ms(model_path: Path, inputs: dict[str, np.ndarray], runs: int = 50) -> float:
    """Median single-request latency of a bare ORT session using every core."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    session.run(None, inputs)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, inputs)
        samples.append(time.perf_counter() - started)
    return float(np.median(samples) * 1e3)


SCHED_CHOICES = ("normal", "idle")
DEFAULT_MODEL = "surface_defect_224_u8"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a broker or server a bench starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_parser(doc: str | None, *, duration_s: float) -> argparse.ArgumentParser:
    """The arguments every bench takes: the repository, the model and how long each phase measures."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--duration", type=float, default=duration_s)
    return parser


def add_flood_arguments(parser: argparse.ArgumentParser, *, sched_help: str) -> None:
    """What the two interference benches share: the line's share of capacity, the flood's scheduling."""
    parser.add_argument("--line-share", type=float, default=0.3)
    parser.add_argument("--flood-sched", choices=SCHED_CHOICES, default="normal", help=sched_help)


def set_sched(sched: str) -> None:
    """Run the calling process (threads it starts inherit it) at SCHED_IDLE: CPU the node leaves only."""
    if sched == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def report(name: str, figures: dict[str, object]) -> None:
    """Print one JSON line per result and append it to bench/results/<name>.jsonl (git-ignored)."""
    line = json.dumps({"bench": name, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures})
    print(line, flush=True)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    with (results / f"{name}.jsonl").open("a") as stream:
        stream.write(line + "\n")
