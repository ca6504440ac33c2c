"""Dispatch on credit: the bound on rows in flight, the 1/N share, withheld credit, spreading."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest

from appliance.platform import kept
from appliance.platform.credit import MAX_CREDIT_ROWS, CreditBook
from appliance.platform.view import NodeView, PoolView

ROOT = "ecp/v1"


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def add(
    view: PoolView, node: str, spare: float, *, slo_ms: float = 100.0, sha: str = "a" * 64, at_s: float = 0.0
) -> NodeView:
    view.ingest(
        f"{ROOT}/s/{node}/birth",
        orjson.dumps({"session": 1, "seq": 0, "models": {"m": {"sha256": sha}}}),
        at_s,
    )
    view.ingest(f"{ROOT}/s/{node}/state", orjson.dumps({"session": 1, "seq": 1, "state": "online"}), at_s)
    model: dict[str, Any] = {"spare_ips_at_slo": spare, "accepts_pool_jobs": True, "slo_p99_ms": slo_ms}
    view.ingest(
        f"{ROOT}/s/{node}/capacity",
        orjson.dumps({"session": 1, "seq": 2, "valid_for_s": 3, "models": {"m": model}}),
        at_s,
    )
    found = view.get("s", node)
    assert found is not None
    return found


def test_credit_is_spare_times_the_slo_window_times_the_share() -> None:
    view, clock = PoolView(ROOT), Clock()
    share = [1.0]
    book = CreditBook(view, share=lambda: share[0], clock=clock)
    node = add(view, "a", spare=100.0, slo_ms=50.0)
    assert book.credit_rows(node, "m", 0.0) == pytest.approx(5.0)
    share[0] = 0.5  # two gateways: each may use half
    assert book.credit_rows(node, "m", 0.0) == pytest.approx(2.5)


def test_never_more_rows_in_flight_than_the_credit() -> None:
    view, clock = PoolView(ROOT), Clock()
    book = CreditBook(view, clock=clock)
    add(view, "a", spare=40.0)  # 4 rows at a 100 ms SLO
    taken = 0
    while (node := book.pick("m", 1, None)) is not None:
        book.take(node, "m", 1)
        taken += 1
    assert taken == 4
    book.release(node or view.nodes()[0], "m", 1)
    assert book.pick("m", 1, None) is not None and book.pick("m", 2, None) is None
    # A job larger than the whole window still goes to a node that holds nothing else.
    for _ in range(3):
        book.release(view.nodes()[0], "m", 1)
    assert book.pick("m", 9, None) is not None


def test_a_withheld_node_gets_nothing_until_its_retry_after_passes() -> None:
    view, clock = PoolView(ROOT), Clock()
    book = CreditBook(view, clock=clock)
    node = add(view, "a", spare=1000.0)
    book.withhold(node, "m", 30.0)
    assert book.pick("m", 1, None) is None
    assert book.retry_after_s("m", default_s=60.0) == pytest.approx(30.0)
    clock.now_s = 29.0
    assert book.pick("m", 1, None) is None
    clock.now_s = 30.5
    view.ingest(
        f"{ROOT}/s/a/capacity",
        orjson.dumps(
            {
                "session": 1,
                "seq": 3,
                "valid_for_s": 3,
                "models": {"m": {"spare_ips_at_slo": 1000.0, "accepts_pool_jobs": True}},
            }
        ),
        30.5,
    )
    assert book.pick("m", 1, None) is node


def test_expired_offers_and_other_files_are_never_picked() -> None:
    view, clock = PoolView(ROOT), Clock()
    book = CreditBook(view, clock=clock)
    add(view, "a", spare=1000.0, sha="b" * 64)
    assert book.pick("m", 1, frozenset({"a" * 64})) is None  # the catalogue pins another file
    assert book.pick("m", 1, frozenset({"b" * 64})) is not None
    clock.now_s = 3.5  # the report (valid_for_s = 3) has expired
    assert book.pick("m", 1, None) is None


def test_work_spreads_in_proportion_to_free_credit() -> None:
    view, clock = PoolView(ROOT), Clock()
    book = CreditBook(view, sample_nodes=4, clock=clock)
    for name in "abc":
        add(view, name, spare=1000.0)
    add(view, "d", spare=3000.0)
    picks = Counter(book.pick("m", 1, None).node for _ in range(6000))  # type: ignore[union-attr]
    assert set(picks) == set("abcd")
    assert picks["d"] > 2 * picks["a"]  # three times the spare: about three times the work
    assert book.pick("m", 1, None, excluded=[("s", n) for n in "abcd"]) is None


@pytest.mark.parametrize(
    "report",
    [
        [1],
        {"spare_ips_at_slo": "lots", "accepts_pool_jobs": True},
        {"spare_ips_at_slo": 5, "accepts_pool_jobs": True, "slo_p99_ms": "fast"},
        {"spare_ips_at_slo": 5, "accepts_pool_jobs": "yes"},
        {"spare_ips_at_slo": -5, "accepts_pool_jobs": True},
        {"spare_ips_at_slo": True, "accepts_pool_jobs": True},
        {"spare_ips_at_slo": 5, "accepts_pool_jobs": True, "slo_p99_ms": 0},
        {"spare_ips_at_slo": 1e300, "accepts_pool_jobs": True, "slo_p99_ms": 1e12},
        {"spare_ips_at_slo": 1e308, "accepts_pool_jobs": True, "slo_p99_ms": 1000},
    ],
    ids=["list", "spare-text", "slo-text", "accepts-text", "negative", "bool", "slo-zero", "huge", "max"],
)
def test_a_report_one_node_cannot_back_is_dropped_and_the_others_are_still_picked(report: Any) -> None:
    view, clock = PoolView(ROOT), Clock()
    book = CreditBook(view, clock=clock)
    honest = add(view, "honest", spare=100.0)
    for name in ("evil1", "evil2"):  # two of them: their weights would sum past a float's range
        add(view, name, spare=100.0)
        document = {"session": 1, "seq": 3, "valid_for_s": 3, "models": {"m": report, "other": {}}}
        assert view.ingest(f"{ROOT}/s/{name}/capacity", orjson.dumps(document), 0.0) is not None
        evil = view.get("s", name)
        assert (
            evil is not None and evil.offer("m", 0.0) is None and list(evil.capacity["models"]) == ["other"]
        )
    assert all(book.pick("m", 1, None) is honest for _ in range(20))
    assert view.rejected["capacity"] == 2 and "evil1" in view.table(0.0)
    for bad in ({"valid_for_s": "3"}, {"valid_for_s": 0}, {"valid_for_s": True}, {"models": [report]}):
        document = {"session": 1, "seq": 4, "valid_for_s": 3, "models": {"m": {}}} | bad
        assert view.ingest(f"{ROOT}/s/honest/capacity", orjson.dumps(document), 0.0) is None  # ignored whole
    assert book.pick("m", 1, None) is honest  # the last report that could be used still stands


def test_credit_is_bounded_so_that_the_weights_of_a_pick_stay_finite() -> None:
    view, clock = PoolView(ROOT), Clock()
    book = CreditBook(view, clock=clock)
    nodes = [add(view, name, spare=100.0) for name in "abc"]
    for node in nodes[1:]:  # past what ingest takes: whatever an offer says, credit has a ceiling
        assert node.capacity is not None
        node.capacity["models"]["m"] |= {"spare_ips_at_slo": 1e308, "slo_p99_ms": 1e12}
    assert book.credit_rows(nodes[1], "m", 0.0) == MAX_CREDIT_ROWS
    picks = Counter(book.pick("m", 1, None).node for _ in range(200))  # type: ignore[union-attr]
    assert set(picks) <= {"a", "b", "c"} and picks["b"] + picks["c"] > 190


# --- a tight market: the nodes with free credit are found without walking the fleet at every pick ------


class Walks(PoolView):
    """A PoolView that counts the walks over every node offering a model."""

    walks = 0

    def offering(self, model: str) -> list[NodeView]:
        self.walks += 1
        return super().offering(model)


class Costly:
    """time.thread_time and time.perf_counter for kept.costly: a walk costs 10 ms of CPU, and the wall clock
    moves only when a test moves it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cpu_s = 0.0
        self.wall_s = 100.0
        monkeypatch.setattr(kept.time, "thread_time", self.thread_time)
        monkeypatch.setattr(kept.time, "perf_counter", lambda: self.wall_s)

    def thread_time(self) -> float:
        self.cpu_s += 0.005  # read before and after a walk: 10 ms between the two
        return self.cpu_s


