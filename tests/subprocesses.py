"""`python -m appliance ...` as a real subprocess: its output read line by line, killed if still running."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.system.admin import admin_request

READY = re.compile(r"ready on http://([\d.]+):(\d+)")
HELD = re.compile(r"^held: (\S+) batch of (\d+) request")
HELD_SERVE = Path(__file__).with_name("held_serve.py")


@dataclass
class Process:
    popen: subprocess.Popen[str]
    runtime_dir: Path | None = None  # where its admin socket is, when the test knows
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float = 60.0) -> re.Match[str]:
        """Read output lines until one matches; fail with everything seen if the process ends first."""
        while True:
            try:
                line = self.lines.get(timeout=timeout_s)
            except queue.Empty:
                pytest.fail(f"no line matched {pattern.pattern!r} in {timeout_s}s:\n" + "".join(self.seen))
            if line is None:
                pytest.fail(f"process ended before {pattern.pattern!r}:\n" + "".join(self.seen))
            self.seen.append(line)
            if match := pattern.search(line):
                return match

    def url(self) -> str:
        host, port = self.wait_for(READY).groups()
        return f"http://{host}:{port}"

    def admitted(self, model: str) -> int:
        """Requests to `model` the service has admitted and not answered (from its admin socket)."""
        assert self.runtime_dir is not None, "a process started by `appliance()` knows its runtime dir"
        status = admin_request(self.runtime_dir / "admin.sock", "status")
        return int(status["models"][model].get("inflight", 0))

    def wait_admitted(self, model: str, count: int, timeout_s: float = 60.0) -> None:
        """Until `count` requests to `model` are admitted (e.g. queued behind a held batch)."""
        deadline_s = time.monotonic() + timeout_s
        while (admitted := self.admitted(model)) < count:
            if time.monotonic() > deadline_s:
                pytest.fail(f"{admitted} of {count} requests to {model} admitted:\n" + "".join(self.seen))
            time.sleep(0.01)

    def release(self) -> None:
        """Let one held batch run (a process started with `held=`)."""
        assert self.popen.stdin is not None, "started without held="
        self.popen.stdin.write("go\n")
        self.popen.stdin.flush()


def environment(tmp_path: Path, **settings: str) -> dict[str, str]:
    """This environment without appliance or systemd variables; directories under tmp_path (kept across
    restarts of the same test); `settings` as APPLIANCE_ variables (scheduler__instances="2")."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    env.update(
        STATE_DIRECTORY=str(tmp_path / "state"),
        CACHE_DIRECTORY=str(tmp_path / "cache"),
        RUNTIME_DIRECTORY=str(tmp_path / "run"),
        APPLIANCE_SCHEDULER__INSTANCES="1",
        # idle priority starves pool work on a busy box; test_replica and test_scheduler pin that default
        APPLIANCE_SCHEDULER__POOL_CPU_PRIORITY="normal",
        APPLIANCE_SERVER__GRPC_PORT="0",  # a free port, not Triton's 8001: tests run side by side
    )
    env.update({f"APPLIANCE_{key.upper()}": str(value) for key, value in settings.items()})
    return env


def command(*args: str, held: str | None = None) -> list[str]:
    """`python -m appliance ARGS`, or with `held`, the same through tests/held_serve.py (which needs
    TEST_HOLD_MODEL=<held> in the environment and a stdin to read releases from)."""
    if held is None:
        return [sys.executable, "-m", "appliance", *args]
    return [sys.executable, str(HELD_SERVE), *args]


@contextmanager
def appliance(
    args: list[str], tmp_path: Path, env: dict[str, str] | None = None, *, held: str | None = None
) -> Iterator[Process]:
    """`python -m appliance ARGS` with its output read line by line; with `held`, every batch of that
    model waits at the worker until `Process.release()` (tests/held_serve.py)."""
    environ = dict(env or environment(tmp_path))
    if held is not None:
        environ["TEST_HOLD_MODEL"] = held
    popen = subprocess.Popen(
        command(*args, held=held),
        stdin=subprocess.PIPE if held is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ,
    )
    runtime_dir = environ.get("RUNTIME_DIRECTORY")
    process = Process(popen, Path(runtime_dir) if runtime_dir else None)

    def pump() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            process.lines.put(line)
        process.lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield process
    finally:
        if popen.stdin is not None:
            with contextlib.suppress(OSError):
                popen.stdin.close()  # releases whatever is still held
        if popen.poll() is None:
            popen.send_signal(signal.SIGKILL)
        popen.wait(30)
        reader.join(30)
        assert popen.stdout is not None
        popen.stdout.close()
