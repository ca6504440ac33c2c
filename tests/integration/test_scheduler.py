"""The scheduler shell with real ORT sessions: admission, queue bounds, expiry, priorities, preemption."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import modelzoo
import numpy as np
import pytest
from onnx import TensorProto, helper
from tests_support import FakeClock, started, x
from tests_support import load_model as load

from appliance.engine.model import LoadedModel
from appliance.engine.priority import ThreadPriority
from appliance.errors import DeadlineExceeded, ModelNotReady, Overloaded
from appliance.scheduler.placement import PoolRules, Where
from appliance.scheduler.queues import Priority
from appliance.scheduler.runner import ModelScheduler, SchedulerConfig, Timing


async def gather_outcomes(*coroutines) -> list[object]:
    return await asyncio.gather(*coroutines, return_exceptions=True)


async def until(condition, what: str) -> None:
    """Wait on the scheduler's loop until `condition()` holds (tasks admitted, a drain begun)."""
    try:
        async with asyncio.timeout(60):
            while not condition():
                await asyncio.sleep(0)
    except TimeoutError:
        pytest.fail(f"never {what}")


def test_full_queue_refuses_with_overloaded(tmp_path: Path) -> None:
    model = load(tmp_path, modelzoo.batchable(), "slo_p99_ms = 10000\n[batching]\nmax_batch_size = 1\n")

    async def scenario() -> list[object]:
        scheduler = await started(model, instances=1, line_max_requests=2)
        try:
            return await gather_outcomes(*(scheduler.infer(x()) for _ in range(6)))
        finally:
            await scheduler.close()

    outcomes = asyncio.run(scenario())
    # one running, one queued ahead on the worker, two waiting in the queue; the rest are refused
    assert [type(o).__name__ for o in outcomes] == ["dict"] * 4 + ["QueueFull"] * 2
    assert "line queue is full (2 requests waiting)" in str(outcomes[4])


def test_admission_refuses_what_cannot_meet_its_deadline(tmp_path: Path) -> None:
    model = load(tmp_path, modelzoo.heavy(layers=16, width=256))

    async def scenario() -> None:
        scheduler = await started(model, instances=1)
        try:
            with pytest.raises(Overloaded, match=r"would finish in .* after its deadline"):
                await scheduler.infer({"x": np.ones((8, 256), np.float32)}, timeout_s=1e-6)
            result = await scheduler.infer({"x": np.ones((8, 256), np.float32)}, timeout_s=30.0)
            assert result["y"].shape == (8, 256)
        finally:
            await scheduler.close()

    asyncio.run(scenario())


def test_work_that_expires_in_the_queue_is_answered_not_run(tmp_path: Path, batches) -> None:
    model = load(tmp_path, modelzoo.batchable(), "[batching]\nmax_batch_size = 1\n")
    clock = FakeClock()

    async def scenario() -> list[object]:
        scheduler = await started(model, clock=clock, instances=1)
        try:
            with batches.holding(lambda batch: batch.marks == (1.0,)):
                first = asyncio.create_task(scheduler.infer(x(), timeout_s=1000.0))
                await batches.held_async()  # the one worker is busy with the first
                second = asyncio.create_task(scheduler.infer(x(value=2), timeout_s=0.5))
                await until(lambda: scheduler.inflight == 2, "admitted the second request")
                clock.now += 5.0  # both were admitted; the second is now past its deadline
            outcomes = await gather_outcomes(first, second)
            assert scheduler.stats.execution_count == 1
            return outcomes
        finally:
            await scheduler.close()

    first, second = asyncio.run(scenario())
    assert isinstance(first, dict)
    assert isinstance(second, DeadlineExceeded)
    # expired in the queue, or on the worker it was queued ahead to: either way, never run
    assert "expired" in str(second) and "it was not run" in str(second)
    assert [batch.marks for batch in batches.seen] == [(1.0,)]


