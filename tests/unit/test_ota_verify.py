"""How `ota verify` waits: bounded polling on a fake clock, resuming only its own drain, the grace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.ota.store import OtaError, Store
from appliance.ota.verify import is_still_starting, wait_until_ready


class FakeLink:
    """Answers status with a script of documents (None: not running); the last one repeats."""

    def __init__(self, *script: dict[str, Any] | None) -> None:
        self.script = list(script)
        self.resumed = 0

    def status(self) -> dict[str, Any] | None:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def resume(self) -> dict[str, Any]:
        self.resumed += 1
        return {"state": "ready"}


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now_s += seconds


def wait(link: FakeLink, store: Store, wait_s: float = 2.0):
    clock = FakeClock()
    return wait_until_ready(link, store, wait_s, clock=clock, sleep=clock.sleep), clock  # type: ignore[arg-type]


def test_ready_at_once_does_not_sleep(tmp_path: Path) -> None:
    waited, clock = wait(FakeLink({"state": "ready", "pid": 1}), Store(tmp_path))
    assert waited.is_ready and clock.slept == []


def test_waits_through_not_running_and_loading(tmp_path: Path) -> None:
    link = FakeLink(None, {"state": "loading", "pid": 1}, {"state": "ready", "pid": 1})
    waited, clock = wait(link, Store(tmp_path))
    assert waited.is_ready and waited.status == {"state": "ready", "pid": 1}
    assert clock.slept == [0.5, 0.5]


def test_gives_up_after_the_wait_with_the_last_status(tmp_path: Path) -> None:
    waited, clock = wait(FakeLink({"state": "loading", "pid": 1}), Store(tmp_path), wait_s=1.2)
    assert not waited.is_ready and waited.status == {"state": "loading", "pid": 1}
    assert sum(clock.slept) == 1.2


def test_resumes_once_the_drain_ota_drain_left(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.mark_drained(7)
    link = FakeLink({"state": "draining", "pid": 7}, {"state": "ready", "pid": 7})
    waited, _ = wait(link, store)
    assert waited.is_ready and link.resumed == 1
    assert store.drained_pid() is None


def test_leaves_other_drains_alone(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.mark_drained(7)  # a drain of an earlier process
    link = FakeLink({"state": "draining", "pid": 8})
    waited, _ = wait(link, store)
    assert not waited.is_ready and link.resumed == 0


class ReadOnlyStore(Store):
    """The health check's view: ProtectSystem=strict leaves the state dir read-only."""

    def clear_drained(self) -> None:
        raise OtaError(f"cannot remove {self.root / 'drained.json'} (Read-only file system)")


def test_resumes_at_most_once_even_when_the_marker_stays(tmp_path: Path) -> None:
    store = ReadOnlyStore(tmp_path)
    store.mark_drained(7)
    link = FakeLink({"state": "draining", "pid": 7})  # stays draining whatever we do
    waited, _ = wait(link, store)
    assert not waited.is_ready and link.resumed == 1
    assert store.drained_pid() == 7


def test_still_starting_while_inside_the_grace() -> None:
    assert is_still_starting({"state": "loading", "uptime_s": 30.0}, grace_s=900.0, boot_uptime_s=5000.0)
    assert not is_still_starting({"state": "loading", "uptime_s": 1000.0}, grace_s=900.0, boot_uptime_s=60.0)
    assert is_still_starting(None, grace_s=900.0, boot_uptime_s=60.0)
    assert not is_still_starting(None, grace_s=900.0, boot_uptime_s=5000.0)
