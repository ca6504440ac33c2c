"""Worker threads: assemble a batch into reused buffers, run ORT, split outputs back as views."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from appliance.engine.model import LoadedModel, RunControl, Terminated
from appliance.engine.priority import ThreadPriority
from appliance.engine.replica import Replica
from appliance.errors import ApplianceError, DeadlineExceeded, InferenceFailed, ModelNotReady, Overloaded
from appliance.scheduler.queues import Priority, Work

log = logging.getLogger(__name__)

Outcome = dict[str, np.ndarray] | ApplianceError

# A test seam, as httpx's MockTransport is one: when set, each worker calls it on its own thread with
# every batch it is about to run (after late work is dropped, before its compute is timed). Tests hold
# a batch "mid-compute" with it for as long as they need, or see which requests shared a batch
# (tests/holds.py). None in production: one global read per batch.
before_batch: Callable[[Worker, BatchRun], None] | None = None


# How long a pool process may take past a batch's last deadline before it is taken as hung (and the
# most it may take at all): its answer is no use by then, and its worker serves no other pool work.
REPLICA_GRACE_S = 1.0
REPLICA_WAIT_MAX_S = 600.0

# What a worker's batch buffers may take, kept between batches, and the most a buffer made
# max_batch_size rows long may take: the model's request bound (LoadedModel.max_request_bytes), or
# this where it has none. An open non-batch dimension has no size known in advance: 512 rows of the
# first request's shape for two 64 MiB requests (32 GiB) failed both, where the 2 rows they need fit.
BUFFER_BYTES = 64 * 1024 * 1024
MEMORY_RETRY_S = 1.0  # Retry-After of a request that could not be given memory to run (503)


def _gone(_worker: Worker, _run: BatchRun) -> None:
    """The callback of a released worker: it has stopped, so nothing calls it."""


@dataclass(slots=True, eq=False)
class BatchRun:
    """One batch handed to a worker, and what came of it."""

    items: list[Work]
    rows: int
    priority: Priority
    predicted_s: float
    control: RunControl | None = None  # set for preemptible (pool) batches
    outcomes: list[Outcome] = field(default_factory=list)
    compute_s: float = 0.0
    started_s: float = 0.0
    is_preempted: bool = False  # stopped mid-compute (the worker saw Terminated): its items run again
    stop_asked: bool = False  # preempt() was called; a batch that had already finished keeps its outcomes
    is_started: bool = False  # its worker has taken it up (under the worker's lock)
    is_withdrawn: bool = False  # taken back before it started (Worker.withdraw): its worker skips it
    line_mark: object = None  # for a pool batch: line activity when it was dispatched (scheduler/activity.py)
    is_whole: bool = True  # False when the batch failed and items ran one by one
    ignores_rows: bool = False  # its outputs did not follow the batch dimension: the model must not batch
    is_solo: bool = False  # alone on the box: run on the model's all-cores session (LoadedModel.solo)
    expired: list[tuple[Work, ApplianceError]] = field(default_factory=list)  # dropped before running

    def preempt(self) -> None:
        """Ask its run to stop (ORT checks between nodes). Only a run that was stopped is preempted:
        one that had already finished, its outcome waiting for the event loop, is answered as it is."""
        if self.control is not None and not self.stop_asked:
            self.stop_asked = True
            self.control.terminate()


class Worker:
    """A thread that runs batches of one model, in order; the scheduler may queue one batch ahead."""

    def __init__(
        self,
        index: int,
        model: LoadedModel,
        on_done: Callable[[Worker, BatchRun], None],
        inputs_of: Callable[[Work], dict[str, np.ndarray]],
        clock: Callable[[], float] = time.monotonic,
        *,
        is_background: bool = False,
        idle_priority: bool = True,
        replica: Replica | None = None,
    ) -> None:
        self._clock = clock
        self.is_background = is_background  # runs pool work
        self._lowers_priority = is_background and idle_priority  # at the lowest CPU priority
        self.replica = replica  # runs this worker's batches in the pool process
        self._priority: ThreadPriority | None = None
        self.index = index
        self.model = model
        self.runs: deque[BatchRun] = deque()  # submitted and not settled; the first one is running
        self.busy_since_s: float | None = None
        self._on_done = on_done
        self._inputs_of = inputs_of
        self._inbox: queue.SimpleQueue[BatchRun | None] = queue.SimpleQueue()
        self._buffers: dict[Hashable, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()  # whether a queued batch starts or is withdrawn: one or the other
        self._away_s = 0.0  # of the batch running: time spent waiting on the pool process, not computing
        kind = "pool" if is_background else "worker"
        self._thread = threading.Thread(target=self._loop, name=f"{kind}-{model.name}-{index}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def current(self) -> BatchRun | None:
        return self.runs[0] if self.runs else None

    def submit(self, run: BatchRun) -> None:
        if not self.runs:
            self.busy_since_s = time.monotonic()
        self.runs.append(run)
        self._inbox.put(run)

    def settled(self, run: BatchRun) -> None:
        """Called on the event loop once `run`'s outcomes are handed out."""
        self.runs.remove(run)

    def withdraw(self, run: BatchRun) -> bool:
        """Take back a batch queued on this worker that has not started (on the event loop): True if it
        is withdrawn, its items the caller's again; False if the worker has already taken it up."""
        with self._lock:
            if run.is_started:
                return False
            run.is_withdrawn = True
        self.runs.remove(run)
        return True

    def stop(self) -> None:
        self._inbox.put(None)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def release(self) -> None:
        """Once stopped: let go of the scheduler (the bound callback), so that a retired scheduler and all it
        holds are freed when its last reference goes, not whenever the cyclic collector next runs."""
        self._on_done = _gone

    def is_hung(self, now_s: float, hang_s: float) -> bool:
        return self.busy_since_s is not None and now_s - self.busy_since_s > hang_s

    def _loop(self) -> None:
        if self._lowers_priority:
            self._priority = ThreadPriority(self._thread.name)
        while (run := self._inbox.get()) is not None:
            with self._lock:
                if run.is_withdrawn:
                    continue  # the scheduler took it back for another worker, or to expire it
                run.is_started = True
            self.busy_since_s = time.monotonic()
            # A batch queued ahead was given the start its predecessor's prediction implied; it
            # starts now. Left stale, a predecessor that ended early made admission see work that
            # had already begun as starting up to one batch later (16 clients: a third refused).
            run.started_s = self._clock()
            try:
                self._execute(run)
            except BaseException as exc:
                log.exception("worker %s: batch failed unexpectedly", self._thread.name)
                failure = InferenceFailed(f"model {self.model.name!r}: internal error: {exc}")
                run.outcomes = [failure] * len(run.items)
            self.busy_since_s = None
            self._on_done(self, run)
        self._buffers.clear()  # stopped: the batch buffers go now, not when the scheduler is collected

    def _execute(self, run: BatchRun) -> None:
        late = [w for w in run.items if self._clock() > w.deadline_s]
        if late:  # a batch queued ahead whose start slipped past a deadline: never run late work
            self._drop_late(run, late)
            if not run.items:
                return
        if before_batch is not None:
            before_batch(self, run)
        try:
            started = time.perf_counter()  # copies in and out count: they grow with the batch too
            self._away_s = 0.0
            feed = self._assemble(run.items, run.rows)
            results = self._run(feed, run.control, is_solo=run.is_solo, items=run.items)
            if len(run.items) > 1 and not _follow_rows(results, run.rows):
                # A dynamic non-batch dimension can hide this from warm-up: the batch's outputs cannot
                # be split, but each request alone has its own. The scheduler stops batching the model.
                run.is_whole, run.ignores_rows = False, True
                run.outcomes = [self._run_alone(work) for work in run.items]
                return
            run.outcomes = self._split(results, run)
            run.compute_s = time.perf_counter() - started - self._away_s
        except Terminated:
            run.is_preempted = True
        except MemoryError:  # no room for the batch's buffers: each request alone runs on its own arrays
            self._buffers.clear()
            run.is_whole = False
            run.outcomes = [self._run_alone(work) for work in run.items]
        except DeadlineExceeded as exc:  # the pool process hung (Replica.run): alone, each would again
            run.outcomes = [exc] * len(run.items)
        except ApplianceError as exc:
            if len(run.items) == 1:
                run.outcomes = [exc]
            else:  # find whose input broke the batch: each request gets its own outcome
                run.is_whole = False
                run.outcomes = [self._run_alone(work) for work in run.items]

    def _run(
        self,
        feed: dict[str, np.ndarray],
        control: RunControl | None,
        *,
        is_solo: bool = False,
        items: Sequence[Work] = (),
    ) -> dict[str, np.ndarray]:
        replica = self.replica
        if replica is not None and replica.is_usable:
            sent = time.perf_counter()
            try:
                channel = self.index % replica.channels  # pool workers are numbered K..2K-1
                latest_s = max((w.deadline_s for w in items), default=self._clock())
                wait_s = min(REPLICA_WAIT_MAX_S, max(0.0, latest_s - self._clock()) + REPLICA_GRACE_S)
                results, compute_s = replica.run(channel, feed, wait_s)
                # the socket and the child's wait for an idle core are not what the batch costs
                self._away_s += time.perf_counter() - sent - compute_s
                return results
            except ModelNotReady:
                if replica.failure is None:
                    raise
                # the pool process cannot load the model: run here, at idle priority, from now on
        if self._priority is None:
            return self.model.run(feed, control=control, is_solo=is_solo)
        with self._priority.lowered():
            return self.model.run(feed, control=control)

    def _drop_late(self, run: BatchRun, late: list[Work]) -> None:
        for work in late:
            waited_ms = (self._clock() - work.arrived_s) * 1e3
            run.expired.append(
                (
                    work,
                    DeadlineExceeded(
                        f"model {self.model.name!r}: request expired after {waited_ms:.1f} ms "
                        "waiting for a worker; it was not run"
                    ),
                )
            )
        run.items = [w for w in run.items if w not in late]
        run.rows = sum(w.rows for w in run.items)

    def _run_alone(self, work: Work) -> Outcome:
        try:
            return self._run(dict(self._inputs_of(work)), None, items=[work])
        except ApplianceError as exc:
            return exc
        except MemoryError:
            return Overloaded(
                f"model {self.model.name!r}: not enough memory to run this request now; try again",
                retry_after_s=MEMORY_RETRY_S,
            )

    def _assemble(self, items: list[Work], rows: int) -> dict[str, np.ndarray]:
        if len(items) == 1:
            return self._inputs_of(items[0])  # zero-copy
        buffers = self._buffers_for(items[0], rows)
        feed = {}
        for name, buffer in buffers.items():
            np.concatenate([self._inputs_of(work)[name] for work in items], axis=0, out=buffer[:rows])
            feed[name] = buffer[:rows]
        return feed

    def _buffers_for(self, head: Work, rows: int) -> dict[str, np.ndarray]:
        """Buffers of at least `rows` rows of the head's shapes: kept per group (non-batch shapes).

        Made max_batch_size rows long where that fits the model's request bound (every model whose
        non-batch dimensions are fixed: bounds.cut_batches), else exactly `rows` long. What is kept
        stays within the bound: older groups go first, and a buffer past it is not kept at all.
        """
        bound = self.model.max_request_bytes or BUFFER_BYTES
        buffers = self._buffers.pop(head.group, None)  # back in last: the most recently used
        if buffers is None or any(b.shape[0] < rows for b in buffers.values()):
            buffers = None  # an old one too short is dropped before a new one is made
            inputs = self._inputs_of(head)
            row_bytes = sum(array[:1].nbytes for array in inputs.values())
            full = max(rows, self.model.limits.max_batch_size)
            limit = full if full * row_bytes <= bound else rows
            buffers = {
                name: np.empty((limit, *array.shape[1:]), dtype=array.dtype) for name, array in inputs.items()
            }
        size = sum(b.nbytes for b in buffers.values())
        if size <= bound:
            kept = sum(b.nbytes for group in self._buffers.values() for b in group.values())
            while self._buffers and (len(self._buffers) >= 8 or kept + size > bound):
                kept -= sum(b.nbytes for b in self._buffers.pop(next(iter(self._buffers))).values())
            self._buffers[head.group] = buffers
        return buffers

    def _split(self, results: dict[str, np.ndarray], run: BatchRun) -> list[Outcome]:
        """Each request's rows of the outputs, as views. A request alone gets them whole, whatever their
        shape: they are its own, as when it runs alone after a failed batch (`_run_alone`)."""
        if not self.model.limits.is_batched or len(run.items) == 1:
            return [results]
        outcomes: list[Outcome] = []
        offset = 0
        for work in run.items:
            outcomes.append({name: array[offset : offset + work.rows] for name, array in results.items()})
            offset += work.rows
        return outcomes


def _follow_rows(results: dict[str, np.ndarray], rows: int) -> bool:
    """Whether every output has the batch's rows first, so that it splits back by request."""
    return all(array.ndim > 0 and array.shape[0] == rows for array in results.values())
