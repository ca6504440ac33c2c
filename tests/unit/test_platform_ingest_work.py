"""The work one pool message or one buyer's name costs the gateway does not grow with the fleet: counted
in Python calls (a profile hook), never timed."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import orjson

from appliance.platform.catalogue import MAX_KEPT, Catalogue
from appliance.platform.view import PoolView

ROOT = "ecp/v1"
NODES, MODELS = 20, 256  # 5,120 model names in the fleet: more than MAX_KEPT
OFFER = {"max_ips_at_slo": 10.0, "spare_ips_at_slo": 5.0, "accepts_pool_jobs": True}


def calls(work: Callable[[], Any]) -> int:
    """How many Python functions `work` calls, its own callees included."""
    count = 0

    def profile(_frame: Any, event: str, _arg: Any) -> None:
        nonlocal count
        count += event == "call"

    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
    return count


def fleet() -> PoolView:
    """NODES nodes, each offering MODELS models of its own."""
    view = PoolView(ROOT)
    for index in range(NODES):
        base = f"{ROOT}/s/n{index}"
        names = [f"n{index}-m{model}" for model in range(MODELS)]
        birth = {"session": 1, "seq": 0, "models": {name: {"sha256": "f" * 64} for name in names}}
        view.ingest(f"{base}/birth", orjson.dumps(birth), 0.0)
        view.ingest(f"{base}/state", orjson.dumps({"session": 1, "seq": 1, "state": "online"}), 0.0)
        report = {"session": 1, "seq": 2, "valid_for_s": 60, "models": dict.fromkeys(names, OFFER)}
        view.ingest(f"{base}/capacity", orjson.dumps(report), 0.0)
    assert len(view.models()) == NODES * MODELS
    return view


def test_a_nodes_message_costs_what_its_own_models_cost_not_the_fleets() -> None:
    view = fleet()
    base = f"{ROOT}/s/honest"
    view.ingest(f"{base}/state", orjson.dumps({"session": 1, "seq": 0, "state": "online"}), 1.0)
    report = {"session": 1, "seq": 1, "valid_for_s": 60, "models": {"resnet": OFFER}}
    first = calls(lambda: view.ingest(f"{base}/capacity", orjson.dumps(report), 1.0))
    state = orjson.dumps({"session": 1, "seq": 2, "state": "online"})
    again = calls(lambda: view.ingest(f"{base}/state", state, 1.0))
    report |= {"seq": 3, "models": {"resnet": OFFER, "yolo": OFFER}}
    more = calls(lambda: view.ingest(f"{base}/capacity", orjson.dumps(report), 1.0))
    # Tens of calls each; walking the index (5,120 names) per message was thousands.
    assert max(first, again, more) < 200, (first, again, more)
    assert [node.node for node in view.offering("yolo")] == ["honest"] and len(view.models()) == 5122
    # A node's own models still cost what they are: its new report re-indexes them, no other's.
    report = {"session": 1, "seq": 3, "valid_for_s": 60, "models": {}}
    view.ingest(f"{ROOT}/s/n0/capacity", orjson.dumps(report), 1.0)
    assert len(view.models()) == 5122 - MODELS and view.offering("n0-m0") == []


class Tick(float):
    """A time whose comparisons are Python calls, so that a profile counts each one made."""

    def __add__(self, other: Any) -> Tick:
        return Tick(float(self) + float(other))

    def __lt__(self, other: Any) -> bool:
        return float(self) < float(other)

    def __le__(self, other: Any) -> bool:
        return float(self) <= float(other)

    def __gt__(self, other: Any) -> bool:
        return float(self) > float(other)

    def __ge__(self, other: Any) -> bool:
        return float(self) >= float(other)


def test_a_new_name_costs_the_catalogue_the_same_however_many_votes_it_keeps() -> None:
    """With no catalogue file every name asked for is counted and kept (at most MAX_KEPT): the next one
    past a full table must not scan the table."""
    view, now = fleet(), [Tick(10.0)]
    catalogue = Catalogue(None, clock=lambda: now[0])
    names = view.models()
    for name in names[:MAX_KEPT]:
        assert catalogue.files(name, view) == frozenset(("f" * 64,))
    costs = [calls(lambda name=name: catalogue.files(name, view)) for name in names[MAX_KEPT : MAX_KEPT + 8]]
    now[0] = Tick(20.0)  # every vote kept has expired
    costs += [calls(lambda name=name: catalogue.files(name, view)) for name in names[-8:]]
    assert max(costs) < 100, costs  # a scan compared each of the 4,096 kept votes' times
    assert len(catalogue._chosen) == MAX_KEPT
    assert catalogue.files(names[0], view) == frozenset(("f" * 64,))  # pushed out: counted again
