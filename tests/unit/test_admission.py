"""Admission control, pure: the predicted wait and who gets refused."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from appliance.errors import Overloaded
from appliance.scheduler.admission import admit, backlog_s
from appliance.scheduler.batcher import Batcher, BatchRules
from appliance.scheduler.profile import LatencyProfile
from appliance.scheduler.queues import Priority, Queues, Work


@dataclass
class Run:
    priority: Priority
    started_s: float
    predicted_s: float


def batcher() -> Batcher:
    profile = LatencyProfile()
    profile.seed([(r, 0.002 + 0.001 * r) for r in (1, 2, 4, 8) for _ in range(3)])
    return Batcher(BatchRules(max_rows=8, max_queue_delay_s=0.0, max_interference_s=0.0045), profile)


def test_backlog_counts_running_batches_then_rows_ahead() -> None:
    queues = Queues(line_max_requests=64, pool_max_requests=64)
    idle_and_busy = [[], [Run(Priority.LINE, 0.0, 0.010)]]
    assert backlog_s(batcher(), queues, idle_and_busy, Priority.LINE, 0.004, pool_yields=True) == 0.0
    both_busy = [[Run(Priority.LINE, 0.0, 0.010)], [Run(Priority.POOL, 0.0, 0.010)]]
    # the pool batch yields to line work: only the line batch's 6 ms left counts, over 2 workers
    assert backlog_s(batcher(), queues, both_busy, Priority.LINE, 0.004, pool_yields=True) == pytest.approx(
        0.003
    )
    assert backlog_s(batcher(), queues, both_busy, Priority.LINE, 0.004, pool_yields=False) == pytest.approx(
        0.006
    )
    for _ in range(10):
        queues.push(Work(1, Priority.LINE, 1.0, 0.0))
    # 10 rows ahead: one batch of 8 (10 ms) and one of 2 (4 ms), plus 6 ms running, over 2 workers
    assert backlog_s(batcher(), queues, both_busy, Priority.LINE, 0.004, pool_yields=True) == pytest.approx(
        0.010
    )


def test_admit_refuses_late_work_and_oversized_pool_batches() -> None:
    queues = Queues(line_max_requests=64, pool_max_requests=64)
    busy = [[Run(Priority.LINE, 0.0, 0.050)]]
    admit(
        "m",
        batcher(),
        queues,
        busy,
        rows=1,
        priority=Priority.LINE,
        now_s=0.0,
        deadline_s=1.0,
        pool_yields=True,
    )
    late = r"would finish in 53\.0 ms, after its deadline of 20\.0 ms"
    with pytest.raises(Overloaded, match=late) as caught:
        admit(
            "m",
            batcher(),
            queues,
            busy,
            rows=1,
            priority=Priority.LINE,
            now_s=0.0,
            deadline_s=0.02,
            pool_yields=True,
        )
    assert caught.value.retry_after_s == pytest.approx(0.05)
    with pytest.raises(Overloaded, match="at most 2 rows"):
        admit(
            "m",
            batcher(),
            queues,
            [[]],
            rows=3,
            priority=Priority.POOL,
            now_s=0.0,
            deadline_s=9.0,
            pool_yields=True,
        )


def test_an_idle_model_admits_what_its_mean_fits_even_when_the_p99_margin_says_no() -> None:
    b = batcher()
    for rows in (1, 2, 4, 8) * 15:
        b.profile.observe(rows, 0.002 + 0.001 * rows)
    for _ in range(4):  # a burst: a few batches took 3x the fit; the p99 margin now says 1 row takes 9 ms
        b.profile.observe(1, 0.009)
    b.profile.refit()
    assert b.profile.bound_s(1) > 0.006 >= b.profile.expected_s(1)
    queues = Queues(line_max_requests=64, pool_max_requests=64)

    def one_line_row(workers: list[list[Run]], deadline_s: float) -> None:
        admit(
            "m",
            b,
            queues,
            workers,
            rows=1,
            priority=Priority.LINE,
            now_s=0.0,
            deadline_s=deadline_s,
            pool_yields=True,
        )

    idle: list[list[Run]] = [[]]
    one_line_row(idle, 0.006)
    with pytest.raises(Overloaded, match="after its deadline"):
        one_line_row([[Run(Priority.LINE, 0.0, 0.004)]], 0.006)
    with pytest.raises(Overloaded, match="after its deadline"):  # not even the mean fits
        one_line_row(idle, 0.001)
    with pytest.raises(Overloaded, match="after its deadline"):  # not even the mean fits
        admit(
            "m",
            b,
            queues,
            idle,
            rows=1,
            priority=Priority.LINE,
            now_s=0.0,
            deadline_s=0.001,
            pool_yields=True,
        )