def full_pool(monkeypatch: pytest.MonkeyPatch) -> tuple[Walks, CreditBook, list[NodeView], Costly]:
    costly = Costly(monkeypatch)
    view, clock = Walks(ROOT), Clock()
    book = CreditBook(view, clock=clock, sample_nodes=0)  # no random draw: every pick looks for free nodes
    nodes = [add(view, name, spare=10.0) for name in ("a", "b", "c")]  # 1 row each at a 100 ms SLO
    for node in nodes:
        book.take(node, "m", 1)
    return view, book, nodes, costly


def test_a_sold_out_pool_is_walked_once_per_keep_window(monkeypatch: pytest.MonkeyPatch) -> None:
    view, book, _, costly = full_pool(monkeypatch)
    for _ in range(50):
        assert book.pick("m", 1, None) is None
    assert view.walks == 1  # 10 ms of CPU: kept for KEEP_FACTOR x 10 ms
    costly.wall_s += kept.KEEP_FACTOR * 0.010 + 0.001
    assert book.pick("m", 1, None) is None
    assert view.walks == 2


def test_a_node_whose_rows_come_back_is_picked_before_the_next_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    view, book, nodes, _ = full_pool(monkeypatch)
    assert book.pick("m", 1, None) is None
    book.release(nodes[1], "m", 1)
    assert book.pick("m", 1, None) is nodes[1]
    book.take(nodes[1], "m", 1)
    assert book.pick("m", 1, None) is None  # full again, and dropped from the kept nodes
    assert view.walks == 1


