"""Prometheus exposition (prometheus_client): every model's counters, histograms, queues, capacity and
refusals, plus the process metrics prometheus_client brings.

The hot path keeps its own plain counters (`scheduler/stats.py`, the data plane's `Refusals`); this
collector reads them only when /metrics is scraped, so exposition costs the request path nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from appliance.dataplane.plane import DataPlane
from appliance.scheduler.hub import State
from appliance.scheduler.queues import Priority
from appliance.scheduler.stats import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_HISTOGRAMS = (
    ("appliance_request_duration_seconds", "request_s", "Time from admission to answer (success)."),
    ("appliance_queue_duration_seconds", "queue_s", "Time a request waited in the queue."),
    ("appliance_compute_duration_seconds", "compute_s", "ONNX Runtime time per batch."),
    ("appliance_batch_rows", "batch_rows", "Rows per executed batch."),
)


class ApplianceCollector(Collector):
    """Builds every appliance family from the hub and the data plane at scrape time."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def collect(self) -> Iterator[Metric]:
        hub = self.plane.hub
        reserved = hub.settings.pool.reserved_pct / 100.0
        ready = GaugeMetricFamily(
            "appliance_model_ready", "1 when the model serves, 0 otherwise.", labels=["model", "provider"]
        )
        requests = CounterMetricFamily(
            "appliance_requests",
            "Requests answered after admission, by priority class and outcome.",
            labels=["model", "priority", "outcome"],
        )
        failures = CounterMetricFamily(
            "appliance_failures", "Admitted requests that failed, by reason.", labels=["model", "reason"]
        )
        inferences = CounterMetricFamily("appliance_inferences", "Rows inferred.", labels=["model"])
        preemptions = CounterMetricFamily(
            "appliance_preemptions", "Pool batches stopped to make way for line work.", labels=["model"]
        )
        restarts = CounterMetricFamily(
            "appliance_pool_process_restarts", "Pool processes started again after dying.", labels=["model"]
        )
        histograms = {
            name: HistogramMetricFamily(name, help_text, labels=["model"])
            for name, _, help_text in _HISTOGRAMS
        }
        depth = GaugeMetricFamily(
            "appliance_queue_depth", "Requests waiting, by priority class.", labels=["model", "priority"]
        )
        max_ips = GaugeMetricFamily(
            "appliance_max_ips_at_slo",
            "Sustainable inferences/s at the model's SLO.",
            labels=["model", "provider"],
        )
        served = GaugeMetricFamily(
            "appliance_served_ips", "Inferences/s served over the last window.", labels=["model"]
        )
        spare = GaugeMetricFamily(
            "appliance_spare_ips_at_slo", "Spare inferences/s at the SLO after the reserve.", labels=["model"]
        )
        fallbacks = GaugeMetricFamily(
            "appliance_provider_fallbacks",
            "Providers that did not take the model.",
            labels=["model", "provider", "stage", "reason"],
        )
        for entry in hub:
            scheduler = entry.scheduler
            provider = scheduler.model.provider if scheduler else ""
            ready.add_metric([entry.name, provider], 1.0 if entry.state is State.READY else 0.0)
            if scheduler is None:
                continue
            model, stats = entry.name, scheduler.stats
            for (priority, outcome), count in sorted(stats.requests.items()):
                requests.add_metric([model, priority, outcome], count)
            for reason, count in sorted(stats.failures.items()):
                failures.add_metric([model, reason], count)
            inferences.add_metric([model], stats.inference_count)
            preemptions.add_metric([model], stats.preemptions)
            if scheduler.replica is not None:
                restarts.add_metric([model], scheduler.replica.restarts)
            for name, attribute, _ in _HISTOGRAMS:
                _observe(histograms[name], model, getattr(stats, attribute))
            for priority in Priority:
                depth.add_metric([model, priority.label], len(scheduler.queues.by_class[priority]))
            capacity = scheduler.capacity(reserved)
            max_ips.add_metric([model, provider], capacity.max_ips_at_slo)
            served.add_metric([model], capacity.served_ips)
            spare.add_metric([model], capacity.spare_ips_at_slo)
            for fallback in scheduler.model.fallbacks:
                fallbacks.add_metric([model, fallback.provider, fallback.stage, fallback.reason[:120]], 1)
        refusals = CounterMetricFamily(
            "appliance_refusals",
            "Requests refused or failed, by model (names not served count as _unknown), priority class "
            "and reason.",
            labels=["model", "priority", "reason"],
        )
        for (model, priority, reason), count in self.plane.refusals:
            refusals.add_metric([model, priority, reason], count)
        draining = GaugeMetricFamily("appliance_draining", "1 while the service drains.")
        draining.add_metric([], 1.0 if hub.is_draining else 0.0)
        yield from (ready, requests, failures, refusals, inferences, preemptions, restarts)
        yield from histograms.values()
        yield from (depth, max_ips, served, spare, fallbacks, draining)


def _observe(family: HistogramMetricFamily, model: str, histogram: Histogram) -> None:
    family.add_metric([model], buckets=histogram.cumulative(), sum_value=histogram.sum)


def registry(plane: DataPlane) -> CollectorRegistry:
    """A registry of one service: its own families and the process's (one per app, so that several
    services in one process, as in the tests, never collide)."""
    found = CollectorRegistry(auto_describe=False)
    found.register(ApplianceCollector(plane))
    ProcessCollector(registry=found)
    GCCollector(registry=found)  # collections and objects collected, per generation
    return found


def render(metrics: CollectorRegistry) -> bytes:
    return generate_latest(metrics)
