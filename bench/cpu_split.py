"""Where the cores went during a bench phase: the server by thread, this process, everything else.

Per-thread utime + stime of the server from /proc, each thread named by py-spy (`py-spy dump --json`
maps OS thread ids to Python thread names; `pip install py-spy`): MainThread runs the event loop,
worker-<model>-<i> (and pool ones) are the workers (ONNX Runtime computes on them), asyncio_<i> decode
big bodies; threads Python does not know are grpcio's (by their names) or native (ONNX Runtime's intra-op
pools, busy where a session has 2+ threads per call). Without py-spy, the main thread is told from the
rest only. This process's CPU time is the load generator's, and
the box's busy time (/proc/stat) less both is everything else on the box (other people's work).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def thread_names(pid: int) -> dict[int, str]:
    """OS thread id -> Python thread name, for the threads Python knows (empty without py-spy)."""
    try:
        dump = subprocess.run([PY_SPY, "dump", "--pid", str(pid), "--json"], capture_output=True, timeout=60)
        return {t["os_thread_id"]: t["thread_name"] for t in json.loads(dump.stdout) if t.get("os_thread_id")}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


SERVER_KINDS = ("event_loop", "workers", "decode_threads", "other_python", "grpc_threads", "native")


def _kind(tid: int, pid: int, names: dict[int, str], comm: str) -> str:
    name = names.get(tid, "")
    if tid == pid or name == "MainThread":
        return "event_loop"
    if name.startswith(("worker-", "line-", "pool-")):
        return "workers"
    if name.startswith("asyncio_"):
        return "decode_threads"
    if name:
        return "other_python"
    # Threads Python does not know: grpcio names its own (event_engine, grpc_*); ONNX Runtime's intra-op
    # pool threads keep the process's name, and are most of the rest (a session with 2+ threads per call).
    return "grpc_threads" if comm.startswith(("event_engine", "grpc")) else "native"


class CpuSplit:
    """Counters taken now; `shares()` reads them again and returns the differences as cores."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.names = thread_names(server_pid)
        self.started = self._sample()

    def _sample(self) -> dict[str, float]:
        found = dict.fromkeys(SERVER_KINDS, 0.0)
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # a thread that ended meanwhile
            fields = stat[stat.rindex(")") + 2 :].split()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            kind = _kind(int(task.name), self.pid, self.names, comm)
            found[kind] += (int(fields[11]) + int(fields[12])) * TICK_S
        found["generator"] = time.process_time()
        with open("/proc/stat") as stat:
            user, nice, system, _, _, irq, softirq, steal = map(int, stat.readline().split()[1:9])
        found["box_busy"] = (user + nice + system + irq + softirq + steal) * TICK_S
        found["wall"] = time.monotonic()
        return found

    def shares(self) -> dict[str, float]:
        ended = self._sample()
        wall_s = ended.pop("wall") - self.started["wall"]
        used = {key: (value - self.started[key]) / wall_s for key, value in ended.items()}
        server = sum(used[k] for k in SERVER_KINDS)
        used["others_on_box"] = max(0.0, used.pop("box_busy") - server - used["generator"])
        return {key: round(value, 2) for key, value in used.items()}


@contextlib.contextmanager
def profiled(
    pid: int, folder: Path | None, name: str, duration_s: float, *, gil_only: bool = False
) -> Iterator[None]:
    """py-spy's collapsed stacks of `pid`, by thread, over the block (nothing when `folder` is None);
    sampling costs the box CPU, so figures from a profiled run are not the run's figures. `gil_only`
    samples only the thread holding the GIL: for a pure-Python process whose threads contend for it,
    where the interpreter's time goes (a thread waiting for the GIL otherwise looks busy)."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        PY_SPY,
        "record",
        "--pid",
        str(pid),
        "--threads",
        "--nonblocking",
        "--format",
        "raw",
        "--rate",
        "200",
        "--duration",
        str(int(duration_s + 1)),
        "--output",
        str(folder / f"{name}.txt"),
        *(["--gil"] if gil_only else []),
    ]
    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        yield
    finally:
        recorder.wait(120)
