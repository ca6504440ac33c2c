"""The pool's spare totals that buyers' index, metadata and readiness calls show: counted afresh while
counting is cheap, kept a while (as kept.Kept keeps a document) where it walks a large fleet, so that no
buyer can spend the gateway's loop on them by asking often."""

from __future__ import annotations

import time
from types import SimpleNamespace

import orjson
import pytest

from appliance.platform import fleet, kept
from appliance.platform.catalogue import Catalogue
from appliance.platform.kept import KEEP_FACTOR
from appliance.platform.view import PoolView

ROOT = "ecp/v1"
SHA = "f" * 64


def offering(pool: PoolView, name: str, spare: float, *, seq: int = 2) -> None:
    base, now_s = f"{ROOT}/s/{name}", time.monotonic()
    if pool.get("s", name) is None:
        models = {"m": {"sha256": SHA, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}}
        pool.ingest(f"{base}/birth", orjson.dumps({"session": 1, "seq": 0, "models": models}), now_s)
        pool.ingest(f"{base}/state", orjson.dumps({"session": 1, "seq": 1, "state": "online"}), now_s)
    offer = {"max_ips_at_slo": 10.0, "spare_ips_at_slo": spare, "accepts_pool_jobs": True}
    report = {"session": 1, "seq": seq, "valid_for_s": 60, "models": {"m": offer}}
    pool.ingest(f"{base}/capacity", orjson.dumps(report), now_s)


class Counted(PoolView):
    """A PoolView that counts the walks over a model's offering nodes."""

    walks = 0

    def offering(self, model: str):  # type: ignore[no-untyped-def]
        self.walks += 1
        return super().offering(model)


class Clock:
    """perf_counter (and thread_time) for kept.costly: each reading 10 ms after the last, so a count costs
    10 ms of CPU, and each call moves the wall clock on by 10 ms."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now_s = 1000.0
        self.cpu_s = 0.0
        monkeypatch.setattr(kept.time, "perf_counter", self)
        monkeypatch.setattr(kept.time, "thread_time", self.thread_time)

    def __call__(self) -> float:
        self.now_s += 0.010
        return self.now_s

    def thread_time(self) -> float:
        self.cpu_s += 0.010
        return self.cpu_s


def gateway_of(pool: PoolView) -> SimpleNamespace:
    return SimpleNamespace(view=pool, catalogue=Catalogue(None), settings=SimpleNamespace(gateway_id="g"))


def test_a_cheap_total_is_counted_afresh_at_every_call() -> None:
    pool = Counted(ROOT)
    offering(pool, "a", 5.0)
    place = gateway_of(pool)
    assert fleet.spare_ips(place, "m", frozenset({SHA})) == 5.0  # type: ignore[arg-type]
    offering(pool, "b", 2.0)
    offering(pool, "a", 1.0, seq=3)
    assert fleet.spare_ips(place, "m", frozenset({SHA})) == 3.0  # type: ignore[arg-type]
    assert pool.walks == 2
    assert fleet.metadata(place, "m")["parameters"]["pool_spare_ips_at_slo"] == 3.0  # type: ignore[arg-type]


def test_a_costly_total_is_kept_for_keep_factor_times_its_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    Clock(monkeypatch)
    pool = Counted(ROOT)
    offering(pool, "a", 5.0)
    place = gateway_of(pool)
    files = frozenset({SHA})
    assert fleet.spare_ips(place, "m", files) == 5.0  # type: ignore[arg-type]
    offering(pool, "a", 1.0, seq=3)
    calls = 0
    while fleet.spare_ips(place, "m", files) == 5.0:  # type: ignore[arg-type]
        calls += 1
        assert calls < 1000, "a kept total was never counted again"
    assert pool.walks == 2
    # Kept for KEEP_FACTOR x its 10 ms from its end; each call moves the wall clock on by 10 ms.
    assert calls == pytest.approx((1 + KEEP_FACTOR) * 0.010 / 0.010 - 1, abs=1)
    # The index shows the kept total too, so a buyer asking for it in a loop counts it no more often.
    counts = []
    count = fleet._spare_ips
    monkeypatch.setattr(fleet, "_spare_ips", lambda *args: counts.append(args) or count(*args))
    for _ in range(5):
        assert fleet.index(place)[0]["parameters"]["pool_spare_ips_at_slo"] == 1.0  # type: ignore[arg-type]
    assert len(counts) <= 1


def test_kept_totals_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    Clock(monkeypatch)
    pool = PoolView(ROOT)
    offering(pool, "a", 5.0)
    place = gateway_of(pool)
    for n in range(fleet.MAX_KEPT_TOTALS + 10):
        fleet.spare_ips(place, f"made-up-{n}", None)  # type: ignore[arg-type]
    assert len(fleet._kept_totals[pool]) <= fleet.MAX_KEPT_TOTALS
