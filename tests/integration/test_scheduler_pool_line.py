"""Line work before pool work, with real ORT sessions: a pool peer never slows or stops the line, never
skews what the profile (and so admission and the capacity offered to the pool) believes, and every
accepted request gets exactly one answer. Batches are held at the worker's seam (tests/holds.py)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import modelzoo
import numpy as np
import pytest
from holds import Batches
from tests_support import FakeClock, load_model, load_written, started, x

from appliance.engine.model import LoadedModel
from appliance.errors import DeadlineExceeded, Overloaded
from appliance.scheduler import worker as worker_module
from appliance.scheduler.placement import PoolRules, Where
from appliance.scheduler.queues import Priority
from appliance.scheduler.runner import ModelScheduler

FAR = "slo_p99_ms = 600000\n"
WAIT_S = 60.0  # what a failing test waits for what a passing one gets at once
THREADS = PoolRules(Where.THREADS, idle_priority=False)  # pool threads of their own (normal priority:
# on a busy box an idle-priority thread may get no CPU at all, and these tests are about bookkeeping)


async def until(condition, what: str) -> None:
    try:
        async with asyncio.timeout(WAIT_S):
            while not condition():
                await asyncio.sleep(0)
    except TimeoutError:
        pytest.fail(f"never {what}")


def hold_only(batches: Batches, marks: set[float]) -> None:
    """Hold the batches whose first request's mark is in `marks` from now on, letting the others go
    (holds.Batches releases all or none; this is its condition, changed and announced)."""
    with batches._changed:
        batches._hold = lambda batch: batch.marks[0] in marks
        batches._changed.notify_all()


def observed_rows(scheduler: ModelScheduler) -> list[int]:
    """The rows of every batch the scheduler's latency profile is told of from now on."""
    seen: list[int] = []
    observe = scheduler.profile.observe

    def noting(rows: int, seconds: float, now_s: float = 0.0) -> None:
        seen.append(rows)
        observe(rows, seconds, now_s)

    scheduler.profile.observe = noting  # type: ignore[method-assign]
    return seen


# 2. The latency profile never learns from a pool batch that line work ran beside.


def test_a_pool_batch_that_line_work_ran_beside_stays_out_of_the_profile(tmp_path: Path, batches) -> None:
    """A pool batch (idle priority in production) is stretched by any line batch during its life. The
    line batch may start after it and end before it settles: line workers idle at its settle say
    nothing. 40 such pool batches made a 0.16 ms row predict 13.6 ms, and an idle box refused line work."""
    model = load_model(tmp_path, modelzoo.batchable(), FAR)

    async def scenario() -> list[list[int]]:
        scheduler = await started(model, instances=1, max_interference_ms=600_000, pool=THREADS)
        seen = observed_rows(scheduler)
        try:
            # a line batch starts after the pool batch and ends before it
            with batches.holding(lambda batch: batch.marks == (3.0,)):
                pool = asyncio.create_task(scheduler.infer(x(3, 3.0), priority=Priority.POOL))
                await batches.held_async()
                await scheduler.infer(x(1, 1.0))  # run and answered while the pool batch is held
            await pool
            started_inside, seen[:] = list(seen), []
            # a line batch runs as the pool batch is dispatched and ends before it
            with batches.holding(lambda batch: batch.marks[0] in (5.0, 6.0)):
                line = asyncio.create_task(scheduler.infer(x(1, 5.0)))
                await batches.held_async(1)
                pool = asyncio.create_task(scheduler.infer(x(3, 6.0), priority=Priority.POOL))
                await batches.held_async(2)
                hold_only(batches, {6.0})
                await line
            await pool
            ran_at_dispatch, seen[:] = list(seen), []
            await scheduler.infer(x(3, 7.0), priority=Priority.POOL)  # alone: what it costs
            return [started_inside, ran_at_dispatch, list(seen)]
        finally:
            await scheduler.close()

    started_inside, ran_at_dispatch, alone = asyncio.run(scenario())
    assert started_inside == [1]  # the line batch, never the 3-row pool batch
    assert ran_at_dispatch == [1]
    assert alone == [3]  # an undisturbed pool batch is observed as any other


def test_line_work_of_another_model_keeps_a_pool_batch_out_of_the_profile(tmp_path: Path, batches) -> None:
    """Every model of the service computes on the same cores: another model's line batch stretches
    this one's pool batch just as much."""
    model = load_model(tmp_path, modelzoo.batchable(), FAR, name="m")
    other = load_model(tmp_path, modelzoo.batchable(), FAR, name="other")

    async def scenario() -> list[int]:
        scheduler = await started(model, instances=1, max_interference_ms=600_000, pool=THREADS)
        neighbour = await started(other, instances=1, max_interference_ms=600_000, pool=THREADS)
        seen = observed_rows(scheduler)
        try:
            with batches.holding(lambda batch: batch.model == "m" and batch.marks == (3.0,)):
                pool = asyncio.create_task(scheduler.infer(x(3, 3.0), priority=Priority.POOL))
                await batches.held_async()
                await neighbour.infer(x(1, 1.0))
            await pool
            return seen
        finally:
            await neighbour.close()
            await scheduler.close()

    assert asyncio.run(scenario()) == []


