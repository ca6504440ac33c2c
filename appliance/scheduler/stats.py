"""Per-model counters and histograms (requests, queue and compute time, batch rows, failures)."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Cumulative-bucket histogram in the shape Prometheus expects."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        running, out = 0, []
        for bound, count in zip((*map(repr, self.buckets), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass
class Duration:
    count: int = 0
    total_s: float = 0.0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.total_s += seconds

    def as_triton(self) -> dict[str, int]:
        return {"count": self.count, "ns": int(self.total_s * 1e9)}


@dataclass
class ModelStats:
    """Everything /stats and /metrics report for one model; updated on the event loop only."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    inference_count: int = 0  # rows
    execution_count: int = 0  # batches
    failures: Counter[str] = field(default_factory=Counter)  # by reason (error class)
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (priority, outcome)
    preemptions: int = 0
    request_s: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    queue_s: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    compute_s: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    batch_rows: Histogram = field(default_factory=lambda: Histogram((1, 2, 4, 8, 16, 32, 64, 128)))
    by_batch: dict[int, Duration] = field(default_factory=dict)
    last_inference_ms: int = 0

    def record_batch(self, rows: int, compute_s: float, requests: int) -> None:
        self.compute.add(compute_s, requests)
        self.compute_s.observe(compute_s)
        self.batch_rows.observe(rows)
        self.by_batch.setdefault(rows, Duration()).add(compute_s)
        self.inference_count += rows
        self.execution_count += 1

    def record_request(self, priority: str, outcome: str, total_s: float, queue_s: float | None) -> None:
        self.requests[(priority, outcome)] += 1
        if outcome == "success":
            self.success.add(total_s)
            self.request_s.observe(total_s)
        else:
            self.fail.add(total_s)
            self.failures[outcome] += 1
        if queue_s is not None:
            self.queue.add(queue_s)
            self.queue_s.observe(queue_s)
