"""Hardware and utilisation facts of this box (psutil): what the pool is told about the node."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from typing import Any

import psutil

from appliance.scheduler.instances import usable_cores

log = logging.getLogger(__name__)


def hardware() -> dict[str, Any]:
    """What the box is: CPU, cores, memory, machine and OS; temperatures where the kernel exposes them."""
    frequency = _cpu_frequency_mhz()
    facts: dict[str, Any] = {
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "cpu_model": _cpu_model(),
        "cores_logical": psutil.cpu_count(logical=True) or 0,
        "cores_physical": psutil.cpu_count(logical=False) or 0,
        "cores_usable": usable_cores(),
        "memory_bytes": psutil.virtual_memory().total,
    }
    if frequency is not None:
        facts["cpu_max_mhz"] = frequency
    temperatures = temperatures_c()
    if temperatures:
        facts["temperatures_c"] = temperatures
    return facts


def utilisation() -> dict[str, Any]:
    """How busy the box is now: CPU (since the last call), memory, load and the hottest sensor."""
    facts: dict[str, Any] = {
        "cpu_pct": psutil.cpu_percent(interval=None),
        "memory_pct": psutil.virtual_memory().percent,
    }
    with contextlib.suppress(AttributeError, OSError):  # not on every platform
        facts["load_1m"] = round(os.getloadavg()[0], 2)
    temperatures = temperatures_c()
    if temperatures:
        facts["max_temperature_c"] = max(temperatures.values())
    return facts


def uptime_s() -> float:
    """Seconds since this process started."""
    return max(0.0, time.time() - psutil.Process().create_time())


def temperatures_c() -> dict[str, float]:
    """The hottest reading of each sensor chip, in degrees Celsius; empty where none is readable."""
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return {}
    try:
        chips = reader()
    except (OSError, RuntimeError) as exc:  # unreadable sysfs entries, no permission
        log.debug("temperatures unreadable: %s", exc)
        return {}
    found = {}
    for chip, readings in chips.items():
        values = [r.current for r in readings if r.current is not None and -50 < r.current < 200]
        if values:
            found[chip] = round(max(values), 1)
    return found


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as stream:
            for line in stream:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_frequency_mhz() -> float | None:
    try:
        frequency = psutil.cpu_freq()
    except (OSError, RuntimeError, NotImplementedError):
        return None
    return round(frequency.max or frequency.current, 1) if frequency else None
