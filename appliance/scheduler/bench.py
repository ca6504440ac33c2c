"""A served model's throughput and latency curve on this box, at one priority class, and the capacity
the node would offer: what `appliance bench MODEL` prints and the pool's cmd/bench answers.

Closed-loop clients call the model's scheduler directly (no HTTP), at 1, 2, 4, ... at once; each
level runs for `duration_s`. A refused request waits what its refusal says (at most 50 ms) before the
client tries again, so refusals are counted, not spun on. At pool priority the curve is what pool
work gets while line work goes first: on a live node it measures spare capacity without taking any.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from appliance.errors import ApplianceError, DeadlineExceeded, Overloaded
from appliance.scheduler.queues import Priority
from appliance.scheduler.runner import ModelScheduler

LEVELS = (1, 2, 4, 8, 16, 32)
MAX_REFUSED_WAIT_S = 0.05

Progress = Callable[[float, str], None]  # (share done in [0, 1], what is running now)


@dataclass(frozen=True, slots=True)
class Point:
    """One level of the curve: `clients` closed-loop clients for `elapsed_s`."""

    clients: int
    rows_per_s: float
    p50_ms: float
    p99_ms: float
    answered: int
    refused: int
    elapsed_s: float

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


async def curve(
    scheduler: ModelScheduler,
    inputs: Mapping[str, np.ndarray],
    *,
    priority: Priority = Priority.LINE,
    levels: Sequence[int] = LEVELS,
    duration_s: float = 3.0,
    progress: Progress | None = None,
) -> list[Point]:
    """Measure each level in turn; inputs are one request (their rows count as its rows)."""
    rows = _rows(inputs, scheduler)
    points = []
    for index, clients in enumerate(levels):
        if progress is not None:
            progress(index / len(levels), f"{clients} client(s)")
        points.append(await _level(scheduler, inputs, rows, priority, clients, duration_s))
    if progress is not None:
        progress(1.0, "done")
    return points


async def _level(
    scheduler: ModelScheduler,
    inputs: Mapping[str, np.ndarray],
    rows: int,
    priority: Priority,
    clients: int,
    duration_s: float,
) -> Point:
    latencies_s: list[float] = []
    refused = 0
    started = time.perf_counter()
    stop_at = started + duration_s

    async def client() -> None:
        nonlocal refused
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            try:
                await scheduler.infer(inputs, priority=priority)
            except (Overloaded, DeadlineExceeded) as exc:
                refused += 1
                await asyncio.sleep(min(getattr(exc, "retry_after_s", 0.0) or 0.0, MAX_REFUSED_WAIT_S))
                continue
            latencies_s.append(time.perf_counter() - sent)

    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed_s = time.perf_counter() - started
    samples = np.asarray(latencies_s) * 1e3 if latencies_s else np.asarray([float("nan")])
    return Point(
        clients=clients,
        rows_per_s=len(latencies_s) * rows / elapsed_s,
        p50_ms=float(np.percentile(samples, 50)),
        p99_ms=float(np.percentile(samples, 99)),
        answered=len(latencies_s),
        refused=refused,
        elapsed_s=elapsed_s,
    )


def offer(scheduler: ModelScheduler, reserved_share: float) -> dict[str, Any]:
    """The capacity the node would report for the model now: max and spare inferences/s at its SLO."""
    capacity = scheduler.capacity(reserved_share)
    return {
        "slo_p99_ms": scheduler.model.slo_p99_ms,
        "max_ips_at_slo": round(capacity.max_ips_at_slo, 2),
        "best_batch_rows": capacity.best_batch_rows,
        "spare_ips_at_slo_if_line_idle": round(max(0.0, capacity.max_ips_at_slo * (1 - reserved_share)), 2),
        "reserved_pct": round(reserved_share * 100, 1),
    }


def _rows(inputs: Mapping[str, np.ndarray], scheduler: ModelScheduler) -> int:
    if not scheduler.model.limits.is_batched:
        return 1
    first = next(iter(inputs.values()), None)
    if first is None or first.ndim == 0:
        raise ApplianceError("bench inputs need a batch dimension")
    return int(first.shape[0])