# 3. Pool jobs are no company for line requests.


def test_pool_jobs_never_make_a_lone_line_client_wait_for_company(tmp_path: Path, batches) -> None:
    """A lone closed-loop line client sends its next request once this one is answered: holding it for
    batch-mates that can never come adds the whole queue delay to each (pool jobs in flight counted as
    company: p50 0.57 -> 7.13 ms). The clock stands still: a request held for company never runs."""
    manifest = FAR + "[batching]\nmax_batch_size = 8\nmax_queue_delay_ms = 100\n"
    model = load_model(tmp_path, modelzoo.batchable(), manifest)
    clock = FakeClock()

    async def scenario() -> tuple[list[float], float, float]:
        scheduler = await started(model, clock, instances=1, max_interference_ms=600_000, pool=THREADS)
        try:
            with batches.holding(lambda batch: batch.priority == "pool"):
                pool = [
                    asyncio.create_task(scheduler.infer(x(1, 10.0 + i), priority=Priority.POOL))
                    for i in range(8)
                ]
                await batches.held_async()
                await until(lambda: scheduler.inflight == 8, "admitted the pool jobs")
                answers = []
                for value in range(5):  # one at a time, each answered before the next
                    line = asyncio.create_task(scheduler.infer(x(1, value)))
                    await until(lambda: scheduler.inflight == 9, "admitted the line request")
                    assert not len(scheduler.queues.line), "a lone line request was held for company"
                    answers.append(float((await line)["s"][0, 0]))
                rates = scheduler.company.rate(clock()), scheduler.pool_company.rate(clock())
            clock.now += 1.0  # the pool jobs' own wait for company (each other) is over
            await asyncio.gather(*pool)
            return answers, *rates
        finally:
            await scheduler.close()

    answers, line_company, pool_company = asyncio.run(scenario())
    assert answers == [4.0 * v for v in range(5)]
    assert line_company == 0.0
    assert pool_company > 0.0  # pool jobs still keep each other company


# 8. A request whose caller is gone leaves its queue at once.


def test_a_cancelled_request_frees_its_queue_slot_at_once(tmp_path: Path, batches) -> None:
    model = load_model(tmp_path, modelzoo.batchable(), FAR + "[batching]\nmax_batch_size = 1\n")

    async def scenario() -> tuple[int, int, dict]:
        scheduler = await started(model, instances=1, line_max_requests=4)
        try:
            with batches.holding(lambda batch: batch.marks == (1.0,)):
                first = asyncio.create_task(scheduler.infer(x(1, 1.0)))
                await batches.held_async()
                ahead = asyncio.create_task(scheduler.infer(x(1, 2.0)))  # queued ahead on the worker
                await until(lambda: scheduler.inflight == 2, "queued one ahead")
                gone = [asyncio.create_task(scheduler.infer(x(1, 10.0 + i))) for i in range(4)]
                await until(lambda: scheduler.inflight == 6, "queued four")
                for task in gone:
                    task.cancel()  # gRPC cancel, a client gone: the handler task is cancelled
                await asyncio.gather(*gone, return_exceptions=True)
                queued = len(scheduler.queues.line), scheduler.queues.line.rows
                assert queued == (0, 0), "the gone still hold their queue slots"
                late = asyncio.create_task(scheduler.infer(x(1, 3.0)))  # the queue was full of the gone
                await until(lambda: scheduler.inflight == 3, "admitted one more")
            await asyncio.gather(first, ahead)
            return *queued, await late
        finally:
            await scheduler.close()

    requests, rows, late = asyncio.run(scenario())
    assert (requests, rows) == (0, 0)
    assert late["s"].tolist() == [[12.0]]
    assert [batch.marks for batch in batches.seen] == [(1.0,), (2.0,), (3.0,)]  # the gone never ran


# 5. A pool batch that already finished is answered, never thrown away and run again.


