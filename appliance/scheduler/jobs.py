"""What the scheduler shell (runner.py) keeps: its configuration, and its part of each request."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from appliance.scheduler.placement import PoolRules
from appliance.scheduler.queues import Priority, Work


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """What one model's scheduler is tuned by (from settings and model.toml)."""

    instances: int = 1
    line_max_requests: int = 512
    pool_max_requests: int = 256
    profile_window: int = 256
    max_interference_ms: float = 10.0
    pool: PoolRules | None = None  # where pool work runs (scheduler/placement.py); None: by the provider


@dataclass(slots=True, eq=False)
class Job:
    """The shell's part of a queued request."""

    inputs: Mapping[str, np.ndarray]
    future: asyncio.Future[dict[str, np.ndarray]]
    priority: Priority
    arrived_s: float
    dispatched_s: float | None = None
    timing: Timing | None = None
    work: Work | None = None  # as queued: a request whose caller is gone leaves its queue at once


@dataclass(slots=True)
class Timing:
    """Where one request's time went, filled in when it is answered (what a signed pool answer states)."""

    queue_s: float = 0.0  # from admission to its batch's dispatch
    compute_s: float = 0.0  # its batch's compute (shared by the requests of that batch)
    batch_rows: int = 0