def test_line_runs_before_pool_and_outcomes_keep_their_owner(tmp_path: Path, batches) -> None:
    model = load(tmp_path, modelzoo.batchable(), "slo_p99_ms = 600000\n[batching]\nmax_batch_size = 1\n")

    async def scenario() -> list[object]:
        scheduler = await started(
            model, instances=1, max_interference_ms=600_000, pool=PoolRules(Where.SHARED, preempt=False)
        )
        try:
            with batches.holding(lambda batch: batch.marks == (0.0,)):
                tasks = [asyncio.create_task(scheduler.infer(x(value=0), priority=Priority.POOL))]
                await batches.held_async()  # a pool batch holds the one worker: the rest wait in the queues
                # More pool work arrives first, line work after it: line work must still run first.
                for value in (1, 2, 3, 4):
                    priority = Priority.POOL if value < 3 else Priority.LINE
                    tasks.append(asyncio.create_task(scheduler.infer(x(value=value), priority=priority)))
                await until(lambda: scheduler.inflight == 5, "admitted all five requests")
            return await gather_outcomes(*tasks)
        finally:
            await scheduler.close()

    outcomes = asyncio.run(scenario())
    assert [outcome["s"][0, 0] for outcome in outcomes] == [4.0 * v for v in range(5)]  # each its own row
    assert [(batch.marks, batch.priority) for batch in batches.seen] == [
        ((0.0,), "pool"),
        ((3.0,), "line"),
        ((4.0,), "line"),
        ((1.0,), "pool"),
        ((2.0,), "pool"),
    ]


def test_line_work_preempts_a_running_pool_batch(tmp_path: Path, batches) -> None:
    model = load(tmp_path, modelzoo.batchable(), "slo_p99_ms = 600000\n[batching]\nmax_batch_size = 64\n")

    async def scenario() -> tuple[dict, dict, ModelScheduler]:
        scheduler = await started(
            model, instances=1, max_interference_ms=600_000, pool=PoolRules(Where.SHARED)
        )
        pool_input = {"x": np.full((64, 4), 7.0, np.float32)}
        try:
            with batches.holding(lambda batch: batch.marks == (7.0,)):
                pool = asyncio.create_task(scheduler.infer(pool_input, priority=Priority.POOL))
                await batches.held_async()  # the pool batch holds the one worker
                line = asyncio.create_task(scheduler.infer(x(value=1)))
                await until(lambda: scheduler.inflight == 2, "admitted the line request")
                # Line work found every worker busy: the running pool batch was told to stop (it is
                # preempted once its worker sees ORT stop it).
                assert scheduler.workers[0].current.stop_asked
            return await line, await pool, scheduler
        finally:
            await scheduler.close()

    line, pooled, scheduler = asyncio.run(scenario())
    np.testing.assert_array_equal(pooled["y"], np.full((64, 4), 15.0, np.float32))  # run again, whole
    assert line["s"].tolist() == [[4.0]]
    # The stopped pool batch, then the line request, then the pool batch again from its queue.
    assert [(batch.priority, batch.rows) for batch in batches.seen] == [
        ("pool", 64),
        ("line", 1),
        ("pool", 64),
    ]
    assert scheduler.stats.preemptions == 1


def test_drain_then_close_fails_nothing_and_refuses_new_work(tmp_path: Path, batches) -> None:
    model = load(tmp_path, modelzoo.batchable(), "slo_p99_ms = 600000\n")

    async def scenario() -> None:
        scheduler = await started(model, instances=2)
        with batches.holding(lambda batch: True):  # every batch runs until released: none finishes early
            pending = [asyncio.create_task(scheduler.infer(x(value=i))) for i in range(10)]
            await batches.held_async()
            await until(lambda: scheduler.inflight == 10, "admitted all ten requests")
            drain = asyncio.create_task(scheduler.drain(600.0))
            await until(lambda: not scheduler.is_accepting, "began to drain")
            with pytest.raises(ModelNotReady, match="draining"):
                await scheduler.infer(x())
            assert not drain.done()  # a batch is still running: the drain waits for it
        assert await drain
        assert all(task.done() and not task.exception() for task in pending)
        assert sorted(task.result()["s"][0, 0] for task in pending) == [4.0 * i for i in range(10)]
        await scheduler.close()

    asyncio.run(scenario())


def test_pool_work_runs_on_lowest_priority_threads_on_the_cpu(tmp_path: Path) -> None:
    model = load(tmp_path, modelzoo.batchable(), "slo_p99_ms = 10000\n")

    async def scenario() -> tuple[list[dict], list[int]]:
        scheduler = await started(model, instances=2, max_interference_ms=10_000)
        try:
            assert scheduler.pool_rules.where is Where.THREADS and len(scheduler.pool_workers) == 2
            results = await asyncio.gather(
                *(scheduler.infer(x(value=v), priority=Priority.POOL) for v in range(8)),
                *(scheduler.infer(x(value=10 + v)) for v in range(8)),
            )
            pool_threads = {w.index for w in scheduler.pool_workers}
            assert all(w.is_background == (w.index in pool_threads) for w in scheduler.workers)
            priorities = [w._priority for w in scheduler.pool_workers]
            assert all(p is not None for p in priorities)
            return list(results), [p.name for p in priorities]
        finally:
            await scheduler.close()

    results, names = asyncio.run(scenario())
    assert [r["s"][0, 0] for r in results] == [4.0 * v for v in range(8)] + [4.0 * (10 + v) for v in range(8)]
    assert names == ["pool-m-2", "pool-m-3"]


