"""Capacity from the latency profile: the best sustainable rate at the SLO, served rate and spare."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from appliance.scheduler.profile import LatencyProfile


@dataclass(frozen=True, slots=True)
class Capacity:
    """Inferences (rows) per second: what the model can sustain at its SLO, serves, and has spare."""

    max_ips_at_slo: float
    best_batch_rows: int
    served_ips: float
    spare_ips_at_slo: float


_MIN_RATE_SPAN_S = 1.0  # a rate over less than this is mostly noise (one batch reads as thousands/s)
_EWMA = 0.3  # weight of the newest CPU observation
_MIN_CPU_WINDOW_S = 1.0
_MIN_ROWS_FOR_OVERHEAD = 20


class CpuBudget:
    """The CPU this process may use, and what each row costs it besides the model's own compute.

    Fed with cumulative counters (wall, own CPU, whole-box busy CPU, rows served, compute CPU);
    pure: the caller reads the clocks. Requests cost CPU outside ONNX Runtime (HTTP parsing,
    codecs, the event loop); for a small model that, not compute, is what limits throughput.
    """

    def __init__(self, cores: float) -> None:
        self.cores = cores
        self.others_cores = 0.0  # CPU other processes on the box use
        self.overhead_s_per_row = 0.0
        self._last: tuple[float, float, float, float, float] | None = None

    @property
    def available_cores(self) -> float:
        return max(0.5, self.cores - self.others_cores)

    def observe(
        self, wall_s: float, own_cpu_s: float, busy_cpu_s: float, rows: float, compute_cpu_s: float
    ) -> None:
        now = (wall_s, own_cpu_s, busy_cpu_s, rows, compute_cpu_s)
        if self._last is None:
            self._last = now
            return
        d_wall, d_own, d_busy, d_rows, d_compute = (a - b for a, b in zip(now, self._last, strict=True))
        if d_wall < _MIN_CPU_WINDOW_S:
            return
        self._last = now
        others = max(0.0, (d_busy - d_own) / d_wall)
        self.others_cores += _EWMA * (others - self.others_cores)
        if d_rows >= _MIN_ROWS_FOR_OVERHEAD:
            overhead = max(0.0, (d_own - d_compute) / d_rows)
            self.overhead_s_per_row += _EWMA * (overhead - self.overhead_s_per_row)


def max_ips_at_slo(
    profile: LatencyProfile,
    *,
    instances: int,
    max_rows: int,
    slo_s: float,
    queue_delay_s: float,
    budget: CpuBudget | None = None,
    compute_threads: int = 0,
) -> tuple[float, int]:
    """The best rows/s over batch sizes whose request latency under saturation meets the SLO.

    At a sustained rate near capacity a request waits for up to one running batch, may wait
    the queue delay for its own batch to fill, then runs: latency ~ bound(r) + delay + bound(r).
    Throughput with `instances` workers each running r-row batches back to back is
    instances * r / expected(r); with a CPU budget it is also at most the available cores
    over the CPU per row (overhead plus `compute_threads` * expected(r) / r; 0 threads for an
    accelerator). Checked against measurement in bench/capacity.py.
    """
    best_ips, best_rows = 0.0, 0
    for rows in range(1, max(1, max_rows) + 1):
        expected = profile.expected_s(rows)
        if expected <= 0:
            continue
        latency = 2 * profile.bound_s(rows) + (queue_delay_s if rows > 1 else 0.0)
        if latency > slo_s:
            break
        ips = instances * rows / expected
        if budget is not None:
            cpu_per_row = budget.overhead_s_per_row + compute_threads * expected / rows
            if cpu_per_row > 0:
                ips = min(ips, budget.available_cores / cpu_per_row)
        if ips > best_ips:
            best_ips, best_rows = ips, rows
    return best_ips, best_rows


def spare(max_ips: float, served_ips: float, reserved_share: float) -> float:
    """Spare = max * (1 - reserved share) - served, never negative."""
    return max(0.0, max_ips * (1.0 - reserved_share) - served_ips)


class RateMeter:
    """An amount (rows, busy seconds) per second over a sliding window, on an injected clock (pure)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, float]] = deque()
        self._total = 0.0
        self._started_s: float | None = None

    def add(self, now_s: float, amount: float) -> None:
        if self._started_s is None:
            self._started_s = now_s
        self._events.append((now_s, amount))
        self._total += amount
        self._trim(now_s)

    def rate(self, now_s: float) -> float:
        self._trim(now_s)
        if self._started_s is None:
            return 0.0
        span = min(self.window_s, max(now_s - self._started_s, _MIN_RATE_SPAN_S))
        return max(0.0, self._total) / span

    def _trim(self, now_s: float) -> None:
        while self._events and self._events[0][0] <= now_s - self.window_s:
            self._total -= self._events.popleft()[1]
