"""The platform's picture of the pool, built from what nodes publish; pure (receive times are passed in).

Ordering rules: a message of an older `session` than the one known is late (a Last Will of a connection
the node has since replaced, a retained report of a previous run) and is ignored; within a session each
kind's `seq` only rises. Staleness goes by receive time here, never by the node's clock. A message
whose topic, size, identity or shape the gateway cannot use is ignored, in whole or in part (intake.py),
and counted in `rejected`.

The view is bounded whatever the pool sends: at most `max_nodes` nodes (a new node beyond them is
ignored and counted until one is forgotten), and a node heard nothing from for `forget_after_s` is
forgotten (the ledger keeps its record; heard again, it is a new node of the view).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

from appliance.platform import intake
from appliance.platform.offering import Key, Offering
from appliance.pool.topics import NodeMessage, parse_node_topic
from appliance.text import printable

log = logging.getLogger(__name__)

SILENT = "reports stopped"  # the reason of a node whose last capacity report has expired
SHOWN = 5  # problems of one message a log line shows
MAX_NODES = 20_000  # gateway.max_nodes' default
FORGET_AFTER_S = 3600.0  # gateway.forget_after_s' default
MAX_WARNED = 4096  # (site, node, kind) whose first rejection is logged as a warning; later ones at debug
CHECKS = {"birth": intake.birth, "state": intake.state, "capacity": intake.capacity}
_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Offer:
    """What one node offers for one model now: spare inferences/s within an SLO window."""

    spare_ips: float
    slo_window_s: float
    sha256: str | None


@dataclass
class NodeView:
    """One node as last heard of, with this gateway's own job counts per model."""

    site: str
    node: str
    state: str = "unknown"
    reason: str = ""
    session: int = 0
    birth: dict[str, Any] | None = None
    capacity: dict[str, Any] | None = None
    capacity_received_s: float | None = None
    capacity_valid_for_s: float = 0.0  # its valid_for_s, or less: what the broker said was left of it
    last_received_s: float | None = None
    seqs: dict[str, int] = field(default_factory=dict)  # kind -> last seq in this session
    jobs: dict[str, Counter[str]] = field(default_factory=dict)  # model -> sent/answered/refused/...
    quarantine: str | None = None  # why the node gets no buyer jobs (canary failed, key changed)
    needs_key: bool = False  # the gateway's view: no job until the birth's key is the pinned one
    trusted_key: str | None = None  # the key pinned in the ledger, once checked
    # (the birth they were made from, model -> signature): kept until the birth is replaced
    _signatures: tuple[dict[str, Any] | None, dict[str, bytes | None]] = field(
        default=(None, {}), repr=False, compare=False
    )

    @property
    def public_key(self) -> str | None:
        found = (self.birth or {}).get("public_key")
        return found if isinstance(found, str) else None

    @property
    def is_trusted(self) -> bool:
        """Its answers can be verified: the birth's key is the one the ledger pinned for it."""
        return not self.needs_key or (self.trusted_key is not None and self.public_key == self.trusted_key)

    @property
    def name(self) -> str:
        return f"{self.site}/{self.node}"

    def age_s(self, now_s: float) -> float | None:
        return None if self.capacity_received_s is None else now_s - self.capacity_received_s

    def is_stale(self, now_s: float) -> bool:
        age_s = self.age_s(now_s)
        return age_s is None or self.capacity is None or age_s > self.capacity_valid_for_s

    def is_live(self, now_s: float) -> bool:
        """Online and still reporting: what dispatch goes by."""
        return self.state == "online" and not self.is_stale(now_s)

    def is_lost(self, now_s: float) -> bool:
        """Offline or no longer reporting: its jobs in flight will not be answered (failover goes by it).
        A draining node finishes the jobs it holds; it only takes no new ones."""
        return self.state == "offline" or self.is_stale(now_s)

    def effective_state(self, now_s: float) -> tuple[str, str]:
        """(state, reason) as the fleet view shows it: an online node whose reports stopped is offline."""
        if self.state == "online" and self.capacity_received_s is not None and self.is_stale(now_s):
            return "offline", SILENT
        return self.state, self.reason

    def model_birth(self, model: str) -> Mapping[str, Any]:
        """The birth's entry for `model` ({} when none), read-only: the node's own, not a copy (it is
        looked at several times per job and per vote)."""
        return ((self.birth or _EMPTY).get("models", _EMPTY).get(model)) or _EMPTY

    def signature(self, model: str) -> bytes | None:
        """The birth's inputs and outputs of `model` in one canonical form (keys sorted), what nodes are
        counted by when the gateway tells buyers what a model takes; None when the birth has no inputs.
        Made once per birth: a count over a thousand nodes would otherwise serialise each every time."""
        birth, made = self._signatures
        if birth is not self.birth:
            birth, made = self.birth, {}
            self._signatures = (birth, made)
        if model not in made:
            entry = self.model_birth(model)
            made[model] = (
                None
                if entry.get("inputs") is None
                else orjson.dumps([entry["inputs"], entry.get("outputs")], option=orjson.OPT_SORT_KEYS)
            )  # (intake.py keeps only names, datatypes and shapes: always serialisable)
        return made[model]

    def offer(self, model: str, now_s: float, *, is_check: bool = False) -> Offer | None:
        """The node's offer for `model` if a job may use it now: online, fresh, accepting, its key trusted
        and (unless the job is a check, which is how a quarantined node passes again) not quarantined."""
        if self.refusal(model, now_s, is_check=is_check) is not None:
            return None
        report = self.capacity["models"][model]  # type: ignore[index]
        slo_ms = report.get("slo_p99_ms") or self.model_birth(model).get("slo_p99_ms") or 100.0
        return Offer(float(report["spare_ips_at_slo"]), slo_ms / 1e3, self.model_birth(model).get("sha256"))

    def refusal(self, model: str, now_s: float, *, is_check: bool = False) -> str | None:
        """Why no job of `model` may go to the node now (None: one may)."""
        if self.quarantine is not None and not is_check:
            return f"quarantined: {self.quarantine}"
        if not self.is_trusted:
            return "its device key is not the one the ledger pinned (or not checked yet)"
        if not self.is_live(now_s) or self.capacity is None:
            return "offline or not reporting"
        report = self.capacity["models"].get(model)
        if not report or not report.get("accepts_pool_jobs"):
            return f"it takes no pool jobs for model {model!r}"
        if report.get("spare_ips_at_slo", 0) <= 0:
            return f"it has no spare capacity for model {model!r}"
        return None

    def spare_ips(self, model: str, now_s: float) -> float:
        """Spare inferences/s for `model` that a job may use now: 0 unless online, fresh and accepting."""
        offer = self.offer(model, now_s)
        return 0.0 if offer is None else offer.spare_ips

    def inputs(self, model: str) -> list[dict[str, Any]]:
        """The model's inputs as the node's birth describes them ([] when unknown)."""
        return list(self.model_birth(model).get("inputs", []))

    def count(self, model: str, what: str) -> None:
        counts = self.jobs.get(model)  # not setdefault: that makes a Counter per call (three a job)
        if counts is None:
            counts = self.jobs[model] = Counter()
        counts[what] += 1