def test_pool_threads_at_normal_priority_never_lower_theirs(tmp_path: Path, monkeypatch) -> None:
    model = load(tmp_path, modelzoo.batchable(), "slo_p99_ms = 10000\n")
    seen: list[tuple[int, int]] = []
    run = LoadedModel.run

    def observing(self, *args, **kwargs):
        tid = threading.get_native_id()
        seen.append((os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(LoadedModel, "run", observing)

    async def scenario() -> None:
        rules = PoolRules(Where.THREADS, idle_priority=False)
        scheduler = await started(model, instances=1, max_interference_ms=10_000, pool=rules)
        try:
            await scheduler.infer(x(value=2), priority=Priority.POOL)
            assert [w._priority for w in scheduler.pool_workers] == [None]
        finally:
            await scheduler.close()

    asyncio.run(scenario())
    assert seen == [(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))]


def test_background_priority_is_lowest_only_around_the_run() -> None:
    seen: list[tuple[bool, bool, bool]] = []

    def observe() -> None:
        tid = threading.get_native_id()

        def is_lowest() -> bool:
            return os.sched_getscheduler(tid) == os.SCHED_IDLE or os.getpriority(os.PRIO_PROCESS, tid) == 19

        priority = ThreadPriority("probe")
        priority.lower()
        during = is_lowest()
        priority.restore()
        seen.append((during, is_lowest(), priority.can_restore))

    thread = threading.Thread(target=observe)
    thread.start()
    thread.join()
    [(during, after, can_restore)] = seen
    assert during  # lowest while ONNX Runtime computes
    assert after == (not can_restore)  # normal again after, wherever RLIMIT_NICE allows going back


def test_capacity_follows_the_fit_and_is_not_recomputed_per_request(tmp_path: Path, monkeypatch) -> None:
    from appliance.scheduler import capacity
    from appliance.scheduler.capacity import CpuBudget

    model = load(tmp_path, modelzoo.batchable(), "slo_p99_ms = 1000\n[batching]\nmax_batch_size = 8\n")
    computed: list[int] = []
    real = capacity.max_ips_at_slo

    def counting(*args, **kwargs):
        computed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(capacity, "max_ips_at_slo", counting)
    budget = CpuBudget(cores=2.0)

    async def scenario() -> None:
        scheduler = ModelScheduler(model, SchedulerConfig(instances=1), cpu_budget=budget)
        scheduler.start()
        try:
            first = scheduler.capacity(0.2)
            assert all(scheduler.capacity(0.2) == first for _ in range(10))  # one pool job each
            assert len(computed) == 1
            slow_s = 20 * scheduler.profile.expected_s(4)
            for _ in range(256):  # the model gets 20x slower: the window refits to it
                scheduler.profile.observe(4, slow_s)
            slower = scheduler.capacity(0.2)
            assert len(computed) == 2 and slower.max_ips_at_slo < first.max_ips_at_slo / 5
            budget.overhead_s_per_row = 0.01  # 10 ms of event loop per row: at most 100 rows/s
            assert scheduler.capacity(0.2).max_ips_at_slo <= 100 and len(computed) == 3
        finally:
            await scheduler.close()

    asyncio.run(scenario())


def test_only_line_workers_count_as_hung(tmp_path: Path) -> None:
    model = load(tmp_path, modelzoo.batchable())

    async def scenario() -> tuple[list[int], list[int]]:
        scheduler = await started(model, instances=1)
        try:
            assert scheduler.pool_workers, "CPU provider: pool work has threads of its own"
            long_ago = time.monotonic() - 3600
            scheduler.pool_workers[0].busy_since_s = long_ago  # starved at idle priority for an hour
            pool_only = scheduler.hung_workers(60.0)
            scheduler.line_workers[0].busy_since_s = long_ago
            both = scheduler.hung_workers(60.0)
            scheduler.line_workers[0].busy_since_s = scheduler.pool_workers[0].busy_since_s = None
            return pool_only, both
        finally:
            await scheduler.close()

    pool_only, both = asyncio.run(scenario())
    assert pool_only == []
    assert both == [0]


def test_a_request_learns_where_its_time_went(tmp_path: Path) -> None:
    """What a signed pool answer states: the queue before its batch, the batch's compute and rows."""
    model = load(tmp_path, modelzoo.batchable(), "slo_p99_ms = 10000\n")

    async def scenario() -> Timing:
        scheduler = await started(model, instances=1)
        try:
            timing = Timing()
            await scheduler.infer(x(rows=3), timing=timing)
            return timing
        finally:
            await scheduler.close()

    timing = asyncio.run(scenario())
    assert timing.batch_rows == 3 and timing.compute_s > 0 and timing.queue_s >= 0


def test_queue_ahead_never_expires_what_another_worker_runs_in_time(tmp_path: Path, batches) -> None:
    """Two busy workers, ending at 9 ms and 2 ms; a request due in 8 ms fits on the second. Queued
    ahead, it must go to the one that frees first, and never be expired against the other one's end."""
    manifest = "slo_p99_ms = 60000\n[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 0\n"
    model = load(tmp_path, modelzoo.batchable(), manifest)
    clock = FakeClock()

    async def scenario() -> list[object]:
        scheduler = ModelScheduler(model, SchedulerConfig(instances=2), clock=clock)
        profile = scheduler.profile  # l(rows) = 1 ms + 1 ms per row, exactly
        profile.intercept_s, profile.per_row_s, profile.per_row2_s, profile.margin_ratio = (
            1e-3,
            1e-3,
            0.0,
            1.0,
        )
        profile._best_rows.clear()
        scheduler.start()
        try:
            with batches.holding(lambda batch: batch.marks in {(1.0,), (2.0,)}):
                long = asyncio.create_task(scheduler.infer(x(8, 1.0), timeout_s=1.0))  # ends at 9 ms
                await batches.held_async(1)
                short = asyncio.create_task(scheduler.infer(x(1, 2.0), timeout_s=1.0))  # ends at 2 ms
                await batches.held_async(2)
                urgent = asyncio.create_task(scheduler.infer(x(1, 3.0), timeout_s=0.008))
                await until(lambda: scheduler.inflight == 3, "admitted the urgent request")
                await asyncio.sleep(0)  # its dispatch has run
                assert not urgent.done()
            return await gather_outcomes(long, short, urgent)
        finally:
            await scheduler.close()

    outcomes = asyncio.run(scenario())
    assert [type(o).__name__ for o in outcomes] == ["dict"] * 3, outcomes
    assert outcomes[2]["y"][0, 0] == 7.0  # y = 2x + 1, its own row


def _total() -> object:
    """Batchable by its signature (x: [N, D]), but its one output is [1, 1] whatever N: the sum of all."""
    return modelzoo._model(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "D"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 1])],
    )


