"""Dispatch on credit: never more rows in flight to a node's model than its offer covers; pure.

A node's credit for a model is `spare_ips_at_slo x SLO window x share` rows, where the window is the
model's `slo_p99_ms` and `share` is 1/N with N live gateways. By Little's law, the rows a server holds
at once are its rate times the time each spends there; a node that may take `spare` more rows/s, each
due within the SLO, can hold `spare x SLO` more rows without any of them waiting past it. Counting in
rows (not jobs) keeps a batch of 8 from passing as one. A job larger than the whole window may still go
to a node that holds nothing else for the model, so big jobs are not starved; the node's own admission
refuses it if it truly cannot. Work spreads in proportion to free credit: `sample_nodes` nodes are
drawn at random and one of those that can take the job is chosen with probability proportional to its
free rows, so a node twice as idle gets twice the work and a full one none; only when none of the drawn
nodes can take the job are the nodes with free credit looked at, so a dispatch costs O(d), not O(nodes),
while capacity lasts.

Which nodes have free credit is found by walking every node offering the model: 12.7 ms of the event loop
at 5,000 nodes. In a tight market (the pool's idle capacity sold out, its normal state) every dispatch and
every 503 would pay it. So where that walk costs over kept.MIN_KEPT_COST_S of CPU, the nodes it found
with free credit are kept for KEEP_FACTOR times that cost (kept.costly): meanwhile a pick looks
only at them (dropping those that filled up), and a node whose rows come back (`release`) joins them at
once. Credit that appears otherwise (a report raising an offer, withheld credit coming back) is seen at
the next walk, at most KEEP_FACTOR times its cost later (a quarter of a second at 5,000 nodes); a small
fleet is walked afresh every time.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from appliance.platform import kept
from appliance.platform.view import NodeView, PoolView

Key = tuple[str, str, str]  # site, node, model
Node = tuple[str, str]  # site, node
# Far more rows than a gateway ever has in flight, and small enough that the free rows of any fleet,
# which weigh each pick, sum to a finite number whatever an offer claims (random.choices needs one).
MAX_CREDIT_ROWS = 1e9
WITHHELD_CLEAN_AT = 1024  # withheld entries before the first clean-up of expired ones


class CreditBook:
    """In-flight rows and withheld credit per (node, model); called on the event loop only."""

    def __init__(
        self,
        view: PoolView,
        *,
        share: Callable[[], float] = lambda: 1.0,
        sample_nodes: int = 4,
        clock: Callable[[], float],
    ) -> None:
        self.view = view
        self.share = share
        self.sample_nodes = sample_nodes
        self.clock = clock
        self._in_flight: dict[Key, int] = {}
        # model -> node -> until (monotonic seconds). Expired entries go once the book has doubled since
        # the last clean-up (and a model's own at each of its 503s), so it holds about what is withheld
        # now, whatever nodes come and go.
        self._withheld: dict[str, dict[Node, float]] = {}
        self._withheld_count = 0
        self._clean_at = WITHHELD_CLEAN_AT
        # model -> (until, the nodes a costly walk found with free credit, and those whose rows came back)
        self._free: dict[str, tuple[float, dict[Node, NodeView]]] = {}

    def credit_rows(self, node: NodeView, model: str, now_s: float) -> float:
        """Rows this gateway may have in flight to the node's model now (0 without a usable offer)."""
        offer = node.offer(model, now_s)
        if offer is None:
            return 0.0
        withheld = self._withheld.get(model)
        if withheld and withheld.get((node.site, node.node), 0.0) > now_s:
            return 0.0
        return min(offer.spare_ips * offer.slo_window_s * self.share(), MAX_CREDIT_ROWS)

    def in_flight(self, node: NodeView, model: str) -> int:
        return self._in_flight.get((node.site, node.node, model), 0)

    def free_rows(self, node: NodeView, model: str, now_s: float) -> float:
        return self.credit_rows(node, model, now_s) - self.in_flight(node, model)

    def can_take(self, node: NodeView, model: str, rows: int, now_s: float) -> bool:
        return self._free_for(node, model, rows, now_s) is not None

    def _free_for(self, node: NodeView, model: str, rows: int, now_s: float) -> float | None:
        """The node's free rows for the model if a job of `rows` rows may go to it now, else None."""
        credit = self.credit_rows(node, model, now_s)
        held = self.in_flight(node, model)
        if credit > 0 and (held + rows <= credit or held == 0):
            return credit - held
        return None

    def pick(
        self, model: str, rows: int, files: frozenset[str] | None, excluded: Iterable[tuple[str, str]] = ()
    ) -> NodeView | None:
        """The node to send a job of `rows` rows to, or None when no node has the credit."""
        now_s = self.clock()
        barred = set(excluded)
        found = self._best(self.view.sample(model, self.sample_nodes), model, rows, files, barred, now_s)
        if found is None:
            found = self._best(self._free_nodes(model, now_s), model, rows, files, barred, now_s)
        return found

    def _free_nodes(self, model: str, now_s: float) -> list[NodeView]:
        """The nodes offering `model` that have free credit now: found by a walk over all of them, or,
        while a costly walk's findings are kept (module docstring), those of them still free."""
        free = self._free.get(model)
        if free is not None and kept.is_fresh(free[0]):
            nodes = free[1]
            for key in [key for key, node in nodes.items() if self.free_rows(node, model, now_s) <= 0]:
                del nodes[key]
            return list(nodes.values())
        self._free.pop(model, None)
        found, until_s = kept.costly(
            lambda: [node for node in self.view.offering(model) if self.free_rows(node, model, now_s) > 0]
        )
        if until_s is not None:
            self._free[model] = (until_s, {(node.site, node.node): node for node in found})
        return found

    def _best(
        self,
        nodes: list[NodeView],
        model: str,
        rows: int,
        files: frozenset[str] | None,
        barred: set[tuple[str, str]],
        now_s: float,
    ) -> NodeView | None:
        eligible: list[tuple[NodeView, float]] = []
        for node in nodes:
            if (node.site, node.node) in barred:
                continue
            free = self._free_for(node, model, rows, now_s)
            if free is None:
                continue
            if files is not None and node.model_birth(model).get("sha256") not in files:
                continue
            eligible.append((node, max(free, 1e-9)))
        if not eligible:
            return None
        return random.choices([n for n, _ in eligible], weights=[free for _, free in eligible])[0]

    def take(self, node: NodeView, model: str, rows: int) -> None:
        key = (node.site, node.node, model)
        self._in_flight[key] = self._in_flight.get(key, 0) + rows

    def release(self, node: NodeView, model: str, rows: int) -> None:
        key = (node.site, node.node, model)
        left = self._in_flight.get(key, 0) - rows
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)
        free = self._free.get(model)
        if free is not None:  # its rows are back: a pick finds it before the next walk
            free[1][(node.site, node.node)] = node

    def withhold(self, node: NodeView, model: str, seconds: float) -> None:
        """No job of `model` goes to the node for `seconds` (the dispatcher bounds what a node names)."""
        key = (node.site, node.node)
        now_s = self.clock()
        was_s = self._withheld.get(model, {}).get(key)
        if was_s is None:
            if self._withheld_count >= self._clean_at:
                self._clean(now_s)
                self._clean_at = max(WITHHELD_CLEAN_AT, 2 * self._withheld_count)
            self._withheld_count += 1
        elif was_s >= now_s + seconds:
            return
        self._withheld.setdefault(model, {})[key] = now_s + seconds

    def withheld_for_s(self, node: NodeView, model: str) -> float:
        until_s = self._withheld.get(model, {}).get((node.site, node.node), 0.0)
        return max(0.0, until_s - self.clock())

    def withheld_count(self) -> int:
        """Entries the book holds, expired ones not yet cleaned up included."""
        return self._withheld_count

    def _clean(self, now_s: float, model: str | None = None) -> None:
        """Drop the expired entries (of one model, or of all)."""
        for name in [model] if model is not None else list(self._withheld):
            withheld = self._withheld.get(name)
            if withheld is None:
                continue
            expired = [key for key, until_s in withheld.items() if until_s <= now_s]
            for key in expired:
                del withheld[key]
            self._withheld_count -= len(expired)
            if not withheld:
                del self._withheld[name]

    def retry_after_s(self, model: str, default_s: float) -> float:
        """When to try again after a 503: the earliest withheld credit of the model to come back, or the
        default when none is withheld (new capacity arrives with reports, not on a schedule)."""
        now_s = self.clock()
        self._clean(now_s, model)
        waits = [until_s - now_s for until_s in self._withheld.get(model, {}).values()]
        return min([default_s, *waits]) if waits else default_s
