"""The pure scheduling core under a fake clock: queues, batcher and their invariants (hypothesis)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import Overloaded
from appliance.scheduler.batcher import Batcher, BatchRules
from appliance.scheduler.profile import LatencyProfile
from appliance.scheduler.queues import Priority, Queues, Work


def profile(intercept_s: float = 0.002, per_row_s: float = 0.001) -> LatencyProfile:
    p = LatencyProfile()
    p.seed([(rows, intercept_s + per_row_s * rows) for rows in (1, 2, 4, 8) for _ in range(3)])
    return p


def work(rows: int, deadline_s: float, priority: Priority = Priority.LINE, arrived_s: float = 0.0) -> Work:
    return Work(rows, priority, deadline_s, arrived_s)


def test_queue_is_bounded_and_earliest_deadline_first() -> None:
    queues = Queues(line_max_requests=3, pool_max_requests=1)
    for deadline in (0.5, 0.1, 0.3):
        queues.push(work(1, deadline))
    with pytest.raises(Overloaded, match="line queue is full \\(3 requests waiting\\)"):
        queues.push(work(1, 0.2))
    assert [w.deadline_s for w in queues.line] == [0.1, 0.3, 0.5]
    assert queues.rows_ahead(Priority.LINE) == 3
    queues.push(work(2, 0.1, Priority.POOL))
    assert queues.rows_ahead(Priority.POOL) == 5 and queues.rows_ahead(Priority.LINE) == 3


def test_ties_keep_arrival_order_and_requeue_keeps_place() -> None:
    queues = Queues(line_max_requests=8, pool_max_requests=8)
    first, second = work(1, 1.0), work(1, 1.0)
    queues.push(first)
    queues.push(second)
    assert list(queues.line) == [first, second]
    queues.line.remove(first)
    queues.requeue(first)
    assert list(queues.line) == [first, second]


def test_batch_counts_rows_and_respects_the_limit() -> None:
    batcher = Batcher(BatchRules(max_rows=8, max_queue_delay_s=0.0, max_interference_s=1.0), profile())
    queues = Queues(line_max_requests=16, pool_max_requests=16)
    for rows in (3, 4, 2, 1):
        queues.push(work(rows, 10.0))
    decision = batcher.next(queues, now_s=0.0)
    assert decision.batch is not None
    assert [w.rows for w in decision.batch.items] == [3, 4]  # the next (2) would exceed 8 rows
    assert decision.batch.rows == 7
    assert [w.rows for w in queues.line] == [2, 1]


def test_free_workers_share_a_burst_evenly() -> None:
    """31 queued rows and two free workers: batches of 16 and 15 that run at once, not 31 held for a
    32nd on one worker while the other idles (a straight profile's best batch is the largest)."""
    batcher = Batcher(BatchRules(max_rows=32, max_queue_delay_s=0.05, max_interference_s=1.0), profile())
    queues = Queues(line_max_requests=64, pool_max_requests=16)
    for _ in range(31):
        queues.push(work(1, 10.0))
    queues.push(work(1, 10.0, Priority.POOL))
    assert batcher.batch_rows() == 32
    alone = batcher.next(queues, now_s=0.0)
    assert alone.batch is None and alone.wake_s == pytest.approx(0.05)  # one worker: held for a 32nd
    share = batcher.share(queues, 2)
    assert share == 16
    first, second = (batcher.next(queues, now_s=0.0, share_rows=share).batch for _ in range(2))
    assert first is not None and second is not None
    assert (first.rows, second.rows) == (16, 15)  # line rows only: pool work waits behind them
    assert not len(queues.line) and len(queues.pool) == 1
    assert batcher.share(queues, 1) is None and batcher.share(queues, 2) is None  # nothing to share


def test_line_before_pool_and_pool_bounded_by_interference() -> None:
    p = profile(intercept_s=0.002, per_row_s=0.001)
    batcher = Batcher(BatchRules(max_rows=8, max_queue_delay_s=0.0, max_interference_s=0.0045), p)
    queues = Queues(line_max_requests=16, pool_max_requests=16)
    for _ in range(6):
        queues.push(work(1, 10.0, Priority.POOL))
    queues.push(work(1, 10.0))
    first = batcher.next(queues, 0.0).batch
    assert first is not None and first.priority is Priority.LINE
    second = batcher.next(queues, 0.0).batch
    assert second is not None and second.priority is Priority.POOL
    assert second.rows == batcher.pool_row_limit() == 2  # 2 ms + 1 ms/row, bound 4.5 ms


def test_pool_work_runs_one_row_at_a_time_when_a_row_outlasts_the_interference_bound() -> None:
    p = profile(intercept_s=0.002, per_row_s=0.02)  # a slow CPU: 22 ms for one row, bound 10 ms
    batcher = Batcher(BatchRules(max_rows=8, max_queue_delay_s=0.0, max_interference_s=0.010), p)
    queues = Queues(line_max_requests=16, pool_max_requests=16)
    for _ in range(3):
        queues.push(work(1, 10.0, Priority.POOL))
    batch = batcher.next(queues, 0.0).batch
    assert batcher.pool_row_limit() == 1
    assert batch is not None and batch.priority is Priority.POOL and batch.rows == 1


def test_a_pool_head_over_a_refit_limit_runs_alone_and_does_not_block_its_queue() -> None:
    """Admitted when 4 rows fit the interference bound; the profile refit slower since. The head must
    still run (alone), and the work behind it after it: not wait, the pool worker idle, until it expires."""
    batcher = Batcher(BatchRules(max_rows=8, max_queue_delay_s=0.0, max_interference_s=0.0065), profile())
    queues = Queues(line_max_requests=16, pool_max_requests=16)
    assert batcher.pool_row_limit() == 4  # 2 ms + 1 ms/row
    big, small = work(4, 10.0, Priority.POOL), work(1, 20.0, Priority.POOL)
    queues.push(big)
    queues.push(small)
    batcher.profile = profile(intercept_s=0.003, per_row_s=0.0015)  # the refit: 4 rows take 9 ms now
    assert batcher.pool_row_limit() == 2
    first = batcher.next(queues, 0.0)
    assert first.batch is not None and first.batch.items == [big] and not first.expired
    second = batcher.next(queues, 0.0).batch
    assert second is not None and second.items == [small] and not len(queues.pool)


def test_waits_for_more_rows_only_while_the_deadline_holds() -> None:
    p = profile(intercept_s=0.002, per_row_s=0.001)
    batcher = Batcher(BatchRules(max_rows=8, max_queue_delay_s=0.005, max_interference_s=1.0), p)
    queues = Queues(line_max_requests=16, pool_max_requests=16)
    queues.push(work(1, deadline_s=1.0, arrived_s=0.0))
    decision = batcher.next(queues, 0.001)
    assert decision.batch is None and decision.wake_s == pytest.approx(0.005)
    tight = Queues(line_max_requests=16, pool_max_requests=16)
    tight.push(work(1, deadline_s=0.011, arrived_s=0.0))  # a full batch (10 ms) would miss it
    assert batcher.next(tight, 0.001).batch is not None


def test_late_work_expires_and_is_never_batched() -> None:
    batcher = Batcher(BatchRules(max_rows=8, max_queue_delay_s=0.0, max_interference_s=1.0), profile())
    queues = Queues(line_max_requests=16, pool_max_requests=16)
    late, hopeless, fine = work(1, 0.5), work(1, 1.002), work(1, 2.0)
    for item in (late, hopeless, fine):
        queues.push(item)
    decision = batcher.next(queues, now_s=1.0)
    assert decision.expired == [late, hopeless]  # hopeless: 3 ms to run, 2 ms left
    assert decision.batch is not None and decision.batch.items == [fine]


def test_batch_shrinks_to_keep_the_most_urgent_on_time() -> None:
    p = profile(intercept_s=0.002, per_row_s=0.001)
    batcher = Batcher(BatchRules(max_rows=8, max_queue_delay_s=0.0, max_interference_s=1.0), p)
    queues = Queues(line_max_requests=16, pool_max_requests=16)
    queues.push(work(1, deadline_s=0.0045))
    for _ in range(5):
        queues.push(work(1, deadline_s=1.0))
    batch = batcher.next(queues, 0.0).batch
    assert batch is not None and batch.rows == 2  # 4 ms for 2 rows; 3 rows (5 ms) would be late


def test_only_one_group_per_batch() -> None:
    batcher = Batcher(BatchRules(max_rows=8, max_queue_delay_s=0.0, max_interference_s=1.0), profile())
    queues = Queues(line_max_requests=16, pool_max_requests=16)
    a1, b1, a2 = work(1, 1.0), work(1, 1.1), work(1, 1.2)
    a1.group, b1.group, a2.group = "a", "b", "a"
    for item in (a1, b1, a2):
        queues.push(item)
    batch = batcher.next(queues, 0.0).batch
    assert batch is not None and batch.items == [a1, a2]


@dataclass
class Arrival:
    at_s: float
    rows: int
    priority: Priority
    budget_s: float


arrivals = st.lists(
    st.builds(
        Arrival,
        at_s=st.floats(0.0, 0.2),
        rows=st.integers(1, 4),
        priority=st.sampled_from(list(Priority)),
        budget_s=st.floats(0.001, 0.1),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    arrivals=arrivals,
    workers=st.integers(1, 3),
    max_rows=st.integers(1, 8),
    delay_s=st.sampled_from([0.0, 0.002, 0.01]),
)
def test_simulation_invariants(arrivals: list[Arrival], workers: int, max_rows: int, delay_s: float) -> None:
    """Fake clock, K simulated workers: nothing lost or answered twice, limits, priorities, deadlines."""
    p = profile()
    batcher = Batcher(BatchRules(max_rows=max_rows, max_queue_delay_s=delay_s, max_interference_s=0.006), p)
    queues = Queues(line_max_requests=1000, pool_max_requests=1000)
    pending = sorted((a for a in arrivals if a.rows <= max_rows), key=lambda a: a.at_s)
    now = 0.0
    busy_until = [0.0] * workers
    outcomes: dict[int, str] = {}
    admitted: list[Work] = []

    def answer(item: Work, outcome: str) -> None:
        assert id(item) not in outcomes, "answered twice"
        outcomes[id(item)] = outcome

    while True:
        while pending and pending[0].at_s <= now:
            arrival = pending.pop(0)
            item = Work(arrival.rows, arrival.priority, now + arrival.budget_s, now)
            queues.push(item)
            admitted.append(item)
        wake = None
        share = batcher.share(queues, sum(until <= now for until in busy_until))
        for index in range(workers):
            if busy_until[index] > now:
                continue
            decision = batcher.next(queues, now, share_rows=share)
            for item in decision.expired:
                assert now + p.expected_s(item.rows) > item.deadline_s, "expired work that could run"
                answer(item, "expired")
            if decision.batch is None:
                wake = decision.wake_s
                break
            batch = decision.batch
            assert batch.rows == sum(w.rows for w in batch.items) <= max(1, max_rows)
            if batch.priority is Priority.POOL:
                assert not len(queues.line), "pool work ran while line work waited"
                assert p.expected_s(batch.rows) <= 0.006
            rest = list(queues.by_class[batch.priority])
            if rest:
                assert batch.items[0].deadline_s <= rest[0].deadline_s, "not earliest deadline first"
            keys = [w.sort_key() for w in batch.items]
            assert keys == sorted(keys), "batch not in deadline order"
            for item in batch.items:
                assert now + p.expected_s(batch.rows) <= item.deadline_s, "ran late work"
                answer(item, "ran")
            busy_until[index] = now + p.expected_s(batch.rows)
        upcoming = [t for t in busy_until if t > now]
        if pending:
            upcoming.append(pending[0].at_s)
        if wake is not None:
            upcoming.append(wake)
        upcoming += [w.deadline_s for q in queues.by_class.values() for w in q]
        upcoming = [t for t in upcoming if t > now]
        if not upcoming:
            break
        now = min(upcoming)
    assert not len(queues), "work left in the queue"
    assert len(outcomes) == len(admitted), "a request was lost"


def test_a_partial_batch_waits_only_where_more_requests_are_likely_to_come() -> None:
    """One client alone sends its next request once this one is answered: holding it for more rows
    would add the whole queue delay and batch nothing. A request that came while company was likely
    (the scheduler's CompanyRate at its arrival) still waits to fill its batch."""
    batcher = Batcher(BatchRules(max_rows=8, max_queue_delay_s=0.005, max_interference_s=1.0), profile())
    for expects_company in (False, True):
        queues = Queues(line_max_requests=16, pool_max_requests=16)
        item = work(1, 1.0)
        item.expects_company = expects_company
        queues.push(item)
        decision = batcher.next(queues, 0.0)
        assert (decision.batch is None) is expects_company
        assert (decision.wake_s is not None) is expects_company