def test_credit_a_report_raises_is_seen_at_the_next_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    view, book, _, costly = full_pool(monkeypatch)
    assert book.pick("m", 1, None) is None
    bigger = {"spare_ips_at_slo": 100.0, "accepts_pool_jobs": True, "slo_p99_ms": 100.0}
    report = {"session": 1, "seq": 3, "valid_for_s": 3, "models": {"m": bigger}}
    view.ingest(f"{ROOT}/s/c/capacity", orjson.dumps(report), 0.0)
    assert book.pick("m", 1, None) is None  # not walked again yet
    costly.wall_s += kept.KEEP_FACTOR * 0.010 + 0.001
    found = book.pick("m", 1, None)
    assert found is not None and found.node == "c"


def test_a_cheap_walk_is_not_kept() -> None:
    view, clock = Walks(ROOT), Clock()
    book = CreditBook(view, clock=clock, sample_nodes=0)
    node = add(view, "a", spare=10.0)
    book.take(node, "m", 1)
    assert book.pick("m", 1, None) is None
    bigger = {"spare_ips_at_slo": 100.0, "accepts_pool_jobs": True, "slo_p99_ms": 100.0}
    report = {"session": 1, "seq": 3, "valid_for_s": 3, "models": {"m": bigger}}
    view.ingest(f"{ROOT}/s/a/capacity", orjson.dumps(report), 0.0)
    assert book.pick("m", 1, None) is node  # a walk of one node is CPU microseconds: walked afresh
