"""`python -m appliance ...` as a real subprocess: its output read line by line, killed if still running."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

READY = re.compile(r"ready on http://([\d.]+):(\d+)")


@dataclass
class Process:
    popen: subprocess.Popen[str]
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
    )
    env.update({f"APPLIANCE_{key.upper()}": str(value) for key, value in settings.items()})
    return env


@contextmanager
def appliance(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[Process]:
    popen = subprocess.Popen(
        [sys.executable, "-m", "appliance", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env or environment(tmp_path),
    )
    process = Process(popen)

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
        if popen.poll() is None:
            popen.send_signal(signal.SIGKILL)
        popen.wait(30)
        reader.join(30)
        assert popen.stdout is not None
        popen.stdout.close()
