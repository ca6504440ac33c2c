"""Choose how many worker threads share a session (K) by measuring throughput at start-up."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.engine.model import LoadedModel
from appliance.scheduler.profile import LatencyProfile

log = logging.getLogger(__name__)

_MEASURE_S = 1.0  # per candidate; enough for ~10 batches of a 224x224 CNN on 2 cores
_MIN_RUNS = 3  # per thread, however long a batch takes


@dataclass(frozen=True, slots=True)
class Trial:
    instances: int
    threads_per_call: int
    rows_per_s: float


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), the default for cores to split among workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def candidates(cores: int) -> list[tuple[int, int]]:
    """(instances, threads per call) pairs that use every core: K in 1, 2, 4, ... with cores // K."""
    pairs = []
    instances = 1
    while instances <= max(1, cores) and instances <= 4:
        pairs.append((instances, max(1, cores // instances)))
        instances *= 2
    return pairs


def measure(model: LoadedModel, instances: int, budget_s: float = _MEASURE_S) -> float:
    """Best rows/s with `instances` threads running batches back to back, over two batch sizes.

    The sizes: the largest warm one, and the one the warm-up profile runs fastest per row (big
    batches often cost more per row once they leave the caches; it is the size the batcher aims for).
    """
    largest = max(model.limits.preferred_batch_sizes or (1,))
    profile = LatencyProfile()
    profile.seed(model.warmup)
    sizes = sorted({largest, profile.best_rows(largest)})
    return max(_rows_per_s(model, instances, rows, budget_s / len(sizes)) for rows in sizes)


def _rows_per_s(model: LoadedModel, instances: int, rows: int, budget_s: float) -> float:
    feed = model.example_inputs(rows)
    if feed is None:
        return 0.0
    done = [0] * instances
    stop_at = time.perf_counter() + budget_s

    def loop(index: int) -> None:
        while time.perf_counter() < stop_at or done[index] < _MIN_RUNS * rows:
            model.run(feed)
            done[index] += rows

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(instances)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


def choose(load: Callable[[int], LoadedModel], cores: int) -> tuple[LoadedModel, int, list[Trial]]:
    """Load one session per candidate, keep the fastest; ties (within 3%) go to fewer instances."""
    best: tuple[LoadedModel, int] | None = None
    best_rate = 0.0
    trials: list[Trial] = []
    for instances, threads in candidates(cores):
        model = load(threads)
        rate = measure(model, instances)
        trials.append(Trial(instances, threads, rate))
        if best is None or rate > best_rate * 1.03:
            best, best_rate = (model, instances), rate
    assert best is not None
    log.info(
        "model %s: %d instance(s) chosen; measured %s",
        best[0].name,
        best[1],
        ", ".join(f"{t.instances}x{t.threads_per_call} threads: {t.rows_per_s:.0f} rows/s" for t in trials),
    )
    return best[0], best[1], trials
