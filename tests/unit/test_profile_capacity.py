"""The latency profile's fit, its robustness, and the capacity derived from it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.scheduler.capacity import CpuBudget, RateMeter, max_ips_at_slo, spare
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


def test_max_ips_at_slo_picks_the_best_batch_within_the_slo() -> None:
    profile = LatencyProfile()
    profile.seed([(rows, 0.004 + 0.001 * rows) for rows in (1, 2, 4, 8, 16) for _ in range(4)])
    ips, rows = max_ips_at_slo(profile, instances=2, max_rows=16, slo_s=0.030, queue_delay_s=0.0)
    # 2 * l(r) <= 30 ms -> r <= 11; throughput 2 * r / l(r) grows with r
    assert rows == 11 and ips == pytest.approx(2 * 11 / 0.015)
    tight, _ = max_ips_at_slo(profile, instances=2, max_rows=16, slo_s=0.005, queue_delay_s=0.0)
    assert tight == 0.0


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
    # per second: 1000 rows; 1.2 s of our CPU of which 0.7 s in ORT; the box was busy 1.7 s
    for second in range(12):
        budget.observe(second, 1.2 * second, 1.7 * second, 1000 * second, 0.7 * second)
    assert budget.overhead_s_per_row == pytest.approx(0.0005, rel=0.05)
    assert budget.others_cores == pytest.approx(0.5, rel=0.05)
    assert budget.available_cores == pytest.approx(1.5, rel=0.05)


def test_cpu_budget_caps_capacity_of_a_cheap_model() -> None:
    profile = LatencyProfile()
    profile.seed([(rows, 0.0001 + 0.00001 * rows) for rows in (1, 8, 16) for _ in range(4)])
    unlimited, _ = max_ips_at_slo(profile, instances=2, max_rows=16, slo_s=0.1, queue_delay_s=0.0)
    budget = CpuBudget(cores=2.0)
    budget.overhead_s_per_row = 0.0004  # HTTP and codecs cost more than the model itself
    capped, _ = max_ips_at_slo(
        profile, instances=2, max_rows=16, slo_s=0.1, queue_delay_s=0.0, budget=budget, compute_threads=1
    )
    assert capped < unlimited
    assert capped == pytest.approx(2.0 / (0.0004 + (0.0001 + 0.00016) / 16), rel=1e-6)
