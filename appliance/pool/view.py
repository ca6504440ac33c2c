"""The platform's picture of the pool, built from what nodes publish; pure (receive times are passed in)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import orjson

from appliance.pool.topics import parse_node_topic


@dataclass
class NodeView:
    """One node as last heard of. Staleness goes by receive time here, never by the node's clock."""

    site: str
    node: str
    state: str = "unknown"
    reason: str = ""
    session: int = 0
    birth: dict[str, Any] | None = None
    capacity: dict[str, Any] | None = None
    capacity_received_s: float | None = None

    @property
    def name(self) -> str:
        return f"{self.site}/{self.node}"

    def age_s(self, now_s: float) -> float | None:
        return None if self.capacity_received_s is None else now_s - self.capacity_received_s

    def is_stale(self, now_s: float) -> bool:
        age_s = self.age_s(now_s)
        return age_s is None or self.capacity is None or age_s > self.capacity["valid_for_s"]

    def spare_ips(self, model: str, now_s: float) -> float:
        """Spare inferences/s for `model` that a job may use now: 0 unless online, fresh and accepting."""
        if self.state != "online" or self.is_stale(now_s) or self.capacity is None:
            return 0.0
        report = self.capacity["models"].get(model, {})
        return float(report.get("spare_ips_at_slo", 0.0)) if report.get("accepts_pool_jobs") else 0.0

    def inputs(self, model: str) -> list[dict[str, Any]]:
        """The model's inputs as the node's birth describes them ([] when unknown)."""
        return list(((self.birth or {}).get("models", {}).get(model) or {}).get("inputs", []))


class PoolView:
    """Every node heard of under `root`. `ingest` may be called from paho's thread: it takes a lock."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._nodes: dict[tuple[str, str], NodeView] = {}
        self._lock = threading.Lock()

    def nodes(self) -> list[NodeView]:
        with self._lock:
            return sorted(self._nodes.values(), key=lambda view: view.name)

    def ingest(self, topic: str, payload: bytes, received_s: float) -> NodeView | None:
        """Take one node message; messages of an older session than the one known are ignored."""
        origin = parse_node_topic(self.root, topic)
        if origin is None or not payload:
            return None
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(document, dict) or not isinstance(document.get("session"), int):
            return None
        with self._lock:
            view = self._nodes.setdefault((origin.site, origin.node), NodeView(origin.site, origin.node))
            if document["session"] < view.session:
                return view  # a late message from before the node's last reconnect
            view.session = document["session"]
            if origin.kind == "state":
                view.state, view.reason = document.get("state", "unknown"), document.get("reason", "")
            elif origin.kind == "birth":
                view.birth = document
            elif origin.kind == "capacity":
                view.capacity, view.capacity_received_s = document, received_s
            return view

    def best(self, model: str, now_s: float) -> NodeView | None:
        """The node with the most spare capacity for `model` now, or None when no node has any."""
        ranked = sorted(self.nodes(), key=lambda view: view.spare_ips(model, now_s), reverse=True)
        if ranked and ranked[0].spare_ips(model, now_s) > 0:
            return ranked[0]
        return None

    def table(self, now_s: float) -> str:
        """A terminal table: node, state, session, age of its capacity report, spare/max per model."""
        rows = [("node", "state", "session", "age_s", "spare/max inferences/s at SLO")]
        for view in self.nodes():
            age_s = view.age_s(now_s)
            models = "-"
            if view.capacity is not None:
                models = (
                    ", ".join(
                        f"{name} {m['spare_ips_at_slo']:.0f}/{m['max_ips_at_slo']:.0f}"
                        + ("" if m.get("accepts_pool_jobs") else " (no jobs)")
                        for name, m in view.capacity["models"].items()
                        if "max_ips_at_slo" in m
                    )
                    or "-"
                )
                if view.is_stale(now_s):
                    models = f"stale: {models}"
            state = view.state + (f" ({view.reason})" if view.reason and view.state != "online" else "")
            rows.append(
                (view.name, state, str(view.session), "-" if age_s is None else f"{age_s:.1f}", models)
            )
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
            for row in rows
        )
