"""CPU counters for the capacity budget: this process's CPU time and the whole box's busy time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class CpuSample:
    wall_s: float
    own_cpu_s: float  # every thread of this process
    busy_cpu_s: float  # every process on the box (all cores, idle and iowait excluded)


def sample() -> CpuSample:
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    return CpuSample(time.monotonic(), time.process_time(), sum(times) - idle)
