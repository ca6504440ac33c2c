"""Prometheus text exposition of every model's counters, histograms, queues and capacity."""

from __future__ import annotations

from collections.abc import Iterable

from appliance.scheduler.hub import ModelHub, State
from appliance.scheduler.queues import Priority
from appliance.scheduler.stats import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(**labels: str) -> str:
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + body + "}" if body else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Writer:
    """Collects samples per metric family, so each family is one contiguous group as the format requires."""

    def __init__(self) -> None:
        self._families: dict[str, list[str]] = {}
        self._family = ""

    def declare(self, name: str, kind: str, help_text: str) -> None:
        self._family = name
        self._families.setdefault(name, [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])

    def sample(self, name: str, value: float, **labels: str) -> None:
        self._families[self._family].append(f"{name}{_labels(**labels)} {value:.9g}")

    def histogram(self, name: str, histogram: Histogram, **labels: str) -> None:
        for bound, count in histogram.cumulative():
            self.sample(f"{name}_bucket", count, **labels, le=bound)
        self.sample(f"{name}_sum", histogram.sum, **labels)
        self.sample(f"{name}_count", histogram.count, **labels)

    def text(self) -> str:
        return "\n".join(line for lines in self._families.values() for line in lines) + "\n"


_HISTOGRAMS: Iterable[tuple[str, str, str]] = (
    ("appliance_request_duration_seconds", "request_s", "Time from admission to answer (success)."),
    ("appliance_queue_duration_seconds", "queue_s", "Time a request waited in the queue."),
    ("appliance_compute_duration_seconds", "compute_s", "ONNX Runtime time per batch."),
    ("appliance_batch_rows", "batch_rows", "Rows per executed batch."),
)


def render(hub: ModelHub) -> str:
    out = _Writer()
    reserved = hub.settings.pool.reserved_pct / 100.0
    for entry in hub:
        out.declare("appliance_model_ready", "gauge", "1 when the model serves, 0 otherwise.")
        provider = entry.scheduler.model.provider if entry.scheduler else ""
        out.sample(
            "appliance_model_ready",
            1.0 if entry.state is State.READY else 0.0,
            model=entry.name,
            provider=provider,
        )
        scheduler = entry.scheduler
        if scheduler is None:
            continue
        stats = scheduler.stats
        model = entry.name
        out.declare(
            "appliance_requests_total", "counter", "Requests answered, by priority class and outcome."
        )
        for (priority, outcome), count in sorted(stats.requests.items()):
            out.sample("appliance_requests_total", count, model=model, priority=priority, outcome=outcome)
        out.declare("appliance_failures_total", "counter", "Failed requests by reason.")
        for reason, count in sorted(stats.failures.items()):
            out.sample("appliance_failures_total", count, model=model, reason=reason)
        out.declare("appliance_inferences_total", "counter", "Rows inferred.")
        out.sample("appliance_inferences_total", stats.inference_count, model=model)
        out.declare(
            "appliance_preemptions_total", "counter", "Pool batches stopped to make way for line work."
        )
        out.sample("appliance_preemptions_total", stats.preemptions, model=model)
        if scheduler.replica is not None:
            out.declare(
                "appliance_pool_process_restarts_total",
                "counter",
                "Pool processes started again after dying.",
            )
            out.sample("appliance_pool_process_restarts_total", scheduler.replica.restarts, model=model)
        for name, attribute, help_text in _HISTOGRAMS:
            out.declare(name, "histogram", help_text)
            out.histogram(name, getattr(stats, attribute), model=model)
        out.declare("appliance_queue_depth", "gauge", "Requests waiting, by priority class.")
        for priority in Priority:
            out.sample(
                "appliance_queue_depth",
                len(scheduler.queues.by_class[priority]),
                model=model,
                priority=priority.label,
            )
        capacity = scheduler.capacity(reserved)
        out.declare("appliance_max_ips_at_slo", "gauge", "Sustainable inferences/s at the model's SLO.")
        out.sample("appliance_max_ips_at_slo", capacity.max_ips_at_slo, model=model, provider=provider)
        out.declare("appliance_served_ips", "gauge", "Inferences/s served over the last window.")
        out.sample("appliance_served_ips", capacity.served_ips, model=model)
        out.declare("appliance_spare_ips_at_slo", "gauge", "Spare inferences/s at the SLO after the reserve.")
        out.sample("appliance_spare_ips_at_slo", capacity.spare_ips_at_slo, model=model)
        out.declare("appliance_provider_fallbacks", "gauge", "Providers that did not take the model.")
        for fallback in scheduler.model.fallbacks:
            out.sample(
                "appliance_provider_fallbacks",
                1,
                model=model,
                provider=fallback.provider,
                stage=fallback.stage,
                reason=fallback.reason[:120],
            )
    out.declare("appliance_draining", "gauge", "1 while the service drains.")
    out.sample("appliance_draining", 1.0 if hub.is_draining else 0.0)
    return out.text()
