"""Capacity from the latency profile: the best sustainable rate at the SLO, served rate and spare."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from appliance.scheduler.profile import LatencyProfile


@dataclass(frozen=True, slots=True)
class Capacity:
    """Inferences (rows) per second: what the model can sustain at its SLO, serves, and has spare."""

    max_ips_at_slo: float
    best_batch_rows: int
    served_ips: float
    spare_ips_at_slo: float


_SERVICE_SPREAD = (1 + 0.1) / 2  # (1 + cs^2) / 2 for batch times that vary by about 30%
_MIN_RATE_SPAN_S = 1.0  # a rate over less than this is mostly noise (one batch reads as thousands/s)
_EWMA = 0.3  # weight of the newest CPU observation
_MIN_CPU_WINDOW_S = 1.0
_MIN_ROWS_FOR_OVERHEAD = 50


class CpuBudget:
    """The CPU this process may use, and what each row costs it besides the model's own compute.

    Fed with cumulative counters (wall, this process's CPU, the event loop thread's CPU, the
    whole box's busy CPU, rows served); pure: the caller reads the clocks. Everything a request
    costs outside ONNX Runtime (HTTP parsing, codecs, scheduling) runs on the event loop thread,
    so its CPU per row is that overhead; for a small model it, not compute, limits throughput.
    """

    def __init__(self, cores: float) -> None:
        self.cores = cores
        self.others_cores = 0.0  # CPU other processes on the box use
        self.overhead_s_per_row = 0.0
        self._last: tuple[float, float, float, float, float] | None = None

    @property
    def available_cores(self) -> float:
        return max(0.5, self.cores - self.others_cores)

    def restart(self) -> None:
        """Forget the last counters: the next window starts now (a load's warm-up is not traffic)."""
        self._last = None

    def observe(
        self, wall_s: float, own_cpu_s: float, loop_cpu_s: float, busy_cpu_s: float, rows: float
    ) -> None:
        now = (wall_s, own_cpu_s, loop_cpu_s, busy_cpu_s, rows)
        if self._last is None:
            self._last = now
            return
        d_wall, d_own, d_loop, d_busy, d_rows = (a - b for a, b in zip(now, self._last, strict=True))
        if d_wall < _MIN_CPU_WINDOW_S:
            return
        self._last = now
        others = max(0.0, (d_busy - d_own) / d_wall)
        self.others_cores += _EWMA * (others - self.others_cores)
        if d_rows >= _MIN_ROWS_FOR_OVERHEAD:
            overhead = max(0.0, d_loop / d_rows)
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
    """The highest rows/s at which random (Poisson) traffic still meets the SLO at p99.

    For each batch size r: the throughput ceiling is instances * r / expected(r) and, with a
    CPU budget, available cores / CPU per row (overhead plus `compute_threads` * expected(r) / r;
    0 threads for an accelerator) and one core / overhead per row (the event loop is one thread).
    Below the ceiling, batches queue like customers of an M/G/K queue; the rate kept is the
    highest whose predicted p99 (own batch at its p99 bound, queue delay, and the p99 of the
    wait) fits the SLO. Checked against bench/capacity.py.

    One pass over every size at once (numpy, float64, the same operations in the same order as
    one size at a time): 4096 sizes took ~80 ms of the event loop in a Python loop, and every CPU
    sample (2 s) moves the budget the result is kept for (Ceiling).
    """
    rows = np.arange(1, max(1, max_rows) + 1, dtype=np.float64)
    expected = profile.expected_s(rows)
    fixed_s = profile.bound_s(rows) + np.where(rows > 1, queue_delay_s, 0.0)
    # The first size (of those that compute) whose own batch and queue delay miss the SLO ends the
    # search: no larger batch meets it (the profile never falls with rows).
    over = np.flatnonzero((expected > 0) & (fixed_s > slo_s))
    end = int(over[0]) if over.size else rows.size
    rows, expected, fixed_s = rows[:end], expected[:end], fixed_s[:end]
    computes = expected > 0
    if not computes.any():
        return 0.0, 0
    rows, expected, fixed_s = rows[computes], expected[computes], fixed_s[computes]
    ceiling = instances * rows / expected
    if budget is not None:
        cpu_per_row = budget.overhead_s_per_row + compute_threads * expected / rows
        with np.errstate(divide="ignore"):
            by_cores = budget.available_cores / cpu_per_row
        ceiling = np.where(cpu_per_row > 0, np.minimum(ceiling, by_cores), ceiling)
        if budget.overhead_s_per_row > 0:  # that overhead all runs on the one event loop thread
            ceiling = np.minimum(ceiling, 1.0 / budget.overhead_s_per_row)
    ips = _highest_loads(slo_s - fixed_s, expected, instances) * ceiling
    best = int(np.argmax(ips))  # the first of equals, as a loop keeping only what beats the best
    if not ips[best] > 0.0:
        return 0.0, 0
    return float(ips[best]), int(rows[best])


class Ceiling:
    """max_ips_at_slo of one model, kept until the latency fit or the CPU budget moves.

    It costs about 0.7 ms of the event loop for a 32-row model (2-5 ms for 4096 rows), and pool
    admission asks for it on every job: measured, that was a tenth of the loop's time under an MQTT
    job flood. The CPU budget moves with every CPU sample (2 s), so it is recomputed that often.
    """

    def __init__(
        self,
        profile: LatencyProfile,
        budget: CpuBudget | None,
        *,
        slo_s: float,
        queue_delay_s: float,
        compute_threads: int,
    ) -> None:
        self.profile = profile
        self.budget = budget
        self.slo_s = slo_s
        self.queue_delay_s = queue_delay_s
        self.compute_threads = compute_threads
        self._key: tuple[object, ...] | None = None  # what _value was computed from
        self._value = (0.0, 0)

    def get(self, instances: int, max_rows: int) -> tuple[float, int]:
        """(max_ips_at_slo, best batch rows) for `instances` workers and batches up to `max_rows`."""
        budget = self.budget
        cores = None if budget is None else (budget.overhead_s_per_row, budget.available_cores)
        key = (self.profile.fits, instances, max_rows, cores)
        if key != self._key:
            self._key, self._value = (
                key,
                max_ips_at_slo(
                    self.profile,
                    instances=instances,
                    max_rows=max_rows,
                    slo_s=self.slo_s,
                    queue_delay_s=self.queue_delay_s,
                    budget=budget,
                    compute_threads=self.compute_threads,
                ),
            )
        return self._value


def _highest_loads(slack_s: np.ndarray, service_s: np.ndarray, servers: int) -> np.ndarray:
    """Per size, the highest utilisation whose p99 queueing wait stays within its slack (bisection,
    30 halvings; every load tried is strictly between 0 and 1, where p99_wait_s is its formula)."""
    low, high = np.zeros_like(service_s), np.ones_like(service_s)
    exponent = math.sqrt(2 * (servers + 1)) - 1
    for _ in range(30):
        load = (low + high) / 2
        mean = load**exponent / (servers * (1 - load)) * _SERVICE_SPREAD * service_s
        fits = math.log(100) * mean <= slack_s
        low, high = np.where(fits, load, low), np.where(fits, high, load)
    return low


def p99_wait_s(load: float, service_s: float, servers: int) -> float:
    """p99 wait in an M/G/K queue at utilisation `load` (Sakasegawa's mean, an exponential tail).

    Mean wait ~ load^(sqrt(2(K+1)) - 1) / (K (1 - load)) * (1 + cs^2) / 2 * service, with nearly
    constant service times (cs^2 ~ 0.1 in bench/capacity.py); the p99 of an exponential tail is
    ln(100) times its mean.
    """
    if load <= 0:
        return 0.0
    if load >= 1:
        return float("inf")
    mean = load ** (math.sqrt(2 * (servers + 1)) - 1) / (servers * (1 - load)) * _SERVICE_SPREAD * service_s
    return math.log(100) * mean


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


class CompanyRate:
    """Requests per second that arrive while others are in flight, over the time some are (pure).

    It says whether holding a partial batch may bring it company. A lone closed-loop client sends its
    next request only once this one is answered: none of its arrivals find another in flight, so its
    rate is 0 however fast it sends, and its requests never wait. Open (Poisson) traffic is seen at
    its true rate, since arrivals see time averages; N closed-loop clients mostly arrive while the
    others are out. A plain arrival rate told these apart only by chance: a client alone at 200
    requests/s crossed the one-request-in-5-ms line and waited for nobody.
    """

    def __init__(self, window_s: float = 1.0, min_busy_s: float = 0.25) -> None:
        self.window_s = window_s  # short: 32 clients gone, a lone one waited for the rest of 10 s
        self.min_busy_s = min_busy_s  # less time than this says little: one early pair reads as 1000/s
        self._arrivals: deque[float] = deque()  # the arrivals that found others in flight
        self._periods: deque[tuple[float, float]] = deque()  # ended busy periods: (start, end)
        self._periods_s = 0.0  # their total length (rate() runs per request: no sum over thousands)
        self._busy_since: float | None = None

    def arrived(self, now_s: float, in_flight: int) -> None:
        """A request was admitted while `in_flight` others were out."""
        if in_flight > 0:
            self._arrivals.append(now_s)
        if self._busy_since is None:
            self._busy_since = now_s

    def idle(self, now_s: float) -> None:
        """Nothing is in flight any more."""
        if self._busy_since is not None:
            self._periods.append((self._busy_since, now_s))
            self._periods_s += now_s - self._busy_since
            self._busy_since = None

    def rate(self, now_s: float) -> float:
        start_s = now_s - self.window_s
        while self._arrivals and self._arrivals[0] <= start_s:
            self._arrivals.popleft()
        while self._periods and self._periods[0][1] <= start_s:
            begin, end = self._periods.popleft()
            self._periods_s -= end - begin
        busy_s = self._periods_s
        if self._periods and self._periods[0][0] < start_s:
            busy_s -= start_s - self._periods[0][0]  # only its part inside the window
        if self._busy_since is not None:
            busy_s += now_s - max(self._busy_since, start_s)
        return len(self._arrivals) / max(busy_s, self.min_busy_s)
