"""The sd_notify contract of `appliance serve`, heard on a fake NOTIFY_SOCKET as systemd would hear it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import modelzoo
import numpy as np
import pytest
from subprocesses import command

from appliance.protocol import codec

Message = list[str]  # the KEY=VALUE fields of one datagram
WAIT_S = 60.0
READY_LINE = re.compile(r"ready on (http://[\d.]+:\d+)")


class Manager:
    """systemd's side: a bound datagram socket and, in arrival order, every message it received."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[Message] = []
        self._changed = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)  # how often the receiver checks whether it should stop
        self._is_closing = threading.Event()
        self._receiver = threading.Thread(target=self._receive, name="notify-socket", daemon=True)
        self._receiver.start()

    def _receive(self) -> None:
        while not self._is_closing.is_set():
            try:
                datagram = self._sock.recv(65536)
            except TimeoutError:
                continue
            with self._changed:
                self.messages.append(datagram.decode().split("\n"))
                self._changed.notify_all()

    def wait_for(self, matches: Callable[[Message], bool], *, after: int = 0, what: str = "") -> int:
        """Index of the first message at or after `after` that matches; fail if none comes in time."""
        deadline_s = time.monotonic() + WAIT_S
        with self._changed:
            while True:
                for index in range(after, len(self.messages)):
                    if matches(self.messages[index]):
                        return index
                remaining_s = deadline_s - time.monotonic()
                if remaining_s <= 0:
                    pytest.fail(
                        f"no {what or 'matching'} message in {WAIT_S} s; heard {self.messages[after:]}"
                    )
                self._changed.wait(remaining_s)

    def close(self) -> None:
        self._is_closing.set()
        self._receiver.join(WAIT_S)
        self._sock.close()


def is_ready(message: Message) -> bool:
    return "READY=1" in message


def is_ping(message: Message) -> bool:
    return message == ["WATCHDOG=1"]


def is_hung(message: Message) -> bool:
    return len(message) == 1 and message[0].startswith("STATUS=worker hung: ")


def is_stopping(message: Message) -> bool:
    return "STOPPING=1" in message


@contextmanager
def serving(
    tmp_path: Path, repo: Path, watchdog_usec: int, held: str | None = None, **settings: str
) -> Iterator[tuple[Manager, Callable[[], str], subprocess.Popen[bytes]]]:
    """`python -m appliance serve` notifying a Manager; yields it, the URL reader and the process.

    With `held`, that model's batches wait at the worker until a line is written to the process's
    stdin (tests/held_serve.py)."""
    manager = Manager(tmp_path / "notify.sock")
    log_path = tmp_path / "serve.log"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("APPLIANCE_", "NOTIFY_", "WATCHDOG_", "LISTEN_"))
    }
    env.update(
        NOTIFY_SOCKET=str(manager.path),
        WATCHDOG_USEC=str(watchdog_usec),
        STATE_DIRECTORY=str(tmp_path / "state"),
        CACHE_DIRECTORY=str(tmp_path / "cache"),
        RUNTIME_DIRECTORY=str(tmp_path / "run"),
        APPLIANCE_SCHEDULER__INSTANCES="1",
        **settings,
    )
    if held is not None:
        env["TEST_HOLD_MODEL"] = held
    args = command(
        "serve", "--model-repository", str(repo), "--port", "0",
        "--grpc-port", "0",
        held=held,
    )  # fmt: skip
    stdin = subprocess.PIPE if held is not None else subprocess.DEVNULL
    with log_path.open("wb") as log:  # a file, not a pipe: a hung worker logs every watchdog period
        popen = subprocess.Popen(args, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, env=env)

    def url() -> str:
        """The service's URL, from its log; call it after READY=1, which follows that log line."""
        match = READY_LINE.search(log_path.read_text())
        assert match, log_path.read_text()
        return match.group(1)

    try:
        yield manager, url, popen
    finally:
        if popen.stdin is not None:
            with contextlib.suppress(OSError):
                popen.stdin.close()  # releases whatever is still held
        if popen.poll() is None:
            popen.kill()
        popen.wait(WAIT_S)
        manager.close()