def test_a_finished_pool_batch_is_not_preempted_and_run_again(tmp_path: Path, batches) -> None:
    """SHARED placement: line work that finds every worker busy stops a running pool batch. One whose
    outcome is only waiting for the event loop has nothing left to stop: it is answered as it is."""
    model = load_model(tmp_path, modelzoo.batchable(), FAR + "[batching]\nmax_batch_size = 1\n")

    async def scenario() -> tuple[list[object], int]:
        scheduler = await started(
            model, instances=1, max_interference_ms=600_000, pool=PoolRules(Where.SHARED)
        )
        worker = scheduler.line_workers[0]
        finished = threading.Event()
        on_done = worker._on_done

        def noting(done_worker, run) -> None:
            on_done(done_worker, run)  # hands the outcome to the loop
            finished.set()

        worker._on_done = noting
        try:
            with batches.holding(lambda batch: batch.priority == "pool"):
                pool = asyncio.create_task(scheduler.infer(x(1, 7.0), priority=Priority.POOL))
                await batches.held_async()
                line = asyncio.create_task(scheduler.infer(x(1, 1.0)))  # admitted at the loop's next turn
            # The pool batch computes and finishes while the loop is busy (here: this wait), so the
            # line request is admitted before the pool outcome is settled.
            assert finished.wait(WAIT_S)
            return await asyncio.gather(pool, line), scheduler.stats.preemptions
        finally:
            await scheduler.close()

    (pooled, line), preemptions = asyncio.run(scenario())
    assert pooled["y"].tolist() == [[15.0] * 4] and line["y"].tolist() == [[3.0] * 4]
    assert [(batch.priority, batch.marks) for batch in batches.seen] == [("pool", (7.0,)), ("line", (1.0,))]
    assert preemptions == 0


# 6. Line work queued ahead on a busy worker is never stranded there.


def test_line_work_queued_ahead_moves_to_a_worker_that_goes_idle(tmp_path: Path, batches) -> None:
    """Queued ahead on worker A, whose batch overruns its prediction (a hiccup, page faults, a noisy
    neighbour: held here), it runs on worker B as soon as B is idle, not when A gets to it."""
    model = load_model(tmp_path, modelzoo.batchable(), FAR + "[batching]\nmax_batch_size = 1\n")

    async def scenario() -> tuple[dict, list[int]]:
        scheduler = await started(model, instances=2)
        try:
            with batches.holding(lambda batch: batch.marks[0] in (1.0, 2.0)):
                a = asyncio.create_task(scheduler.infer(x(1, 1.0)))  # worker A: held for the whole test
                await batches.held_async(1)
                b = asyncio.create_task(scheduler.infer(x(1, 2.0)))  # worker B: held for a moment
                await batches.held_async(2)
                c = asyncio.create_task(scheduler.infer(x(1, 3.0)))
                await until(lambda: scheduler.inflight == 3, "admitted c")
                queued_on = [len(w.runs) for w in scheduler.line_workers]
                hold_only(batches, {1.0})  # B finishes; A goes on
                await b
                done, _ = await asyncio.wait({c}, timeout=WAIT_S)
                assert c in done, "c waited for the busy worker while the other was idle"
            await a
            return c.result(), queued_on
        finally:
            await scheduler.close()

    answer, queued_on = asyncio.run(scenario())
    assert sorted(queued_on) == [1, 2]  # c was queued ahead behind one of the held batches
    assert answer["y"].tolist() == [[7.0] * 4]


def test_line_work_queued_ahead_is_answered_at_its_deadline_not_when_its_worker_frees(
    tmp_path: Path, batches
) -> None:
    """One worker, overrunning: a request queued ahead behind it that can no longer finish in time is
    answered (DeadlineExceeded, never run) as its deadline passes, as it would be in the queue."""
    model = load_model(tmp_path, modelzoo.batchable(), FAR + "[batching]\nmax_batch_size = 1\n")

    async def scenario() -> object:
        scheduler = await started(model, instances=1)
        try:
            with batches.holding(lambda batch: batch.marks == (1.0,)):
                first = asyncio.create_task(scheduler.infer(x(1, 1.0)))
                await batches.held_async()
                urgent = asyncio.create_task(scheduler.infer(x(1, 2.0), timeout_s=0.2))
                await until(lambda: scheduler.inflight == 2, "admitted the urgent request")
                done, _ = await asyncio.wait({urgent}, timeout=WAIT_S)
                assert urgent in done, "answered only once the worker got to it"
            await first
            return urgent.exception()
        finally:
            await scheduler.close()

    error = asyncio.run(scenario())
    if isinstance(error, Overloaded):
        pytest.skip(f"a busy box refused the urgent request at admission: {error}")
    assert isinstance(error, DeadlineExceeded) and "it was not run" in str(error)
    assert [batch.marks for batch in batches.seen] == [(1.0,)]


# 4. A batch's buffers hold the rows it needs where non-batch dimensions are open.


