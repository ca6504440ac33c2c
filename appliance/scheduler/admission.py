"""Admission control: refuse at once what cannot meet its deadline, predicted from the profile. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from appliance.errors import DeadlineUnmet, NoPoolCapacity
from appliance.scheduler.batcher import Batcher
from appliance.scheduler.queues import Priority, Queues


class Running(Protocol):
    """A batch a worker holds (running or queued on it), as admission sees it."""

    priority: Priority
    started_s: float
    predicted_s: float


def backlog_s(
    batcher: Batcher,
    queues: Queues,
    workers: Sequence[Sequence[Running]],
    priority: Priority,
    now_s: float,
    *,
    pool_yields: bool,
) -> float:
    """Predicted wait before new work of `priority` starts: the workers' batches, then the rows ahead.

    `workers` are those that would run it, each with its batches; running pool batches do not
    delay line work when `pool_yields` (they are preempted for it).
    """
    profile = batcher.profile
    if not profile.is_seeded:
        return 0.0
    yields = priority is Priority.LINE and pool_yields
    running = sum(
        max(0.0, run.started_s + run.predicted_s - now_s)
        for runs in workers
        for run in runs
        if not (yields and run.priority is Priority.POOL)
    )
    rows_ahead = queues.rows_ahead(priority)
    if not rows_ahead:
        return 0.0 if any(not runs for runs in workers) else running / len(workers)
    limit = batcher.batch_rows()
    full, rest = divmod(rows_ahead, limit)
    queued_s = full * profile.expected_s(limit) + (profile.expected_s(rest) if rest else 0.0)
    return (running + queued_s) / len(workers)


def pool_row_limit(batcher: Batcher) -> int | None:
    """The most rows one request of pool work may have: what the fitted profile says runs within
    pool.max_interference_ms (Batcher.pool_row_limit); None before the profile is seeded (no bound
    but the model's max_batch_size)."""
    return batcher.pool_row_limit() if batcher.profile.is_seeded else None


def check_pool_rows(model: str, batcher: Batcher, rows: int, limit: int | None) -> None:
    """NoPoolCapacity for pool work of more rows than `limit` (pool_row_limit(batcher), which the
    caller computes once for all the inputs of a request). The data plane asks this of a pool job's
    declared shapes, before it decodes any tensor data; `admit` asks again of the decoded request
    (the profile may have been refit meanwhile)."""
    if limit is not None and rows > limit:
        interference_ms = batcher.rules.max_interference_s * 1e3
        raise NoPoolCapacity(
            f"model {model!r}: pool work of {rows} rows takes longer than "
            f"pool.max_interference_ms={interference_ms:g}; at most {limit} rows",
            retry_after_s=60.0,
        )


def admit(
    model: str,
    batcher: Batcher,
    queues: Queues,
    workers: Sequence[Sequence[Running]],
    *,
    rows: int,
    priority: Priority,
    now_s: float,
    deadline_s: float,
    pool_yields: bool,
) -> None:
    """Raise DeadlineUnmet (with a Retry-After) for work that cannot finish by its deadline, and
    NoPoolCapacity for pool work too big for pool.max_interference_ms."""
    profile = batcher.profile
    if priority is Priority.POOL:
        check_pool_rows(model, batcher, rows, pool_row_limit(batcher))
    wait_s = backlog_s(batcher, queues, workers, priority, now_s, pool_yields=pool_yields)
    finish_s = now_s + wait_s + profile.bound_s(rows)
    if wait_s == 0 and now_s + profile.expected_s(rows) <= deadline_s:
        # Nothing ahead: it starts now, and the fitted mean fits. Refusing on the p99 margin alone
        # would lock a model out for good after a burst: the margin only falls with new batches.
        return
    if finish_s > deadline_s:
        raise DeadlineUnmet(
            f"model {model!r}: a request of {rows} rows would finish in "
            f"{(finish_s - now_s) * 1e3:.1f} ms, after its deadline of "
            f"{(deadline_s - now_s) * 1e3:.1f} ms ({queues.rows_ahead(priority)} rows queued ahead)",
            retry_after_s=max(wait_s, 0.05),
        )
