"""A real service (uvicorn on a pre-bound 127.0.0.1:0 socket, real ORT) running in a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from holds import Batches

from appliance.protocol import codec
from appliance.service import Service
from appliance.settings import Settings
from appliance.system.sdnotify import Notifier

START_TIMEOUT_S = 60.0


def make_settings(tmp_path: Path, repository: Path, **sections: dict[str, Any]) -> Settings:
    """Settings from init kwargs only (never os.environ or /etc), with every directory under tmp_path."""
    data: dict[str, dict[str, Any]] = {
        "models": {"repository": repository},
        # Pool work at the service's own priority: at idle priority a box that another process keeps
        # busy starves it for minutes. test_replica and test_scheduler pin the idle default.
        "scheduler": {"instances": 2, "pool_cpu_priority": "normal"},
        "system": {
            "state_dir": tmp_path / "state",
            "cache_dir": tmp_path / "cache",
            "runtime_dir": tmp_path / "run",
        },
        "server": {"port": 0, "grpc_port": 0},  # free ports: tests run side by side
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Settings(**data)


@dataclass
class RunningService:
    service: Service
    url: str
    loop: asyncio.AbstractEventLoop
    exit_code: list[int] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def call(self, coroutine_factory: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        """Run a coroutine on the service's loop (e.g. hub.load) and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine_factory(), self.loop).result(timeout_s)

    def inflight(self, model: str) -> int:
        """Requests to `model` admitted by its scheduler and not yet answered."""
        scheduler = self.service.hub.entry(model).scheduler
        return 0 if scheduler is None else scheduler.inflight

    def wait_inflight(self, model: str, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until `count` requests to `model` are admitted (e.g. queued behind a held batch)."""
        deadline_s = time.monotonic() + timeout_s
        while self.inflight(model) < count:
            assert time.monotonic() < deadline_s, f"{self.inflight(model)} of {count} requests admitted"
            time.sleep(0.005)

    async def inflight_reaches(self, model: str, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """`wait_inflight` for a client running on its own event loop."""
        async with asyncio.timeout(timeout_s):
            while self.inflight(model) < count:
                await asyncio.sleep(0.005)


@contextmanager
def line_requests_waiting(running: RunningService, batches: Batches, model: str) -> Iterator[None]:
    """Line traffic that stays put: batches of `model` are held at every worker, each worker has its next
    batch queued, and at least one more request waits in the line queue, until the block ends (then
    everything runs and is answered). What `ota gate` and the OTA hooks must defer to, with no timing."""
    scheduler = running.service.hub.entry(model).scheduler
    assert scheduler is not None
    example = scheduler.model.example_inputs(1)
    assert example is not None, f"model {model} needs fixed input shapes"
    # A deadline (parameters.timeout, us) far past the model's SLO: a queued request must not expire.
    far = {"timeout": int(START_TIMEOUT_S * 10 * 1e6)}
    body = codec.encode_request(example, binary=False, binary_output=False, parameters=far).body()
    url = f"{running.url}/v2/models/{model}/infer"
    senders: list[threading.Thread] = []

    def is_stuck() -> bool:  # no worker will take more until one is released
        workers = scheduler.line_workers
        return len(scheduler.queues.line) > 0 and all(len(worker.runs) >= 2 for worker in workers)

    with batches.holding(lambda batch: batch.model == model):
        while not is_stuck():
            assert len(senders) < 4 * len(scheduler.line_workers) + 4, "line requests never stayed queued"
            sender = threading.Thread(target=lambda: httpx.post(url, content=body, timeout=START_TIMEOUT_S))
            sender.start()
            senders.append(sender)
            running.wait_inflight(model, len(senders))
        yield
    for sender in senders:
        sender.join(START_TIMEOUT_S)


@contextmanager
def run_service(settings: Settings, notifier: Notifier | None = None) -> Iterator[RunningService]:
    """Start the service, wait until READY, yield it; on exit stop it and assert it exited with 0."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    service = Service(settings, sockets=[sock], notifier=notifier or Notifier(None))
    running = RunningService(service, f"http://127.0.0.1:{port}", loop)
    is_ready = threading.Event()
    failure: list[BaseException] = []

    async def main() -> int:
        task = asyncio.create_task(service.run(install_signal_handlers=False))
        ready = asyncio.create_task(service.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        is_ready.set()
        return await task

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            running.exit_code.append(loop.run_until_complete(main()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread below
            failure.append(exc)
            is_ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=target, name="service", daemon=True)
    thread.start()
    assert is_ready.wait(START_TIMEOUT_S), "service did not become ready"
    if failure:
        raise failure[0]
    try:
        yield running
    finally:
        service.stop()
        thread.join(START_TIMEOUT_S)
        sock.close()
        assert not thread.is_alive(), "service did not stop"
        if failure:
            raise failure[0]
        assert running.exit_code == [0]