class PoolView:
    """Every node heard of under `root`. `ingest` takes a lock: `watch` calls it from paho's thread while
    its table is drawn on another (the gateway calls it on its event loop)."""

    def __init__(
        self,
        root: str,
        *,
        needs_key: bool = False,
        max_nodes: int = MAX_NODES,
        forget_after_s: float = FORGET_AFTER_S,
    ) -> None:
        self.root = root
        self.needs_key = needs_key
        self.max_nodes = max_nodes
        self.forget_after_s = forget_after_s
        self.ingested = 0  # messages taken (not ignored), for /metrics
        # Messages ignored in whole or in part: by kind for their size, identity or shape (intake), and
        # "topic" (a reserved or unusable site or node) or "node_limit" (a new node beyond max_nodes).
        self.rejected: Counter[str] = Counter()
        self.forgotten = 0  # nodes forgotten after forget_after_s of silence
        self._warned: set[tuple[str, str, str]] = set()  # (site, node, kind) whose rejection was logged
        self._nodes: OrderedDict[Key, NodeView] = OrderedDict()  # the least recently heard first
        self._offering: Offering[NodeView] = Offering()
        self._fallen: set[Key] = set()  # nodes gone offline since the last `fallen()` (at most max_nodes)
        self._lock = threading.Lock()

    def nodes(self) -> list[NodeView]:
        with self._lock:
            return sorted(self._nodes.values(), key=lambda view: view.name)

    def get(self, site: str, node: str) -> NodeView | None:
        return self._nodes.get((site, node))

    def fallen(self) -> set[Key]:
        """The nodes whose state went to `offline` since the last call (a repeat of `offline`, or any other
        state, is no change), emptied: the gateway fails their jobs in flight, and no one else's."""
        with self._lock:
            fallen, self._fallen = self._fallen, set()
            return fallen

    def ingest(
        self, topic: str, payload: bytes, received_s: float, expiry_s: int | None = None
    ) -> NodeView | None:
        """Take one node message; returns the node when the message changed it, None when ignored.

        `expiry_s` is the MQTT 5 message expiry the broker forwarded with it: for a retained report, what
        is left of its life, which a report's own valid_for_s (counted from receipt) may outlast."""
        origin = parse_node_topic(self.root, topic)
        if origin is None or origin.kind == "evt" or not payload:
            return None
        problem = intake.topic_problem(origin.site, origin.node)
        if problem is not None:
            return self._ignored(origin, "topic", [problem])
        problem = intake.size_problem(origin.kind, payload)
        if problem is not None:
            return self._ignored(origin, origin.kind, [problem])
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        session = document.get("session") if isinstance(document, dict) else None
        if not isinstance(session, int) or isinstance(session, bool) or session < 0:
            return None
        problem = intake.identity_problem(document, origin.site, origin.node)
        if problem is not None:
            return self._ignored(origin, origin.kind, [problem])
        kept, problems = CHECKS[origin.kind](document)
        if problems:
            with self._lock:
                self._rejected(origin, origin.kind, problems, taken=kept is not None)
        if kept is None:
            return None
        seq = document.get("seq")
        with self._lock:
            self._forget(received_s)
            key = (origin.site, origin.node)
            view = self._nodes.get(key)
            if view is None:
                if len(self._nodes) >= self.max_nodes:
                    limit = f"the view holds {self.max_nodes} nodes already (gateway.max_nodes)"
                    self._rejected(origin, "node_limit", [limit], taken=False)
                    return None
                view = self._nodes[key] = NodeView(*key, needs_key=self.needs_key)
            if session < view.session:
                return None  # late: from before the node's last reconnect (an old Last Will included)
            if session > view.session:
                view.session, view.seqs = session, {}
                if view.capacity is not None:  # an old session's offer is void
                    view.capacity = view.capacity_received_s = None
                    self._offering.update(key, view, frozenset())
            if isinstance(seq, int):
                if seq <= view.seqs.get(origin.kind, -1):
                    return None  # a repeat or out of order within the session
                view.seqs[origin.kind] = seq
            view.last_received_s = received_s
            self._nodes.move_to_end(key)
            if origin.kind == "state":
                if kept["state"] == "offline" and view.state != "offline":
                    self._fallen.add(key)
                view.state, view.reason = kept["state"], kept["reason"]
            elif origin.kind == "birth":
                view.birth = kept
            else:
                view.capacity, view.capacity_received_s = kept, received_s
                view.capacity_valid_for_s = kept["valid_for_s"]
                if expiry_s is not None and 0 <= expiry_s < view.capacity_valid_for_s:
                    view.capacity_valid_for_s = expiry_s
                self._offering.update(key, view, frozenset(kept["models"]))
            self.ingested += 1
            return view

    def forget(self, now_s: float) -> None:
        """Forget the nodes heard nothing from for forget_after_s (ingest does it as it goes, in O(1) per
        message: the nodes are kept least recently heard first)."""
        with self._lock:
            self._forget(now_s)

    def _forget(self, now_s: float) -> None:
        cutoff_s = now_s - self.forget_after_s
        while self._nodes:
            key, oldest = next(iter(self._nodes.items()))
            if oldest.last_received_s is not None and oldest.last_received_s >= cutoff_s:
                return
            del self._nodes[key]
            self._offering.update(key, oldest, frozenset())
            self._fallen.discard(key)
            for kind in CHECKS:
                self._warned.discard((*key, kind))
            self._warned.discard(("", "", "node_limit"))
            self.forgotten += 1

    def _ignored(self, origin: NodeMessage, reason: str, problems: list[str]) -> None:
        with self._lock:
            self._rejected(origin, reason, problems, taken=False)

    def _rejected(self, origin: NodeMessage, reason: str, problems: list[str], *, taken: bool) -> None:
        """Count a message ignored in whole or in part; log it once per node and kind (a node that keeps
        sending it would fill the log), later ones, and those past MAX_WARNED, at debug level."""
        self.rejected[reason] += 1
        # Names made up by the thousand get one warning per site; a full view one until it has room.
        warned = {"topic": (origin.site, "", reason), "node_limit": ("", "", reason)}.get(
            reason, (origin.site, origin.node, origin.kind)
        )
        first = warned not in self._warned and len(self._warned) < MAX_WARNED
        if first:
            self._warned.add(warned)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "node %s/%s: %s %s: %s",
            printable(origin.site[: intake.MAX_LEVEL_CHARS]),
            printable(origin.node[: intake.MAX_LEVEL_CHARS]),
            origin.kind,
            "taken in part" if taken else "ignored",
            "; ".join(problems[:SHOWN])
            + (f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""),
        )

    def offering(self, model: str) -> list[NodeView]:
        """Nodes whose last report names `model` (fresh or not: callers check the offer)."""
        with self._lock:
            holders = self._offering.get(model)
            return list(holders.views.values()) if holders else []

    def find(self, model: str, accept: Callable[[NodeView], bool]) -> NodeView | None:
        """The first node reporting `model` that `accept`s, without copying the fleet (once per job)."""
        with self._lock:
            holders = self._offering.get(model)
            return next((view for view in holders.views.values() if accept(view)), None) if holders else None

    def sample(self, model: str, count: int) -> list[NodeView]:
        """Up to `count` nodes reporting `model`, drawn at random (dispatch's power-of-d choices)."""
        with self._lock:
            holders = self._offering.get(model)
            return holders.draw(count) if holders else []

    def models(self) -> list[str]:
        with self._lock:
            return self._offering.models()

    def best(self, model: str, now_s: float) -> NodeView | None:
        """The node with the most spare capacity for `model` now, or None when no node has any."""
        ranked = sorted(self.nodes(), key=lambda view: view.spare_ips(model, now_s), reverse=True)
        if ranked and ranked[0].spare_ips(model, now_s) > 0:
            return ranked[0]
        return None

    def table(self, now_s: float) -> str:
        """A terminal table: node, state, session, age of its capacity report, spare/max per model."""
        return table(self.nodes(), now_s)


def table(nodes: list[NodeView], now_s: float) -> str:
    """The nodes as `watch` shows them, every control character a node could send escaped."""
    rows = [("node", "state", "session", "age_s", "spare/max inferences/s at SLO")]
    for view in nodes:
        age_s = view.age_s(now_s)
        models = "-"
        if view.capacity is not None:
            models = (
                ", ".join(
                    f"{name} {m.get('spare_ips_at_slo', 0.0):.0f}/{m['max_ips_at_slo']:.0f}"
                    + ("" if m.get("accepts_pool_jobs") else " (no jobs)")
                    for name, m in view.capacity["models"].items()
                    if "max_ips_at_slo" in m
                )
                or "-"
            )
            if view.is_stale(now_s):
                models = f"stale: {models}"
        state = view.state + (f" ({view.reason})" if view.reason and view.state != "online" else "")
        if view.quarantine:
            state += f" [quarantined: {view.quarantine}]"
        age = "-" if age_s is None else f"{age_s:.1f}"
        rows.append((printable(view.name), printable(state), str(view.session), age, printable(models)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    )
