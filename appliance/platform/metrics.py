"""The gateway's /metrics (Prometheus): jobs by outcome, latency, ingest, nodes, gateways, broker link.

Model names come from nodes and buyers, so a series is labelled with a model only when the gateway
serves it (a catalogue name, or with no catalogue a name some node in good standing offers), and with
at most `max_models` of them; every other name is counted under OTHER. Once the labels are all taken,
names no longer served give theirs up (their job counts move to OTHER) at the next scrape. The page is
kept KEEP_FACTOR times as long as building it took (kept.py, as the fleet view is), so however often it
is scraped (it needs no token) building it takes at most 1/KEEP_FACTOR of the event loop.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance.platform.catalogue import Catalogue, in_good_standing
from appliance.platform.kept import Kept
from appliance.platform.view import PoolView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "_other"  # the label of every model name that is not served, or beyond max_models
MAX_MODELS = 256  # model labels at most (gateway.max_metric_models)
UNSERVED_RECHECK_S = 1.0  # a name found not served is looked up again after this long
MAX_UNSERVED = 4096  # names remembered as not served; more and the memory starts over


class GatewayMetrics(Collector):
    """Counts kept as plain integers (cheap on the hot path), turned into metric families at scrape time."""

    def __init__(
        self,
        view: PoolView,
        gauges: Callable[[], dict[str, float]],
        *,
        catalogue: Catalogue | None = None,
        max_models: int = MAX_MODELS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.view = view
        self.gauges = gauges
        self.catalogue = catalogue
        self.max_models = max_models
        self.clock = clock
        self.jobs: Counter[tuple[str, str]] = Counter()  # (model label, outcome)
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
        self._models: set[str] = set()  # names with a label of their own
        self._unserved: dict[str, float] = {}  # name -> until when it counts as not served (clock)
        self.page = Kept(self._build, clock)  # 100,000 nodes take ~0.3 s to count: kept ~6 s

    def label(self, model: str) -> str:
        """The label `model` is counted under: its own name if it has one or may take one, else OTHER."""
        if model in self._models:
            return model
        if len(self._models) >= self.max_models or not self._is_served(model):
            return OTHER
        self._models.add(model)
        return model

    def job(self, model: str, outcome: str) -> None:
        self.jobs[(self.label(model), outcome)] += 1

    def answered(self, model: str, seconds: float) -> None:
        self.latency.labels(self.label(model)).observe(seconds)

    def refused(self, reason: str) -> None:
        self.refusals[reason] += 1

    def exposition(self) -> bytes:
        """The page, built anew once the last one is older than KEEP_FACTOR times its building took."""
        return self.page.get()

    def _build(self) -> bytes:
        if len(self._models) >= self.max_models:
            self._release_unserved()
        return generate_latest(self.registry)

    def _is_served(self, model: str) -> bool:
        if self.catalogue is not None and self.catalogue.entries is not None:
            return model in self.catalogue.entries
        now_s = self.clock()
        if self._unserved.get(model, float("-inf")) > now_s:
            return False
        if self.view.find(model, in_good_standing) is not None:
            self._unserved.pop(model, None)
            return True
        if len(self._unserved) >= MAX_UNSERVED:
            self._unserved.clear()
        self._unserved[model] = now_s + UNSERVED_RECHECK_S
        return False

    def _release_unserved(self) -> None:
        """Labels all taken: names no longer served give theirs up, their job counts moving to OTHER."""
        gone = {model for model in self._models if not self._is_served(model)}
        if not gone:
            return
        self._models -= gone
        for (model, outcome), count in list(self.jobs.items()):
            if model in gone:
                del self.jobs[(model, outcome)]
                self.jobs[(OTHER, outcome)] += count
        for model in gone:
            try:
                self.latency.remove(model)
            except KeyError:  # never answered: no histogram series
                continue

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
            "Node messages ignored in whole or in part, by kind: birth, state, capacity (size, identity, "
            "shape), topic (a reserved or unusable site or node), node_limit (gateway.max_nodes).",
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
