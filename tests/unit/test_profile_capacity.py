"""The latency profile's fit, its robustness, and the capacity derived from it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.scheduler.capacity import (
    CompanyRate,
    CpuBudget,
    RateMeter,
    max_ips_at_slo,
    p99_wait_s,
    spare,
)
from appliance.scheduler.profile import LatencyProfile


def test_fits_intercept_and_slope_and_ignores_outliers() -> None:
    rng = np.random.default_rng(0)
    profile = LatencyProfile(window=256)
    for _ in range(200):
        rows = int(rng.integers(1, 17))
        seconds = 0.003 + 0.0005 * rows + rng.normal(0, 1e-5)
        if rng.random() < 0.05:
            seconds *= 20  # a GC pause or a noisy neighbour
        profile.observe(rows, seconds)
    profile.refit()
    assert profile.intercept_s == pytest.approx(0.003, rel=0.05)
    assert profile.per_row_s == pytest.approx(0.0005, rel=0.05)
    assert profile.bound_s(8) >= profile.expected_s(8)


def test_sliding_window_follows_a_change() -> None:
    profile = LatencyProfile(window=64)
    profile.seed([(rows, 0.001 * rows) for rows in (1, 2, 4, 8) for _ in range(16)])
    assert profile.expected_s(4) == pytest.approx(0.004, rel=0.01)
    for _ in range(64):
        for rows in (1, 8):
            profile.observe(rows, 0.002 * rows)
    profile.refit()
    assert profile.expected_s(4) == pytest.approx(0.008, rel=0.01)


def test_single_batch_size_and_empty_profile() -> None:
    profile = LatencyProfile()
    assert not profile.is_seeded and profile.expected_s(4) == 0.0
    profile.seed([(1, 0.002), (1, 0.002)])
    assert profile.expected_s(1) == pytest.approx(0.002)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 64), st.floats(1e-5, 1.0)), min_size=1, max_size=80))
def test_predictions_are_never_negative(observations: list[tuple[int, float]]) -> None:
    profile = LatencyProfile()
    profile.seed(observations)
    for rows in (1, 8, 64):
        assert profile.expected_s(rows) >= 0
        assert profile.bound_s(rows) >= profile.expected_s(rows)


def test_max_ips_at_slo_keeps_queueing_headroom_under_the_ceiling() -> None:
    profile = LatencyProfile()
    profile.seed([(rows, 0.004 + 0.001 * rows) for rows in (1, 2, 4, 8, 16) for _ in range(4)])
    ips, rows = max_ips_at_slo(profile, instances=2, max_rows=16, slo_s=0.030, queue_delay_s=0.0)
    ceiling = 2 * rows / profile.expected_s(rows)
    assert 0.5 * ceiling < ips < ceiling  # random arrivals need headroom to keep p99 within the SLO
    assert p99_wait_s(ips / ceiling, profile.expected_s(rows), 2) <= 0.030 - profile.bound_s(rows) + 1e-9
    looser, _ = max_ips_at_slo(profile, instances=2, max_rows=16, slo_s=0.300, queue_delay_s=0.0)
    assert ips < looser < 2 * 16 / profile.expected_s(16)
    hopeless, _ = max_ips_at_slo(profile, instances=2, max_rows=16, slo_s=0.004, queue_delay_s=0.0)
    assert hopeless == 0.0


def _max_ips_at_slo_one_size_at_a_time(
    profile: LatencyProfile,
    *,
    instances: int,
    max_rows: int,
    slo_s: float,
    queue_delay_s: float,
    budget: CpuBudget | None = None,
    compute_threads: int = 0,
) -> tuple[float, int]:
    """The definition, as it was first written: a loop over sizes, and a bisection for each."""
    best_ips, best_rows = 0.0, 0
    for rows in range(1, max(1, max_rows) + 1):
        expected = profile.expected_s(rows)
        if expected <= 0:
            continue
        fixed_s = profile.bound_s(rows) + (queue_delay_s if rows > 1 else 0.0)
        if fixed_s > slo_s:
            break
        ceiling = instances * rows / expected
        if budget is not None:
            cpu_per_row = budget.overhead_s_per_row + compute_threads * expected / rows
            if cpu_per_row > 0:
                ceiling = min(ceiling, budget.available_cores / cpu_per_row)
            if budget.overhead_s_per_row > 0:
                ceiling = min(ceiling, 1.0 / budget.overhead_s_per_row)
        low, high = 0.0, 1.0
        for _ in range(30):
            load = (low + high) / 2
            if p99_wait_s(load, expected, instances) <= slo_s - fixed_s:
                low = load
            else:
                high = load
        if low * ceiling > best_ips:
            best_ips, best_rows = low * ceiling, rows
    return best_ips, best_rows


def test_max_ips_at_slo_over_all_sizes_at_once_is_the_loop_over_each() -> None:
    rng = np.random.default_rng(11)
    for _ in range(300):
        profile = LatencyProfile()
        profile.intercept_s = float(rng.choice([0.0, rng.uniform(0, 0.01)]))
        profile.per_row_s = float(rng.choice([0.0, rng.uniform(0, 0.002)]))
        profile.per_row2_s = float(rng.choice([0.0, rng.uniform(0, 1e-5)]))
        profile.margin_ratio = float(rng.uniform(1.0, 3.0))
        budget = None
        if rng.random() < 0.6:
            budget = CpuBudget(cores=float(rng.uniform(0.5, 8.0)))
            budget.overhead_s_per_row = float(rng.choice([0.0, rng.uniform(0, 1e-3)]))
            budget.others_cores = float(rng.uniform(0.0, 2.0))
        arguments = {
            "instances": int(rng.integers(1, 5)),
            "max_rows": int(rng.integers(1, 300)),
            "slo_s": float(rng.uniform(0.001, 0.5)),
            "queue_delay_s": float(rng.choice([0.0, 0.005])),
            "budget": budget,
            "compute_threads": int(rng.integers(0, 3)),
        }
        ips, rows = max_ips_at_slo(profile, **arguments)
        expected_ips, expected_rows = _max_ips_at_slo_one_size_at_a_time(profile, **arguments)
        assert rows == expected_rows and math.isclose(ips, expected_ips, rel_tol=1e-12), arguments


def test_max_ips_at_slo_costs_no_python_call_per_batch_size(monkeypatch) -> None:
    """4096 sizes one at a time took ~80 ms of the event loop, recomputed with every CPU sample (2 s)."""
    profile = LatencyProfile()
    profile.seed([(rows, 0.0001 + 0.000001 * rows) for rows in (1, 64, 1024) for _ in range(3)])
    calls: list[object] = []
    expected_s = LatencyProfile.expected_s

    def counting(self, rows):
        calls.append(rows)
        return expected_s(self, rows)

    monkeypatch.setattr(LatencyProfile, "expected_s", counting)
    ips, rows = max_ips_at_slo(profile, instances=1, max_rows=4096, slo_s=0.1, queue_delay_s=0.005)
    assert ips > 0 and 1 <= rows <= 4096
    assert len(calls) <= 2


def test_p99_wait_grows_without_bound_near_full_load() -> None:
    assert p99_wait_s(0.0, 0.01, 2) == 0.0
    waits = [p99_wait_s(load, 0.01, 2) for load in (0.3, 0.6, 0.9, 0.99)]
    assert waits == sorted(waits) and waits[-1] > 100 * waits[0]
    assert p99_wait_s(1.0, 0.01, 2) == float("inf")


def test_spare_and_rate_meter() -> None:
    assert spare(100.0, 30.0, 0.2) == pytest.approx(50.0)
    assert spare(100.0, 95.0, 0.2) == 0.0
    meter = RateMeter(window_s=10.0)
    for t in range(20):
        meter.add(float(t), 5)
    assert meter.rate(19.0) == pytest.approx(5.0)
    assert meter.rate(100.0) == 0.0


def test_cpu_budget_learns_overhead_and_other_load() -> None:
    budget = CpuBudget(cores=2.0)
    # per second: 1000 rows; 1.2 s of our CPU of which 0.5 s on the event loop; the box was busy 1.7 s
    for second in range(12):
        budget.observe(second, 1.2 * second, 0.5 * second, 1.7 * second, 1000 * second)
    assert budget.overhead_s_per_row == pytest.approx(0.0005, rel=0.05)
    assert budget.others_cores == pytest.approx(0.5, rel=0.05)
    assert budget.available_cores == pytest.approx(1.5, rel=0.05)
    budget.restart()
    budget.observe(100.0, 500.0, 400.0, 600.0, 12_000)  # a load in between: no window spans it
    assert budget.overhead_s_per_row == pytest.approx(0.0005, rel=0.05)


def test_cpu_budget_caps_capacity_of_a_cheap_model() -> None:
    profile = LatencyProfile()
    profile.seed([(rows, 0.0001 + 0.00001 * rows) for rows in (1, 8, 16) for _ in range(4)])
    unlimited, _ = max_ips_at_slo(profile, instances=2, max_rows=16, slo_s=0.1, queue_delay_s=0.0)
    budget = CpuBudget(cores=2.0)
    budget.overhead_s_per_row = 0.0004  # HTTP and codecs cost more than the model itself
    capped, rows = max_ips_at_slo(
        profile, instances=2, max_rows=16, slo_s=0.1, queue_delay_s=0.0, budget=budget, compute_threads=1
    )
    assert capped < unlimited
    assert capped <= min(2.0 / (0.0004 + profile.expected_s(rows) / rows), 1 / 0.0004)


def test_a_bending_profile_prefers_the_batch_with_the_best_rate() -> None:
    profile = LatencyProfile()
    # per row: 2.3 ms at 4 rows, 2.8 ms at 32 (the 224x224 reference CNN on one core)
    profile.seed([(r, 0.0005 + 0.0022 * r + 0.00002 * r * r) for r in (1, 2, 4, 8, 16, 32) for _ in range(3)])
    assert profile.per_row2_s == pytest.approx(0.00002, rel=0.01)
    best = profile.best_rows(32)
    assert 1 < best < 32
    rate = best / profile.expected_s(best)
    assert rate >= 0.98 * max(r / profile.expected_s(r) for r in range(1, 33))
    straight = LatencyProfile()
    straight.seed([(r, 0.001 + 0.001 * r) for r in (1, 4, 16) for _ in range(3)])
    assert straight.per_row2_s == 0.0 and straight.best_rows(16) == 16


def test_the_p99_margin_forgets_a_burst_of_noise_with_time() -> None:
    """Regression (issue 14): a noisy burst left the margin high for as long as its batches stayed in
    the window, and a pessimistic model refuses the very batches that would replace them."""
    profile = LatencyProfile(window=256)
    now = 1000.0
    for index in range(256):  # another process takes the cores: every other batch at 4x its time
        now += 0.04
        profile.observe(4, 0.012 if index % 2 else 0.003, now)
    profile.refit(now)
    noisy = profile.margin_ratio
    assert noisy > 1.5
    profile.refresh(now + 30.0)  # no batch since: time alone brings it back to the fit
    assert profile.margin_ratio < 1.1 < noisy
    for _ in range(64):  # and steady, ordinary batches keep it there
        now += 0.04
        profile.observe(4, 0.003, now + 30.0)
    profile.refresh(now + 31.0)
    assert profile.margin_ratio < 1.1


def test_the_margin_still_holds_noise_that_goes_on() -> None:
    profile = LatencyProfile(window=256)
    now = 0.0
    for index in range(512):  # one batch in ten is slow, all along
        now += 0.04
        profile.observe(4, 0.009 if index % 10 == 0 else 0.003, now)
    profile.refresh(now + 0.6)
    assert profile.margin_ratio > 2.0


def test_company_rate_is_zero_for_a_lone_closed_loop_client_and_the_rate_for_open_traffic() -> None:
    """Whether waiting may fill a batch: a client alone (next request once answered) never finds
    company, however fast it sends; Poisson arrivals at the same rate are seen at that rate."""
    lone = CompanyRate()
    now = 0.0
    for _ in range(2000):  # 200 requests/s: 5 ms each, answered, then the next
        lone.arrived(now, in_flight=0)
        now += 0.005
        lone.idle(now)
        now += 0.0001
    assert lone.rate(now) == 0.0

    rng = np.random.default_rng(7)
    open_traffic, now, out = CompanyRate(), 0.0, []  # out: when each request in flight is answered
    for gap in rng.exponential(1 / 200, 4000):  # Poisson at 200/s, 2 ms each, one at a time
        now += gap
        while out and out[0] <= now:
            ended = out.pop(0)
            if not out:
                open_traffic.idle(ended)
        open_traffic.arrived(now, in_flight=len(out))
        out.append(max(now, out[-1] if out else now) + 0.002)
    assert 150 < open_traffic.rate(now) < 250
