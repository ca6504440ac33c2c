"""The capacity report: what `/capacity` returns and the pool link publishes, per model."""

from __future__ import annotations

import time
from typing import Any

from appliance.scheduler.hub import ModelHub
from appliance.scheduler.queues import Priority
from appliance.scheduler.view import ModelView


def capacity_report(hub: ModelHub) -> dict[str, Any]:
    """Measured capacity at the SLO, served rate and spare per model, with the provider used."""
    reserved_share = hub.settings.pool.reserved_pct / 100.0
    accepts_jobs = hub.settings.pool.accept_jobs and not hub.is_draining
    models: dict[str, Any] = {}
    for entry in hub:
        scheduler = entry.scheduler
        view = ModelView.of(entry)
        if scheduler is None:
            models[entry.name] = {"state": view.state, "reason": view.reason}
            continue
        capacity = scheduler.capacity(reserved_share)
        assert view.pool is not None
        models[entry.name] = {
            "state": view.state,
            "version": view.version,
            "provider": view.provider,
            "precision": view.precision,
            "slo_p99_ms": view.slo_p99_ms,
            "instances": view.instances,
            "pool_threads": view.pool.threads,
            "pool_process": view.pool.process is not None,
            "max_batch_size": view.max_batch_size,
            "max_ips_at_slo": round(capacity.max_ips_at_slo, 2),
            "best_batch_rows": capacity.best_batch_rows,
            "served_ips": round(capacity.served_ips, 2),
            "spare_ips_at_slo": round(capacity.spare_ips_at_slo, 2),
            "utilisation": round(scheduler.utilisation(), 4),
            "queue_depth": {p.label: len(scheduler.queues.by_class[p]) for p in Priority},
            "accepts_pool_jobs": accepts_jobs and scheduler.batcher.pool_row_limit() > 0,
            "profile": scheduler.profile.as_dict(),
            "fallbacks": view.fallbacks,
        }
    busy = [m["utilisation"] for m in models.values() if "utilisation" in m]
    budget = hub.cpu_budget
    return {
        "cpu": {
            "cores": budget.cores,
            "other_processes_cores": round(budget.others_cores, 3),
            "overhead_ms_per_row": round(budget.overhead_s_per_row * 1e3, 4),
        },
        "ts_ms": int(time.time() * 1000),
        "reserved_pct": hub.settings.pool.reserved_pct,
        "draining": hub.is_draining,
        "utilisation": round(min(1.0, sum(busy)), 4),
        "models": models,
    }
