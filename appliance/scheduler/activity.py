"""Line batches on the host's cores, for every model of the process: whether a pool batch ran undisturbed.

A pool batch on a thread or in a process of its own (placement THREADS, PROCESS) computes at idle CPU
priority: any line batch on the same cores, of its model or another, stretches it. Its time then says
how busy the line was, not what the batch costs, and must not reach the latency profile: 40 pool batches
that overlapped the line's periodic big batch, each settled after it, made the profile's one-row
prediction 0.16 -> 13.6 ms, and an idle box refused a 10 ms line request. Whether line work is busy at
the moment a pool batch settles does not tell: the line batch that slowed it may have ended just before.

A pool batch was undisturbed when no line batch was running or queued as it was dispatched, none was
submitted during its life (a counter of line batch submissions, compared at dispatch and at settle),
and none is running as it settles. Every line batch that ran during its life is one of those.
Everything here runs on the event loop (schedulers submit and settle there); no lock.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from appliance.scheduler.queues import Priority


class _Run(Protocol):
    priority: Priority


class Member(Protocol):
    """What LineActivity asks of a scheduler: its line workers' batches (ModelScheduler)."""

    def line_runs(self) -> Sequence[Sequence[_Run]]: ...


@dataclass(frozen=True, slots=True)
class Mark:
    """Line activity as a pool batch was dispatched."""

    submitted: int
    was_busy: bool


class LineActivity:
    """Line batches of the process's schedulers whose models compute on the host's cores."""

    def __init__(self) -> None:
        self.submitted = 0  # line batches handed to a worker, ever
        self._members: weakref.WeakSet[Member] = weakref.WeakSet()

    def join(self, member: Member) -> None:
        self._members.add(member)

    def leave(self, member: Member) -> None:
        self._members.discard(member)

    def line_batch_submitted(self) -> None:
        self.submitted += 1

    @property
    def is_busy(self) -> bool:
        """A line batch is running or queued on a worker of some member."""
        members = list(self._members)  # a WeakSet may not change while it is iterated
        return any(run.priority is Priority.LINE for m in members for runs in m.line_runs() for run in runs)

    def mark(self) -> Mark:
        return Mark(self.submitted, self.is_busy)

    def disturbed(self, mark: Mark) -> bool:
        """Whether a line batch started or ran during the life of the pool batch dispatched at `mark`."""
        return mark.was_busy or self.submitted != mark.submitted or self.is_busy


# The process's one: every scheduler of a service shares its cores with every other.
LINE_ACTIVITY = LineActivity()