def _two_behind_an_opener(scheduler: ModelScheduler, batches: Batches, width: int):
    """Two 1-row requests of `width` columns that share a batch (behind a held opener and a filler
    queued ahead on the one worker); every outcome."""

    async def run() -> list[object]:
        with batches.holding(lambda batch: batch.marks == (0.0,)):
            first = asyncio.create_task(scheduler.infer({"x": np.zeros((1, 8), np.float32)}))
            await batches.held_async()
            filler = asyncio.create_task(scheduler.infer({"x": np.full((1, 8), 5.0, np.float32)}))
            await until(lambda: scheduler.inflight == 2, "queued the filler ahead")
            pair = [
                asyncio.create_task(scheduler.infer({"x": np.full((1, width), v, np.float32)}))
                for v in (1.0, 2.0)
            ]
            await until(lambda: scheduler.inflight == 4, "admitted the pair")
        return await asyncio.gather(first, filler, *pair, return_exceptions=True)

    return run()


def test_batch_buffers_for_open_dimensions_hold_only_the_rows_needed(tmp_path: Path, batches) -> None:
    """x: [N, D], D open, max_batch_size 512: a buffer of 512 rows of the first request's D (two 64 MiB
    requests: 32 GiB) failed both requests with a 500. Where max_batch_size rows would pass the model's
    request bound, a batch's buffers are exactly its rows; within it (fixed dims), as long as a batch."""
    modelzoo.write(
        tmp_path / "repo", "m", modelzoo.any_width(), manifest=FAR + "[batching]\nmax_batch_size = 512\n"
    )
    model = load_written(tmp_path, "m", max_request_bytes=1 << 20)
    width = 1 << 16  # 256 KiB a row: 512 rows are 128 MiB, past the 1 MiB bound

    async def scenario() -> tuple[list[object], list[tuple[int, ...]]]:
        scheduler = await started(model, instances=1)
        try:
            outcomes = await _two_behind_an_opener(scheduler, batches, width)
            kept = [b.shape for group in scheduler.line_workers[0]._buffers.values() for b in group.values()]
            return outcomes, kept
        finally:
            await scheduler.close()

    outcomes, kept = asyncio.run(scenario())
    assert [type(o).__name__ for o in outcomes] == ["dict"] * 4, outcomes
    assert outcomes[3]["s"].tolist() == [[2.0 * width]]
    assert ((1.0, 2.0), 2) in [(batch.marks, batch.rows) for batch in batches.seen]
    assert kept == [(2, width)]


def test_fixed_dimensions_still_get_a_buffer_as_long_as_the_longest_batch(tmp_path: Path, batches) -> None:
    model = load_model(tmp_path, modelzoo.batchable(), FAR + "[batching]\nmax_batch_size = 64\n")

    async def scenario() -> list[tuple[int, ...]]:
        scheduler = await started(model, instances=1)
        try:
            with batches.holding(lambda batch: batch.marks == (0.0,)):
                first = asyncio.create_task(scheduler.infer(x(1, 0.0)))
                await batches.held_async()
                rest = [asyncio.create_task(scheduler.infer(x(1, v))) for v in (1.0, 2.0, 3.0)]
                await until(lambda: scheduler.inflight == 4, "admitted the rest")
            await asyncio.gather(first, *rest)
            return [b.shape for group in scheduler.line_workers[0]._buffers.values() for b in group.values()]
        finally:
            await scheduler.close()

    assert asyncio.run(scenario()) == [(64, 4)]


def test_a_batch_without_memory_for_its_buffers_runs_each_request_alone(
    tmp_path: Path, batches, monkeypatch
) -> None:
    """MemoryError while assembling a batch is no internal error (500): each request runs on its own
    arrays, and one that cannot be given memory even alone is told to try again (503, Retry-After)."""
    modelzoo.write(
        tmp_path / "repo", "m", modelzoo.any_width(), manifest=FAR + "[batching]\nmax_batch_size = 8\n"
    )
    model = load_written(tmp_path, "m")

    def no_room(self, head, rows):
        raise MemoryError(f"Unable to allocate a buffer of {rows} rows")

    run = LoadedModel.run

    def short_of_memory_for_twos(self, inputs, *args, **kwargs):
        if float(next(iter(inputs.values())).reshape(-1)[0]) == 2.0:
            raise MemoryError("Unable to allocate its outputs")
        return run(self, inputs, *args, **kwargs)

    monkeypatch.setattr(worker_module.Worker, "_buffers_for", no_room)
    monkeypatch.setattr(LoadedModel, "run", short_of_memory_for_twos)

    async def scenario() -> list[object]:
        scheduler = await started(model, instances=1)
        try:
            return await _two_behind_an_opener(scheduler, batches, 16)
        finally:
            await scheduler.close()

    first, filler, one, two = asyncio.run(scenario())
    assert isinstance(first, dict) and isinstance(filler, dict)
    assert one["s"].tolist() == [[16.0]]
    assert isinstance(two, Overloaded) and two.retry_after_s > 0 and "memory" in str(two)
    assert ((1.0, 2.0), 2) in [(batch.marks, batch.rows) for batch in batches.seen]
