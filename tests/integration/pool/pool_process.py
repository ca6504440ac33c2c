"""`python -m appliance serve` as a real subprocess, for what only a process can show (SIGKILL, restarts)."""

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
class Node:
    popen: subprocess.Popen[str]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float = 60.0) -> re.Match[str]:
        """Read output until a line matches; fail with all the output if the process ends first."""
        while True:
            try:
                line = self.lines.get(timeout=timeout_s)
            except queue.Empty:
                pytest.fail(f"no line matched {pattern.pattern!r} in {timeout_s}s:\n" + "".join(self.output))
            if line is None:
                pytest.fail(f"the node ended before {pattern.pattern!r}:\n" + "".join(self.output))
            self.output.append(line)
            if match := pattern.search(line):
                return match


def node_environment(tmp_path: Path, pool: dict[str, object]) -> dict[str, str]:
    """The environment of a node whose state directory survives restarts (same tmp_path)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    env.update(
        STATE_DIRECTORY=str(tmp_path / "state"),
        CACHE_DIRECTORY=str(tmp_path / "cache"),
        RUNTIME_DIRECTORY=str(tmp_path / "run"),
        APPLIANCE_SCHEDULER__INSTANCES="1",
    )
    env.update({f"APPLIANCE_POOL__{key.upper()}": str(value) for key, value in pool.items()})
    return env


@contextmanager
def node_process(repository: Path, env: dict[str, str]) -> Iterator[Node]:
    popen = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "--model-repository", str(repository), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    node = Node(popen)

    def pump() -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            node.lines.put(line)
        node.lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield node
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGKILL)
        popen.wait(30)
        reader.join(30)
        assert popen.stdout is not None
        popen.stdout.close()
