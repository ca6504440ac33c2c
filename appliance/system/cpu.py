"""CPU counters for the capacity budget: this process's CPU time and the whole box's busy time."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class CpuSample:
    wall_s: float
    own_cpu_s: float  # every thread of this process and of its children (the pool processes)
    thread_cpu_s: float  # the calling thread only (the event loop's, when called from it)
    busy_cpu_s: float  # every process on the box (all cores, idle and iowait excluded)


def sample() -> CpuSample:
    times = psutil.cpu_times()
    busy = times.user + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
    busy += getattr(times, "steal", 0.0) + getattr(times, "nice", 0.0)
    return CpuSample(time.monotonic(), time.process_time() + _children_cpu_s(), time.thread_time(), busy)


def _children_cpu_s() -> float:
    """CPU of the children still running plus those already reaped, so the sum never goes back."""
    reaped = os.times()
    total = reaped.children_user + reaped.children_system
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total
