"""Admission control, pure: the predicted wait and who gets refused."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from appliance.dataplane.budget import WorkBudget
from appliance.errors import NoPoolCapacity, Overloaded
from appliance.scheduler.admission import admit, backlog_s, check_pool_rows, pool_row_limit
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


def test_the_pool_row_limit_is_checked_the_same_before_decoding_and_at_admission() -> None:
    b = batcher()
    assert pool_row_limit(b) == 2  # 2 ms + 1 ms a row within 4.5 ms
    check_pool_rows("m", b, 2, pool_row_limit(b))
    with pytest.raises(NoPoolCapacity, match=r"pool work of 3 rows .*=4\.5; at most 2 rows") as caught:
        check_pool_rows("m", b, 3, pool_row_limit(b))
    assert caught.value.retry_after_s == 60.0
    unseeded = Batcher(
        BatchRules(max_rows=8, max_queue_delay_s=0.0, max_interference_s=0.0045), LatencyProfile()
    )
    assert pool_row_limit(unseeded) is None  # no profile yet: the model's max_batch_size alone
    check_pool_rows("m", unseeded, 8, pool_row_limit(unseeded))


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_a_work_budget_refuses_while_overdrawn_and_says_when_it_refills() -> None:
    clock = Clock()
    budget = WorkBudget(0.05, 0.010, what="decoding pool jobs", hint="send binary", clock=clock)
    budget.check()
    budget.charge(0.030)  # one piece may overdraw it: 10 ms in hand, 30 ms spent
    assert budget.balance_s() == pytest.approx(-0.020)
    with pytest.raises(
        NoPoolCapacity, match=r"decoding pool jobs \(5% of a core, 10 ms at once\); send binary"
    ):
        budget.check()
    with pytest.raises(NoPoolCapacity) as caught:
        budget.check()
    assert caught.value.retry_after_s == pytest.approx(0.4)  # 20 ms at 5% a second
    assert budget.refused == 2
    clock.now_s = 0.4
    budget.check()
    clock.now_s = 100.0
    assert budget.balance_s() == pytest.approx(0.010)  # refills up to its burst, no further
    assert budget.spent_s == pytest.approx(0.030)


@pytest.mark.asyncio
async def test_a_work_budget_runs_work_off_the_loop_one_at_a_time_and_charges_its_cpu() -> None:
    budget = WorkBudget(0.05, 1.0, what="decoding", clock=Clock())
    loop_thread = threading.get_ident()
    running = 0
    entered = threading.Event()
    seen: list[tuple[int, int]] = []

    def work(seconds: float) -> int:
        nonlocal running
        running += 1
        seen.append((threading.get_ident(), running))
        if len(seen) == 1:
            # Another piece that started now would be seen running beside this one. None may: this
            # waits for one in vain (and only so long), then goes on.
            entered.wait(0.2)
        else:
            entered.set()
        started = time.thread_time()
        while time.thread_time() - started < seconds:
            pass
        running -= 1
        return 7

    assert await asyncio.gather(*(budget.run(lambda: work(0.005)) for _ in range(3))) == [7, 7, 7]
    assert [count for _, count in seen] == [1, 1, 1]
    assert all(thread != loop_thread for thread, _ in seen)
    assert budget.spent_s >= 0.015  # its threads' CPU time, charged

    def failing() -> int:
        work(0.005)
        raise ValueError("bad job")

    spent_s = budget.spent_s
    with pytest.raises(ValueError, match="bad job"):
        await budget.run(failing)
    assert budget.spent_s - spent_s >= 0.005  # a refused job's decode is paid for too
    budget.charge(2.0)
    with pytest.raises(NoPoolCapacity):
        await budget.run(lambda: work(0.0))
    assert len(seen) == 4  # refused before it started


def test_the_pool_row_limit_is_worked_out_once_per_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked for every pool job and batch, it scans the batch sizes only after a refit (a scan over
    4096 sizes costs 0.6 ms of the event loop); a refit that moves the profile moves it."""
    b = batcher()
    calls = []
    real = b.profile.expected_s
    monkeypatch.setattr(b.profile, "expected_s", lambda rows: calls.append(rows) or real(rows))
    assert [b.pool_row_limit() for _ in range(3)] == [2, 2, 2]
    assert calls == [2, 3]  # the scan stops at the first size past the bound, once
    for _ in range(32):
        b.profile.observe(1, 0.0005, 0.0)
    b.profile.refit(0.0)
    assert b.pool_row_limit() > 2
