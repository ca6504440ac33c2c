"""Raw ONNX Runtime on this box: the best rows/s a bare session reaches, the yardstick of every bench.

Two thread layouts (one session on every core; one single-thread session per core, run from that many
threads) and a few batch sizes; the best is the baseline, as bench/common.py measures it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from appliance.engine.model import LoadedModel


def raw_rows_per_s(
    model: LoadedModel,
    inputs: Mapping[str, np.ndarray],
    *,
    batch_rows: Sequence[int] = (1, 8, 32),
    duration_s: float = 2.0,
) -> dict[str, float]:
    """{"rows_per_s", "batch_rows", "threads", "callers"} of the best layout; `inputs` is one row."""
    cores = max(1, len(os.sched_getaffinity(0)))
    providers = model.session.get_providers()
    sizes = [r for r in batch_rows if model.limits.is_batched and r <= model.limits.max_batch_size] or [1]
    best: dict[str, float] = {"rows_per_s": 0.0}
    for threads, callers in sorted({(cores, 1), (1, cores)}):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 4
        options.add_session_config_entry("session.intra_op.allow_spinning", "0" if callers > 1 else "1")
        session = ort.InferenceSession(str(model.source.path), options, providers=providers)
        for rows in sizes:
            feed = {name: np.repeat(array, rows, axis=0) for name, array in inputs.items()}
            if not model.limits.is_batched:
                feed = dict(inputs)
            session.run(None, feed)
            rate = _rate(session, feed, rows, callers, duration_s / len(sizes))
            if rate > best["rows_per_s"]:
                best = {"rows_per_s": rate, "batch_rows": rows, "threads": threads, "callers": callers}
    return best


def _rate(
    session: ort.InferenceSession, feed: dict[str, np.ndarray], rows: int, callers: int, budget_s: float
) -> float:
    counts = [0] * callers
    stop_at = time.perf_counter() + budget_s

    def run(index: int) -> None:
        while time.perf_counter() < stop_at:
            session.run(None, feed)
            counts[index] += rows

    threads = [threading.Thread(target=run, args=(i,)) for i in range(callers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)
