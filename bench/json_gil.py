"""What writing a large JSON answer costs the rest of the process: `codec.encode_response` of one FP32
output of N elements on a worker thread (asyncio.to_thread, as a gateway writes a buyer's large answer
and a box a large JSON answer) while the event loop runs a lag probe (a 1 ms timer: how late it fires is
how long a line request or a buyer would wait for the loop). Before: the whole array in one orjson call
(tensor_data.SLICE_ELEMENTS out of reach); after: a slice at a time. Both in the same run, alternating.

    .venv/bin/python bench/json_gil.py [--elements 1000000 10000000] [--runs 7]

Per size: the probe's longest lag while the answer is written, and the write's own time on an idle
process, before and after (medians of --runs, with min-max), and their after/before ratios. The
probe's lag on an idle loop is the floor under both.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from unittest import mock

import numpy as np
from common import report

from appliance.protocol import codec, tensor_data

TICK_S = 0.001
MODES = {"before": sys.maxsize, "after": tensor_data.SLICE_ELEMENTS}


def writer(elements: int) -> Callable[[], codec.EncodedResponse]:
    """One JSON answer of an FP32 output of `elements` elements, written as the data plane writes it."""
    y = np.random.default_rng(0).standard_normal(elements).astype(np.float32)
    request = codec.InferenceRequest(inputs={})
    return lambda: codec.encode_response(model_name="m", model_version="1", request=request, outputs={"y": y})


async def worst_lag_s(work: Callable[[], object] | None) -> float:
    """The probe's longest lag while `work` runs on a worker thread (None: for as long, idle)."""
    is_done = False
    worst_s = 0.0

    async def probe() -> None:
        nonlocal worst_s
        while not is_done:
            due_s = time.perf_counter() + TICK_S
            await asyncio.sleep(TICK_S)
            worst_s = max(worst_s, time.perf_counter() - due_s)

    task = asyncio.create_task(probe())
    await asyncio.sleep(5 * TICK_S)  # the probe is ticking before the work starts
    if work is None:
        await asyncio.sleep(0.05)
    else:
        await asyncio.to_thread(work)
    is_done = True
    await task
    return worst_s


def alone_s(work: Callable[[], object]) -> float:
    started_s = time.perf_counter()
    work()
    return time.perf_counter() - started_s


def summary_ms(values_s: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values_s) * 1e3, 2),
        "min": round(min(values_s) * 1e3, 2),
        "max": round(max(values_s) * 1e3, 2),
    }


def measure(elements: int, runs: int) -> dict[str, object]:
    write = writer(elements)
    lags: dict[str, list[float]] = {mode: [] for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    idle = [asyncio.run(worst_lag_s(None)) for _ in range(runs)]
    for _ in range(runs):
        for mode, slice_elements in MODES.items():
            with mock.patch.object(tensor_data, "SLICE_ELEMENTS", slice_elements):
                write()  # warm: the allocator's pages, the first slices
                times[mode].append(alone_s(write))
                lags[mode].append(asyncio.run(worst_lag_s(write)))
    return {
        "elements": elements,
        "slice_elements": tensor_data.SLICE_ELEMENTS,
        "switch_interval_ms": sys.getswitchinterval() * 1e3,
        "runs": runs,
        "idle_lag_ms": summary_ms(idle),
        "lag_before_ms": summary_ms(lags["before"]),
        "lag_after_ms": summary_ms(lags["after"]),
        "lag_ratio": round(statistics.median(lags["after"]) / statistics.median(lags["before"]), 3),
        "write_before_ms": summary_ms(times["before"]),
        "write_after_ms": summary_ms(times["after"]),
        "write_ratio": round(statistics.median(times["after"]) / statistics.median(times["before"]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--elements", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--runs", type=int, default=7)
    arguments = parser.parse_args()
    for elements in arguments.elements:
        report("json_gil", measure(elements, arguments.runs))


if __name__ == "__main__":
    main()
