"""The batch former: what to run next, what has expired, when to look again. Pure; time is passed in."""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.scheduler.profile import LatencyProfile
from appliance.scheduler.queues import ClassQueue, Priority, Queues, Work


@dataclass(frozen=True, slots=True)
class BatchRules:
    """The limits a batch must respect (max_rows 0 or 1: one request at a time)."""

    max_rows: int
    max_queue_delay_s: float
    max_interference_s: float  # longest predicted pool batch


@dataclass(slots=True)
class Batch:
    items: list[Work]
    rows: int
    priority: Priority
    predicted_s: float


@dataclass(slots=True)
class Decision:
    """`batch` to run now (or None); `expired` to answer with DeadlineExceeded; `wake_s` to look again."""

    batch: Batch | None = None
    expired: list[Work] = field(default_factory=list)
    wake_s: float | None = None


class Batcher:
    """Forms batches by rows, earliest deadline first, line before pool, never late work."""

    def __init__(self, rules: BatchRules, profile: LatencyProfile) -> None:
        self.rules = rules
        self.profile = profile
        self.is_flushing = False  # draining: nothing new will come, so never wait for more rows
        self.is_one_request_per_batch = False  # set once a batch's outputs did not follow its rows
        self._pool_limit: tuple[tuple[object, int, int, float], int] | None = None  # (fit, rules) -> rows

    @property
    def row_limit(self) -> int:
        return max(1, self.rules.max_rows)

    def next(
        self,
        queues: Queues,
        now_s: float,
        *,
        take_line: bool = True,
        take_pool: bool = True,
        share_rows: int | None = None,
        starts_s: float | None = None,
    ) -> Decision:
        """Decide for one free worker (one that takes line work, pool work or both). `share_rows`
        (from share()) caps its line batch when several workers take from the queue in turn.
        `starts_s`: when a busy worker will start the batch (queued ahead). The batch is formed as of
        then, but late work is judged as of `now_s`: another worker may still run it in time.

        Pool work is considered only when no line work waits, whoever asks.
        """
        decision = Decision(expired=self.expire(queues, now_s))
        now_s = now_s if starts_s is None else max(now_s, starts_s)
        if len(queues.line):
            if not take_line:
                return decision
            rows = self.batch_rows()
            if share_rows is not None:
                rows = min(rows, share_rows)
            batch, wake_s = self._form(queues.line, now_s, rows, self.row_limit, may_wait=share_rows is None)
            if batch is None:
                decision.wake_s = wake_s
            decision.batch = batch
            return decision
        if len(queues.pool) and take_pool:
            pool_limit = self.pool_row_limit()
            decision.batch, decision.wake_s = self._form(
                queues.pool, now_s, min(pool_limit, self.batch_rows()), pool_limit
            )
        return decision

    def share(self, queues: Queues, workers: int) -> int | None:
        """Line rows per worker when `workers` free workers take from the queue in turn, or None when
        there is nothing to share. They split the queued rows evenly and none holds its batch for more:
        a burst runs on all of them at once, where one would take a whole batch (a straight latency
        profile's best is the largest) while the others idle."""
        if workers < 2 or queues.line.rows < 2:
            return None
        return -(-queues.line.rows // workers)

    def batch_rows(self) -> int:
        """Rows to aim for: the profile's best rate, so a long queue runs as several right-sized batches."""
        return self.profile.best_rows(self.row_limit) if self.profile.is_seeded else self.row_limit

    def pool_row_limit(self) -> int:
        """The most rows of pool work whose predicted duration stays within the interference bound.

        Predicted = the fitted mean: the p99 margin (often 2-3x under load) would forbid all pool work.
        One row is always allowed: where a single row outlasts the bound (a slow CPU, a heavy model) a
        bound of zero rows would refuse every job while the capacity report still offered spare
        capacity. A one-row batch is as short as pool work gets; line work still goes first (on CPU
        it runs at idle priority, elsewhere it is preempted between nodes).
        """
        key = (self.profile, self.profile.fits, self.row_limit, self.rules.max_interference_s)
        if self._pool_limit is not None and self._pool_limit[0] == key:
            return self._pool_limit[1]  # asked per pool job and batch; a scan is 0.6 ms at 4096 rows
        rows = 1 if self.row_limit else 0
        for candidate in range(2, self.row_limit + 1):
            if self.profile.expected_s(candidate) > self.rules.max_interference_s:
                break
            rows = candidate
        self._pool_limit = (key, rows)
        return rows

    def expire(self, queues: Queues, now_s: float) -> list[Work]:
        """Remove work that is late: its deadline passed, or it cannot finish even if started alone now."""
        expired: list[Work] = []
        horizon_s = now_s + self.profile.expected_s(self.row_limit)
        for queue in queues.by_class.values():
            expired += queue.pop_late(
                lambda w: now_s + self.profile.expected_s(w.rows) > w.deadline_s, horizon_s
            )
        return expired

    def _form(
        self, queue: ClassQueue, now_s: float, row_limit: int, hard_limit: int, *, may_wait: bool = True
    ) -> tuple[Batch | None, float | None]:
        """A batch of about `row_limit` rows (a bigger request runs alone).

        A head over `hard_limit` runs alone too: pool work admitted under the profile of its time may
        exceed the limit of a profile refit since (pool_row_limit); left in place, it would hold its
        whole queue, the pool worker idle, until it expired.
        """
        head = queue.head()
        if head is None:
            return None, None
        if hard_limit < head.rows:
            queue.remove(head)
            return Batch([head], head.rows, head.priority, self.profile.expected_s(head.rows)), None
        row_limit = head.rows if self.is_one_request_per_batch else max(row_limit, head.rows)
        items: list[Work] = []
        rows = 0
        for work in queue:
            if work.group != head.group:
                continue
            if rows + work.rows > row_limit:
                break
            if items and now_s + self.profile.bound_s(rows + work.rows) > head.deadline_s:
                break  # more rows would make the most urgent request late
            items.append(work)
            rows += work.rows
        if rows < row_limit and may_wait:
            wake_s = self._wait_until(items, row_limit, now_s)
            if wake_s is not None:
                return None, wake_s
        for work in items:
            queue.remove(work)
        return Batch(items, rows, head.priority, self.profile.expected_s(rows)), None

    def _wait_until(self, items: list[Work], row_limit: int, now_s: float) -> float | None:
        """When a partial batch is worth holding for more rows, the time to give up waiting."""
        if self.rules.max_queue_delay_s <= 0 or self.is_flushing:
            return None
        if not any(work.expects_company for work in items):
            # None came while more were likely (Work.expects_company). One client alone sends its
            # next request only once this one is answered: holding it would add the whole delay to
            # every request and batch nothing (the 224 model's 5 ms were most of its latency).
            return None
        oldest_s = min(work.arrived_s for work in items)
        earliest_deadline_s = min(work.deadline_s for work in items)
        give_up_s = min(
            oldest_s + self.rules.max_queue_delay_s,
            earliest_deadline_s - self.profile.bound_s(row_limit),
        )
        return give_up_s if give_up_s > now_s else None
