"""Where a model's pool work runs, and how it yields to line work: the one place that decides it.

- `PROCESS`: the model computes on the host's cores and pool jobs come in over a pool link: pool
  batches run in a child process at idle CPU priority (engine/replica.py), fed by K pool threads.
- `THREADS`: on the host's cores without a pool process: K pool threads of the service's own, which
  drop to idle priority while ONNX Runtime computes (engine/priority.py).
  (`scheduler.pool_cpu_priority = "normal"` keeps both at the service's own priority.)
- `SHARED`: the model runs on a device (GPU, NPU): priority means nothing to its queue, so pool work
  takes the line workers, leaves `line_reserved_workers` of them to the line, and a running pool batch
  is stopped (ORT `RunOptions.terminate`) when line work finds every worker busy.
In every case pool work only starts when no line work waits (scheduler/batcher.py), in batches bounded
by pool.max_interference_ms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from appliance.engine.replica import ReplicaSpec
from appliance.scheduler.queues import Priority


class Where(StrEnum):
    PROCESS = "process"
    THREADS = "threads"
    SHARED = "shared"


@dataclass(frozen=True, slots=True)
class PoolRules:
    """How one model's pool work runs (see the module docstring)."""

    where: Where
    replica: ReplicaSpec | None = None  # PROCESS: what the child reopens
    preempt: bool = True  # SHARED: a running pool batch is stopped for line work
    line_reserved_workers: int = 1  # SHARED: workers pool work leaves to line work (it keeps one)
    idle_priority: bool = True  # PROCESS, THREADS: pool compute at idle CPU priority (else normal)

    def __post_init__(self) -> None:
        if (self.where is Where.PROCESS) != (self.replica is not None):
            raise ValueError("a pool process needs a ReplicaSpec, and only a pool process takes one")

    @property
    def has_own_threads(self) -> bool:
        """Pool work has threads of its own (never the line's)."""
        return self.where is not Where.SHARED

    @property
    def line_yields(self) -> bool:
        """Running pool batches give way to line work (admission does not count them ahead of it)."""
        return self.where is Where.SHARED and self.preempt


def rules_for(
    uses_host_cores: bool, replica: ReplicaSpec | None = None, *, idle_priority: bool = True
) -> PoolRules:
    """The rules for a model on a provider that does (or does not) compute on the host's cores; a
    `replica` (given where pool jobs come in) puts host-core pool work in a process of its own."""
    if not uses_host_cores:
        return PoolRules(Where.SHARED)
    if replica is not None:
        return PoolRules(Where.PROCESS, replica, idle_priority=replica.idle_priority)
    return PoolRules(Where.THREADS, idle_priority=idle_priority)


class Running(Protocol):
    priority: Priority


class Runner(Protocol):
    """A worker as these rules see it: the batches it holds, the first one running."""

    @property
    def runs(self) -> Sequence[Running]: ...


def pool_may_take_a_worker(rules: PoolRules, line_workers: Sequence[Runner]) -> bool:
    """SHARED: a new pool batch may start only while enough line workers are left to line work."""
    if rules.has_own_threads:
        return False
    running = sum(1 for w in line_workers if w.runs and w.runs[0].priority is Priority.POOL)
    return running < max(1, len(line_workers) - rules.line_reserved_workers)


def should_preempt(rules: PoolRules, *, line_waiting: bool, line_workers: Sequence[Runner]) -> bool:
    """SHARED: stop a running pool batch when line work waits and every worker is busy."""
    return rules.line_yields and line_waiting and all(w.runs for w in line_workers)
