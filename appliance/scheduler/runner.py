"""ModelScheduler: the asyncio shell around the pure core: admission, dispatch, outcomes, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from itertools import islice

import numpy as np

from appliance.engine.model import LoadedModel, RunControl
from appliance.engine.replica import Replica
from appliance.errors import DeadlineExceeded, Draining, ModelNotReady
from appliance.scheduler import admission
from appliance.scheduler.activity import LINE_ACTIVITY, LineActivity
from appliance.scheduler.batcher import Batcher, BatchRules
from appliance.scheduler.capacity import Capacity, Ceiling, CompanyRate, CpuBudget, RateMeter, spare
from appliance.scheduler.jobs import Job, SchedulerConfig, Timing
from appliance.scheduler.placement import Where, pool_may_take_a_worker, rules_for, should_preempt
from appliance.scheduler.profile import LatencyProfile
from appliance.scheduler.queues import Priority, Queues, Work, group_of
from appliance.scheduler.stats import ModelStats
from appliance.scheduler.worker import BatchRun, Worker

log = logging.getLogger(__name__)


class ModelScheduler:
    """Serves one LoadedModel: N requests in, N outcomes out, each error belonging to its request."""

    def __init__(
        self,
        model: LoadedModel,
        config: SchedulerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu_budget: CpuBudget | None = None,
        line_activity: LineActivity = LINE_ACTIVITY,
    ) -> None:
        self.model = model
        self.config = config
        self.clock = clock
        self.cpu_budget = cpu_budget  # shared by every model of the process
        self.profile = LatencyProfile(window=config.profile_window)
        self.profile.seed(model.warmup, clock())
        self.batcher = Batcher(
            BatchRules(
                max_rows=model.limits.max_batch_size,
                max_queue_delay_s=model.limits.max_queue_delay_ms / 1e3,
                max_interference_s=config.max_interference_ms / 1e3,
            ),
            self.profile,
        )
        self.ceiling = Ceiling(
            self.profile,
            cpu_budget,
            slo_s=model.slo_p99_ms / 1e3,
            queue_delay_s=self.batcher.rules.max_queue_delay_s,
            compute_threads=self.compute_threads,
        )
        self.queues = Queues(
            line_max_requests=config.line_max_requests, pool_max_requests=config.pool_max_requests
        )
        self.stats = ModelStats()
        self.served = {p: RateMeter() for p in Priority}
        # Arrivals while others of their class are out: whether waiting may fill a batch. Pool jobs are
        # no company for line work (they never share its batches), nor line requests for pool work.
        self.company = CompanyRate()  # line requests'
        self.pool_company = CompanyRate()  # pool jobs'
        self.busy = RateMeter()  # worker-seconds per second
        k = config.instances
        self.line_workers = [Worker(i, model, self._worker_done, _inputs_of, clock) for i in range(k)]
        self.pool_rules = config.pool or rules_for(model.placement.uses_host_cores)
        rules = self.pool_rules
        self.replica = Replica(rules.replica, k) if rules.where is Where.PROCESS and rules.replica else None
        self.pool_workers = [
            Worker(
                k + i,
                model,
                self._worker_done,
                _inputs_of,
                clock,
                is_background=True,
                idle_priority=rules.idle_priority,
                replica=self.replica,
            )
            for i in range(k if rules.has_own_threads else 0)
        ]
        self.workers = self.line_workers + self.pool_workers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_s = math.inf
        self._inflight = 0
        self._inflight_by = dict.fromkeys(Priority, 0)
        self._settled = asyncio.Event()
        self.line_activity = line_activity  # whether a pool batch ran undisturbed (scheduler/activity.py)
        # Its line batches take the host's cores from every idle-priority pool batch of the process.
        self._line_uses_host_cores = model.placement.uses_host_cores
        if self._line_uses_host_cores:
            line_activity.join(self)
        self.is_accepting = False

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def instances(self) -> int:
        """K: the worker threads that run line work on one shared session (scheduler.instances)."""
        return len(self.line_workers)

    @property
    def pool_threads(self) -> int:
        """Threads of its own that run pool work (K on CPU providers, else 0: pool work shares)."""
        return len(self.pool_workers)

    def line_runs(self) -> list[deque[BatchRun]]:
        """The batches each line worker holds (LineActivity's view of this scheduler)."""
        return [w.runs for w in self.line_workers]

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.replica is not None:
            self.replica.start()  # it loads the model meanwhile; the first pool batch waits for it
        for worker in self.workers:
            worker.start()
        self.is_accepting = True
        self._settled.set()

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        *,
        priority: Priority = Priority.LINE,
        timeout_s: float | None = None,
        timing: Timing | None = None,
    ) -> dict[str, np.ndarray]:
        """Validate, admit, wait for the outcome. Raises the request's own error, never another's.
        `timing`, if given, is filled in with where the request's time went."""
        if not self.is_accepting:
            raise Draining(f"model {self.name!r} is draining; not accepting requests", retry_after_s=1.0)
        limits = self.model.limits
        rows = self.model.signature.check(inputs, limits.max_batch_size if limits.is_batched else None)
        now = self.clock()
        deadline_s = now + (timeout_s if timeout_s else self.model.slo_p99_ms / 1e3)
        self._admit(rows, priority, now, deadline_s)
        assert self._loop is not None
        job = Job(inputs, self._loop.create_future(), priority, now, timing=timing)
        job.work = work = Work(rows, priority, deadline_s, now, group=group_of(inputs), payload=job)
        self.queues.push(work)
        company = self.company if priority is Priority.LINE else self.pool_company
        company.arrived(now, self._inflight_by[priority])
        work.expects_company = company.rate(now) * self.batcher.rules.max_queue_delay_s >= 1.0
        self._inflight += 1
        self._inflight_by[priority] += 1
        self._settled.clear()
        job.future.add_done_callback(lambda future: self._answered(job, future))
        self._dispatch()
        return await job.future

    def _admit(self, rows: int, priority: Priority, now_s: float, deadline_s: float) -> None:
        self.profile.refresh(now_s)  # a burst of noise seconds ago weighs less now
        use_pool_workers = priority is Priority.POOL and self.pool_workers
        workers = self.pool_workers if use_pool_workers else self.line_workers
        admission.admit(
            self.name,
            self.batcher,
            self.queues,
            [w.runs for w in workers],
            rows=rows,
            priority=priority,
            now_s=now_s,
            deadline_s=deadline_s,
            pool_yields=self.pool_rules.line_yields,
        )

    def _dispatch(self) -> None:
        now = self.clock()
        self._take_back_queued_ahead(now)
        for work in self.batcher.expire(self.queues, now):
            self._expire(work, now)
        shares_workers = not self.pool_rules.has_own_threads
        share = self.batcher.share(self.queues, sum(not w.runs for w in self.line_workers))
        while idle := [w for w in self.line_workers if not w.runs]:
            if not self._submit_next(idle[0], now, take_pool=shares_workers, share_rows=share):
                break
        if len(self.queues.line) and all(w.runs for w in self.line_workers):
            self._queue_line_work_ahead(now)  # a worker left idle is holding the rest for company
        while len(self.queues.pool) and (idle := [w for w in self.pool_workers if not w.runs]):
            if not self._submit_next(idle[0], now, take_line=False):
                break
        line_waiting = len(self.queues.line) > 0
        if should_preempt(self.pool_rules, line_waiting=line_waiting, line_workers=self.line_workers):
            self._preempt_one_pool_batch()
        deadlines = [q.head().deadline_s for q in self.queues.by_class.values() if q.head()]
        deadlines += [w.deadline_s for _, run in self._queued_ahead() for w in run.items]
        if deadlines:
            self._wake_at(min(deadlines))

    def _take_back_queued_ahead(self, now_s: float) -> None:
        """Line batches queued ahead on a busy worker that have not started go back to the queue while
        another line worker is idle (their worker may overrun its prediction for long: it ran them up to
        half a second late while the other idled), or once a request of theirs cannot finish in time
        (it is answered now, as in the queue, not when that worker gets to it)."""
        is_idle = any(not w.runs for w in self.line_workers)
        for worker, run in list(self._queued_ahead()):
            late = any(now_s + self.profile.expected_s(w.rows) > w.deadline_s for w in run.items)
            if (is_idle or late) and worker.withdraw(run):
                for work in run.items:
                    if not work.payload.future.done():
                        self.queues.requeue(work)

    def _queued_ahead(self) -> Iterator[tuple[Worker, BatchRun]]:
        """Line workers' batches behind the one each runs (or is about to), not yet taken up."""
        for worker in self.line_workers:
            for run in islice(worker.runs, 1, None):
                if not run.is_started:  # set by the worker's thread; Worker.withdraw decides under its lock
                    yield worker, run

    def _queue_line_work_ahead(self, now_s: float) -> None:
        """Give a worker busy with line work its next line batch now, so it never waits for the loop.

        Measured on the 224x224 reference model: workers sat idle about 10% of the time between
        batches while the event loop read request bodies. Pool batches are never queued ahead:
        they must not stand between line work and a worker.
        """
        busy = [w for w in self.line_workers if len(w.runs) == 1 and w.runs[0].priority is Priority.LINE]
        share = self.batcher.share(self.queues, len(busy))
        for worker in sorted(busy, key=lambda w: w.runs[0].started_s + w.runs[0].predicted_s):
            if len(self.queues.line) == 0:  # the soonest free first: it gets the most urgent work
                return
            starts_s = max(now_s, worker.runs[0].started_s + worker.runs[0].predicted_s)
            self._submit_next(worker, now_s, take_pool=False, share_rows=share, starts_s=starts_s)

    def _submit_next(
        self,
        worker: Worker,
        now_s: float,
        *,
        take_line: bool = True,
        take_pool: bool = True,
        share_rows: int | None = None,
        starts_s: float | None = None,
    ) -> bool:
        """Form the next batch as of `starts_s` (default now: `worker` is idle) and hand it to `worker`,
        its line rows capped at `share_rows` (Batcher.share); False when nothing is due. What has
        expired is judged as of `now_s`, never of a busy worker's end: another may run it in time."""
        while True:
            decision = self.batcher.next(
                self.queues,
                now_s,
                take_line=take_line,
                take_pool=take_pool,
                share_rows=share_rows,
                starts_s=starts_s,
            )
            for work in decision.expired:
                self._expire(work, now_s)
            batch = decision.batch
            if batch is None:
                if decision.wake_s is not None:
                    self._wake_at(decision.wake_s)
                return False
            is_pool = batch.priority is Priority.POOL
            if is_pool and take_line and not pool_may_take_a_worker(self.pool_rules, self.line_workers):
                for work in batch.items:
                    self.queues.requeue(work)
                return False
            items = [w for w in batch.items if not w.payload.future.done()]  # cancelled meanwhile
            if items:
                break
        dispatched = self.clock()
        for work in items:
            work.payload.dispatched_s = dispatched
        is_pool = batch.priority is Priority.POOL
        is_preemptible = is_pool and not worker.is_background and self.pool_rules.line_yields
        run = BatchRun(
            items,
            sum(w.rows for w in items),
            batch.priority,
            batch.predicted_s,
            control=RunControl() if is_preemptible else None,
            is_solo=not is_pool and self._is_alone(worker),
        )
        run.started_s = max(dispatched, now_s if starts_s is None else starts_s)
        if worker.is_background:
            run.line_mark = self.line_activity.mark()
        elif not is_pool and self._line_uses_host_cores:
            self.line_activity.line_batch_submitted()
        worker.submit(run)
        return True

    def _is_alone(self, worker: Worker) -> bool:
        """Nothing else runs or waits: the batch may take every core (the model's solo session)."""
        if self.model.solo is None or worker.runs or len(self.queues.line) or len(self.queues.pool):
            return False
        return not any(w.runs for w in self.workers)

    def _preempt_one_pool_batch(self) -> None:
        for worker in self.workers:
            run = worker.current
            if run is not None and run.priority is Priority.POOL and not run.stop_asked:
                run.preempt()
                return

    def _wake_at(self, when_s: float) -> None:
        if when_s >= self._timer_s and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        delay = max(0.0, when_s - self.clock())
        self._timer_s = when_s
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_s = None, math.inf
        self._dispatch()

    def _expire(self, work: Work, now_s: float) -> None:
        future = work.payload.future
        if not future.done():
            waited_ms = (now_s - work.arrived_s) * 1e3
            budget_ms = (work.deadline_s - work.arrived_s) * 1e3
            future.set_exception(
                DeadlineExceeded(
                    f"model {self.name!r}: request expired in the queue after {waited_ms:.1f} ms "
                    f"(deadline {budget_ms:.1f} ms); it was not run"
                )
            )

    def _worker_done(self, worker: Worker, run: BatchRun) -> None:
        """Called on the worker thread; hands the outcome to the event loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._settle, worker, run)

    def _settle(self, worker: Worker, run: BatchRun) -> None:
        worker.settled(run)
        if run.ignores_rows and not self.batcher.is_one_request_per_batch:
            self.batcher.is_one_request_per_batch = True  # each of that batch ran alone (Worker._execute)
            log.warning("model %s: outputs do not follow the batch dimension; not batching", self.name)
        for work, error in run.expired:
            if not work.payload.future.done():
                work.payload.future.set_exception(error)
        if run.is_preempted:
            self.stats.preemptions += 1
            for work in run.items:
                if not work.payload.future.done():
                    self.queues.requeue(work)
        else:
            now = self.clock()
            if run.is_whole and run.compute_s > 0:
                # Not a solo batch (all cores: not what K workers' batches take), nor a pool batch at
                # idle priority that line work ran beside at any time of its life (activity.py).
                disturbed = worker.is_background and (
                    run.line_mark is None or self.line_activity.disturbed(run.line_mark)
                )
                if not run.is_solo and not disturbed:
                    self.profile.observe(run.rows, run.compute_s, now)
                self.stats.record_batch(run.rows, run.compute_s, len(run.items))
                self.busy.add(now, run.compute_s)
            for work, outcome in zip(run.items, run.outcomes, strict=True):
                future = work.payload.future
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    job = work.payload
                    if job.timing is not None and job.dispatched_s is not None:
                        job.timing.queue_s = job.dispatched_s - job.arrived_s
                        job.timing.compute_s, job.timing.batch_rows = run.compute_s, run.rows
                    future.set_result(outcome)
                    self.served[work.priority].add(now, work.rows)
        self._dispatch()

    def _answered(self, job: Job, future: asyncio.Future[dict[str, np.ndarray]]) -> None:
        now = self.clock()
        if future.cancelled():
            outcome = "cancelled"
        elif future.exception() is not None:
            outcome = type(future.exception()).__name__
        else:
            outcome = "success"
        queue_s = job.dispatched_s - job.arrived_s if job.dispatched_s is not None else None
        self.stats.record_request(job.priority.label, outcome, now - job.arrived_s, queue_s)
        self.stats.last_inference_ms = int(time.time() * 1e3)
        if future.cancelled() and job.work is not None:  # its caller is gone: its queue slot is free now
            with contextlib.suppress(ValueError):  # not queued: on a worker, or already expired
                self.queues.by_class[job.priority].remove(job.work)
        self._inflight -= 1
        self._inflight_by[job.priority] -= 1
        if self._inflight_by[job.priority] == 0:
            (self.company if job.priority is Priority.LINE else self.pool_company).idle(now)
        if self._inflight == 0:
            self._settled.set()

    @property
    def compute_threads(self) -> int:
        """CPU threads busy while ORT computes: the intra-op threads on a CPU provider, else none."""
        return self.model.threads_per_call if self.model.placement.uses_host_cores else 0

    def capacity(self, reserved_share: float) -> Capacity:
        now = self.clock()
        self.profile.refresh(now)
        max_ips, rows = self.ceiling.get(len(self.line_workers), self.batcher.row_limit)
        served = sum(meter.rate(now) for meter in self.served.values())
        return Capacity(max_ips, rows, served, spare(max_ips, served, reserved_share))

    def utilisation(self) -> float:
        """Share of worker time spent computing over the last window."""
        return min(1.0, self.busy.rate(self.clock()) / len(self.line_workers))

    def hung_workers(self, hang_s: float) -> list[int]:
        """Line workers busy on one batch for longer than `hang_s` (what stops the systemd watchdog).

        Pool workers at idle priority wait for as long as line work keeps the cores busy: by design,
        not a hang, and no reason to restart a service that is serving its line.
        """
        now = time.monotonic()
        return [w.index for w in self.line_workers if w.is_hung(now, hang_s)]

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting; wait until every admitted request is answered. True if it settled in time."""
        self.is_accepting = False
        self.batcher.is_flushing = True
        if self._loop is not None:
            self._dispatch()
        try:
            async with asyncio.timeout(timeout_s):
                await self._settled.wait()
        except TimeoutError:
            return False
        return True

    def resume(self) -> None:
        self.batcher.is_flushing = False
        self.is_accepting = True

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (after drain). Queued work still waiting is failed, never dropped."""
        self.is_accepting = False
        for queue in self.queues.by_class.values():
            for work in list(queue):
                queue.remove(work)
                if not work.payload.future.done():
                    work.payload.future.set_exception(
                        ModelNotReady(f"model {self.name!r} was unloaded before the request ran")
                    )
        for worker in self.workers:
            worker.stop()
        for worker in self.workers:
            if not await asyncio.to_thread(worker.join, timeout_s):
                log.warning("model %s: worker %d did not stop in %.0f s", self.name, worker.index, timeout_s)
        if self.replica is not None:
            await asyncio.to_thread(self.replica.close, timeout_s)
        if self._timer is not None:
            self._timer.cancel()
        self.line_activity.leave(self)
        if not any(w.is_alive for w in self.workers):
            self.model.close()  # its sessions go now; a worker still running keeps them
            for worker in self.workers:
                worker.release()


def _inputs_of(work: Work) -> Mapping[str, np.ndarray]:
    return work.payload.inputs