def test_a_batch_whose_outputs_ignore_its_rows_answers_each_request_alone(tmp_path: Path, batches) -> None:
    """Warm-up cannot see it through a dynamic non-batch dimension: two requests that each succeed
    alone must not both fail when they share a batch. Each runs alone, and the model batches no more.
    (The first request behind the held opener is queued ahead on its own; the next two share a batch.)"""
    model = load(tmp_path, _total(), "slo_p99_ms = 60000\n")
    assert model.limits.is_batched

    async def scenario() -> list[object]:
        scheduler = await started(model, instances=1)

        async def behind_an_opener(values: tuple[float, ...]) -> list[object]:
            """A request held at the worker, then `values` admitted behind it; all their outcomes."""
            with batches.holding(lambda batch: batch.marks == (9.0,)):
                opener = asyncio.create_task(scheduler.infer({"x": np.full((1, 3), 9.0, np.float32)}))
                await batches.held_async()
                behind = [
                    asyncio.create_task(scheduler.infer({"x": np.full((1, 3), v, np.float32)}))
                    for v in values
                ]
                await until(lambda: scheduler.inflight == 1 + len(values), f"admitted {values}")
            return await gather_outcomes(opener, *behind)

        try:
            outcomes = await behind_an_opener((1, 2, 3))
            assert scheduler.batcher.is_one_request_per_batch
            return outcomes + await behind_an_opener((4, 5, 6))
        finally:
            await scheduler.close()

    outcomes = asyncio.run(scenario())
    assert [type(o).__name__ for o in outcomes] == ["dict"] * 8, outcomes
    assert [float(o["total"][0, 0]) for o in outcomes] == [27.0, 3.0, 6.0, 9.0, 27.0, 12.0, 15.0, 18.0]
    assert [batch.marks for batch in batches.seen] == [
        (9.0,),
        (1.0,),
        (2.0, 3.0),
        (9.0,),
        (4.0,),
        (5.0,),
        (6.0,),
    ]
