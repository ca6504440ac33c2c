"""A real gateway in a thread (its own loop, uvicorn on a pre-bound socket) and real nodes as processes."""

from __future__ import annotations

import asyncio
import io
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pool_brokers import Broker
from pool_process import READY, Process, node_environment, node_process
from pool_recorder import Names, pool_section
from sqlalchemy import select

from appliance.platform.gateway import Gateway
from appliance.platform.ledger import Ledger
from appliance.platform.schema import receipts
from appliance.platform.settings import PlatformSettings
from appliance.platform.watch import watch_gateway
from appliance.protocol import codec

WAIT_S = 60.0


@dataclass
class RunningGateway:
    gateway: Gateway
    url: str
    thread: threading.Thread
    exit_code: list[int] = field(default_factory=list)
    token: str | None = None

    def nodes(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.get(f"{self.url}/v2/pool/nodes", headers=headers, timeout=10).json()

    def node(self, name: str) -> dict[str, Any] | None:
        return next((n for n in self.nodes()["nodes"] if n["node"] == name), None)


@contextmanager
def run_gateway(
    broker: Broker,
    names: Names,
    *,
    token: str | None = None,
    ledger: dict[str, Any] | None = None,
    canary: dict[str, Any] | None = None,
    **settings: Any,
) -> Iterator[RunningGateway]:
    """Start a gateway on `broker` for the test's topic root and site; stop it and check it exited 0.

    Its state (key, SQLite ledger) is in a fresh directory unless `state_dir` is given; canaries and
    second opinions are off unless `canary` turns them on, so that job counts are the test's own."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    scratch = tempfile.TemporaryDirectory(prefix="gateway-")
    section = {
        "broker": broker.url,
        "topic_root": names.root,
        "site": names.site,
        "sweep_interval_s": 0.1,
        "state_dir": scratch.name,
        "learning_s": 0.0,  # an unknown model is 404 at once (test_gateway_buyers pins the window)
    }
    section.update(settings)
    overrides = {
        "gateway": section,
        "ledger": ledger or {},
        "canary": {"probability": 0.0, "second_opinion_probability": 0.0, **(canary or {})},
    }
    gateway = Gateway(PlatformSettings.load(None, environ={}, overrides=overrides))
    loop = asyncio.new_event_loop()
    started = threading.Event()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    running = RunningGateway(gateway, url, None, token=token)  # type: ignore[arg-type]

    async def main() -> int:
        task = asyncio.create_task(gateway.run(sockets=[sock]))
        waiter = asyncio.create_task(gateway.started.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        started.set()
        return await task

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            running.exit_code.append(loop.run_until_complete(main()))
        finally:
            started.set()
            loop.close()

    running.thread = threading.Thread(target=target, name="gateway", daemon=True)
    running.thread.start()
    assert started.wait(WAIT_S), "gateway did not start"
    assert gateway.link.connected.wait(WAIT_S), "gateway did not connect to the broker"
    try:
        yield running
    finally:
        gateway.stop()
        running.thread.join(WAIT_S)
        sock.close()
        scratch.cleanup()
        assert not running.thread.is_alive(), "gateway did not stop"
        assert running.exit_code == [0]


@dataclass
class Node:
    name: str
    process: Process

    def signal(self, number: signal.Signals) -> None:
        self.process.popen.send_signal(number)


@contextmanager
def run_nodes(
    tmp_path: Path,
    repository: Path,
    broker: Broker,
    names: Names,
    count: int,
    *,
    repositories: dict[str, Path] | None = None,
    environments: dict[str, dict[str, str]] | None = None,
    **pool: Any,
) -> Iterator[list[Node]]:
    """`count` real `appliance serve` processes (node-0, node-1, ...) on the broker, started together;
    a node named in `repositories` serves that one, and one in `environments` gets those variables."""
    with ExitStack() as stack:
        nodes = []
        for index in range(count):
            name = f"node-{index}"
            section = pool_section(
                broker, Names(names.root, names.site, name), **pool.get(name, {}), **pool.get("*", {})
            )
            env = node_environment(tmp_path / name, section)
            env.update((environments or {}).get(name, {}))
            served = (repositories or {}).get(name, repository)
            process = stack.enter_context(node_process(served, env))
            nodes.append(Node(name, process))
        for node in nodes:
            node.process.wait_for(READY, WAIT_S)
        yield nodes


async def watched(url: str, token: str) -> tuple[int, str]:
    """`appliance platform watch --gateway URL --once` with an operator's token: its exit code and what
    it printed."""
    out = io.StringIO()
    code = await asyncio.to_thread(watch_gateway, url, token=token, once=True, out=out)
    return code, out.getvalue()


def request_body(rows: int = 1, *, binary: bool = False) -> tuple[np.ndarray, bytes, dict[str, str]]:
    x = np.arange(4 * rows, dtype=np.float32).reshape(rows, 4)
    encoded = codec.encode_request({"x": x}, binary=binary, binary_output=binary)
    headers = (
        {}
        if encoded.header_length is None
        else {"Inference-Header-Content-Length": str(encoded.header_length)}
    )
    return x, encoded.body(), headers


async def until(condition: Callable[[], Any], timeout_s: float = WAIT_S, what: str = "condition") -> Any:
    """Poll `condition` (in a thread: it may do blocking HTTP) until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await asyncio.to_thread(condition)
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        await asyncio.sleep(0.05)


def ledger_rows(gateway: RunningGateway) -> list[dict[str, Any]]:
    """Every receipt in the gateway's own SQLite ledger, read through a second, read-only connection."""
    ledger = Ledger.open(str(gateway.gateway.settings.state_dir / "ledger.sqlite3"), is_writer=False)
    try:
        with ledger.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(select(receipts))]
    finally:
        ledger.close()


async def checks_settled(gateway: RunningGateway) -> None:
    """Every check started so far has ended and its receipt is committed. Unlike waiting for a moment with
    no check running, this needs none: a quarantined node gets a recheck canary every
    recheck_interval_s, and on a busy box one may start before the last has ended."""
    inner = gateway.gateway

    async def settle() -> None:  # on the gateway's loop, which owns the tasks (waited for, never cancelled)
        if checks := set(inner.checks._tasks):
            await asyncio.wait(checks)
        if pending := set(inner.metering._pending):  # theirs among them, recorded as they ended
            await asyncio.wait(pending)

    settled = asyncio.run_coroutine_threadsafe(settle(), inner.link._loop)
    await asyncio.wait_for(asyncio.wrap_future(settled), WAIT_S)