def test_loading_then_ready_then_watchdog_then_stopping_on_sigterm(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    modelzoo.write(repo, "fixed", modelzoo.fixed_batch())
    with serving(tmp_path, repo, watchdog_usec=100_000) as (manager, url, popen):
        ready = manager.wait_for(is_ready, what="READY=1")
        assert httpx.get(f"{url()}/v2/health/ready").status_code == 200
        before = [field for message in manager.messages[:ready] for field in message]
        loading = [f for f in before if f.startswith(("STATUS=loading", "EXTEND_TIMEOUT_USEC="))]
        assert loading == [
            "STATUS=loading batchable",
            "EXTEND_TIMEOUT_USEC=630000000",
            "STATUS=loading fixed",
            "EXTEND_TIMEOUT_USEC=630000000",
        ]
        assert "READY=1" not in before
        assert manager.messages[ready] == ["READY=1", "STATUS=2 model(s) ready"]
        ping = manager.wait_for(is_ping, after=ready + 1, what="WATCHDOG=1")
        manager.wait_for(is_ping, after=ping + 1, what="second WATCHDOG=1")

        popen.send_signal(signal.SIGTERM)
        stopping = manager.wait_for(is_stopping, after=ready + 1, what="STOPPING=1")
        assert manager.messages[stopping] == ["STOPPING=1", "STATUS=draining"]
        assert popen.wait(WAIT_S) == 0
    assert sum(is_ready(m) for m in manager.messages) == 1


def test_sigterm_while_loading_loads_no_more_models_and_never_says_ready(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name in ("a", "b", "c"):
        modelzoo.write(repo, name, modelzoo.batchable())
    with serving(tmp_path, repo, watchdog_usec=0) as (manager, _, popen):
        manager.wait_for(lambda m: "STATUS=loading a" in m, what="STATUS=loading a")
        popen.send_signal(signal.SIGTERM)
        stopping = manager.wait_for(is_stopping, what="STOPPING=1")
        assert manager.messages[stopping] == ["STOPPING=1", "STATUS=stopping (SIGTERM) while starting"]
        assert popen.wait(WAIT_S) == 0
    after = [field for message in manager.messages[stopping + 1 :] for field in message]
    assert not any(f.startswith(("STATUS=loading", "EXTEND_TIMEOUT_USEC=")) for f in after), after
    assert not any(is_ready(m) for m in manager.messages), manager.messages
    assert "stop requested (SIGTERM) while loading models" in (tmp_path / "serve.log").read_text()


def test_watchdog_pings_stop_while_a_worker_hangs_and_resume_after(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="slo_p99_ms = 600000.0\n")
    # The batch is held at the worker until the test lets it go: a hang as long as the test needs,
    # whatever the watchdog period or the box's load.
    hang = {"APPLIANCE_SYSTEM__WATCHDOG_HANG_S": "0.05"}
    with serving(tmp_path, repo, watchdog_usec=100_000, held="batchable", **hang) as (manager, url, popen):
        ready = manager.wait_for(is_ready, what="READY=1")
        manager.wait_for(is_ping, after=ready + 1, what="WATCHDOG=1 before the request")
        encoded = codec.encode_request({"x": np.ones((1, 4), np.float32)})
        headers = {codec.HEADER_LENGTH: str(encoded.header_length)}
        answers: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    f"{url()}/v2/models/batchable/infer",
                    content=encoded.body(),
                    headers=headers,
                    timeout=WAIT_S,
                )
            )
        )
        request.start()
        hung = manager.wait_for(is_hung, after=ready + 1, what="STATUS=worker hung")
        assert "'batchable': [0]" in manager.messages[hung][0]
        # Three more watchdog periods with the worker still stuck: each says so, none pings.
        last = hung
        for _ in range(3):
            last = manager.wait_for(is_hung, after=last + 1, what="STATUS=worker hung, again")
        assert not any(is_ping(m) for m in manager.messages[hung : last + 1]), manager.messages[hung:]
        assert answers == []  # still held
        assert popen.stdin is not None
        popen.stdin.write(b"go\n")  # the batch runs and the request is answered
        popen.stdin.flush()
        request.join(WAIT_S)
        assert [a.status_code for a in answers] == [200]
        resumed = manager.wait_for(is_ping, after=last, what="WATCHDOG=1 after the batch")
        manager.wait_for(is_ping, after=resumed + 1, what="WATCHDOG=1 once more")

        popen.send_signal(signal.SIGTERM)
        manager.wait_for(is_stopping, after=resumed, what="STOPPING=1")
        assert popen.wait(WAIT_S) == 0
