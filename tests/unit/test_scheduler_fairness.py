"""Whether a pool batch ran undisturbed by line work (scheduler/activity.py): pure, no clock, no threads."""

from __future__ import annotations

import gc
from dataclasses import dataclass

from appliance.scheduler.activity import LineActivity
from appliance.scheduler.queues import Priority


@dataclass
class Run:
    priority: Priority


class Scheduler:
    """A member as LineActivity sees one: each line worker's batches."""

    def __init__(self, workers: int = 1) -> None:
        self.runs: list[list[Run]] = [[] for _ in range(workers)]

    def line_runs(self) -> list[list[Run]]:
        return self.runs


def test_a_pool_batch_alone_is_undisturbed() -> None:
    activity, scheduler = LineActivity(), Scheduler()
    activity.join(scheduler)
    mark = activity.mark()
    assert not activity.disturbed(mark)


def test_line_work_at_any_time_of_a_pool_batch_life_disturbs_it() -> None:
    activity, scheduler = LineActivity(), Scheduler(workers=2)
    activity.join(scheduler)
    line = Run(Priority.LINE)

    scheduler.runs[0].append(line)  # running as the pool batch is dispatched, over before it settles
    at_dispatch = activity.mark()
    scheduler.runs[0].clear()
    assert activity.disturbed(at_dispatch)

    during = activity.mark()  # submitted after the pool batch and over before it settles
    activity.line_batch_submitted()
    assert activity.disturbed(during)

    at_settle = activity.mark()  # still running as the pool batch settles
    scheduler.runs[1].append(line)
    assert activity.disturbed(at_settle)


def test_pool_batches_on_line_workers_and_former_members_do_not_count() -> None:
    activity, scheduler, gone = LineActivity(), Scheduler(), Scheduler()
    activity.join(scheduler)
    activity.join(gone)
    scheduler.runs[0].append(Run(Priority.POOL))  # SHARED placement: pool work on a line worker
    gone.runs[0].append(Run(Priority.LINE))
    activity.leave(gone)  # closed
    assert not activity.disturbed(activity.mark())
    forgotten = Scheduler()
    forgotten.runs[0].append(Run(Priority.LINE))
    activity.join(forgotten)
    assert activity.is_busy
    del forgotten  # never closed, but collected: no reference keeps it a member
    gc.collect()
    assert not activity.is_busy


def test_any_member_line_work_disturbs_every_pool_batch() -> None:
    """Every model of a service computes on the same cores."""
    activity, ours, theirs = LineActivity(), Scheduler(), Scheduler()
    activity.join(ours)
    activity.join(theirs)
    mark = activity.mark()
    theirs.runs[0].append(Run(Priority.LINE))
    assert activity.disturbed(mark)
