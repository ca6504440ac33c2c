"""The gateway's /metrics (Prometheus): jobs by outcome, latency, ingest, nodes, gateways, broker link."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance.platform.view import PoolView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics(Collector):
    """Counts kept as plain integers (cheap on the hot path), turned into metric families at scrape time."""

    def __init__(self, view: PoolView, gauges: Callable[[], dict[str, float]]) -> None:
        self.view = view
        self.gauges = gauges
        self.jobs: Counter[tuple[str, str]] = Counter()  # (model, outcome)
        self.refusals: Counter[str] = Counter()  # buyer-side refusals by reason, before any dispatch
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "appliance_gateway_job_seconds",
            "Buyer request time through the gateway, answered jobs only.",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.registry.register(self)

    def job(self, model: str, outcome: str) -> None:
        self.jobs[(model, outcome)] += 1

    def answered(self, model: str, seconds: float) -> None:
        self.latency.labels(model).observe(seconds)

    def refused(self, reason: str) -> None:
        self.refusals[reason] += 1

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Any]:
        jobs = CounterMetricFamily(
            "appliance_gateway_jobs", "Job events by model and outcome.", labels=["model", "outcome"]
        )
        for (model, outcome), count in sorted(self.jobs.items()):
            jobs.add_metric([model, outcome], count)
        yield jobs
        refusals = CounterMetricFamily(
            "appliance_gateway_refusals", "Buyer requests refused before dispatch.", labels=["reason"]
        )
        for reason, count in sorted(self.refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals
        yield CounterMetricFamily(
            "appliance_gateway_reports_ingested", "Node messages taken.", value=self.view.ingested
        )
        rejected = CounterMetricFamily(
            "appliance_gateway_reports_rejected",
            "Node births and capacity reports ignored in whole or in part for their shape.",
            labels=["kind"],
        )
        for kind, count in sorted(self.view.rejected.items()):
            rejected.add_metric([kind], count)
        yield rejected
        now_s = time.monotonic()
        states: Counter[str] = Counter(node.effective_state(now_s)[0] for node in self.view.nodes())
        nodes = GaugeMetricFamily("appliance_gateway_nodes", "Nodes by state.", labels=["state"])
        for state, count in sorted(states.items()):
            nodes.add_metric([state], count)
        yield nodes
        for name, value in self.gauges().items():
            yield GaugeMetricFamily(f"appliance_gateway_{name}", name.replace("_", " "), value=value)
