"""The gateway's ingest: session and seq order, late Last Wills, offers that expire, silent nodes."""

from __future__ import annotations

from typing import Any

import orjson

from appliance.platform.view import SILENT, PoolView

ROOT = "ecp/v1"


def message(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def capacity(session: int, seq: int, spare: float = 50.0, valid_for_s: int = 3, **model: Any) -> bytes:
    entry = {
        "max_ips_at_slo": 100.0,
        "spare_ips_at_slo": spare,
        "accepts_pool_jobs": True,
        "slo_p99_ms": 50.0,
    }
    return message(session=session, seq=seq, valid_for_s=valid_for_s, models={"m": entry | model})


def online(view: PoolView, node: str = "a", session: int = 1, at_s: float = 0.0) -> None:
    view.ingest(
        f"{ROOT}/s/{node}/birth", message(session=session, seq=0, models={"m": {"sha256": "f" * 64}}), at_s
    )
    view.ingest(f"{ROOT}/s/{node}/state", message(session=session, seq=1, state="online"), at_s)
    view.ingest(f"{ROOT}/s/{node}/capacity", capacity(session, 2), at_s)


def test_a_late_last_will_of_an_old_session_never_marks_the_new_one_offline() -> None:
    view = PoolView(ROOT)
    online(view, session=7)
    will = message(session=6, state="offline", reason="connection lost", by_will=True)
    assert view.ingest(f"{ROOT}/s/a/state", will, 1.0) is None
    (node,) = view.nodes()
    assert (node.state, node.session) == ("online", 7) and node.offer("m", 1.0) is not None
    # The Will of the current session is believed.
    view.ingest(f"{ROOT}/s/a/state", message(session=7, state="offline", by_will=True), 1.5)
    assert node.state == "offline" and node.offer("m", 1.5) is None


def test_seq_only_rises_within_a_session_per_kind() -> None:
    view = PoolView(ROOT)
    online(view)
    assert view.ingest(f"{ROOT}/s/a/capacity", capacity(1, 2, spare=1.0), 0.5) is None  # a repeat
    assert view.ingest(f"{ROOT}/s/a/capacity", capacity(1, 1, spare=1.0), 0.5) is None  # older
    node = view.get("s", "a")
    assert node is not None and node.spare_ips("m", 0.5) == 50.0
    # A state with a higher seq than the report does not void the report (seq is counted per kind here).
    view.ingest(f"{ROOT}/s/a/state", message(session=1, seq=9, state="online"), 0.6)
    view.ingest(f"{ROOT}/s/a/capacity", capacity(1, 3, spare=20.0), 0.7)
    assert node.spare_ips("m", 0.7) == 20.0


def test_a_new_session_voids_the_old_offer() -> None:
    view = PoolView(ROOT)
    online(view, session=1)
    view.ingest(f"{ROOT}/s/a/state", message(session=2, seq=1, state="online"), 1.0)
    node = view.get("s", "a")
    assert node is not None and node.session == 2 and node.offer("m", 1.0) is None
    assert view.ingest(f"{ROOT}/s/a/capacity", capacity(1, 5), 1.0) is None  # the old run's retained report


def test_offers_expire_by_receive_time_and_a_silent_node_shows_offline() -> None:
    view = PoolView(ROOT)
    online(view, at_s=10.0)
    node = view.get("s", "a")
    assert node is not None
    offer = node.offer("m", 12.9)
    assert offer is not None and (offer.spare_ips, offer.slo_window_s, offer.sha256) == (50.0, 0.05, "f" * 64)
    assert node.offer("m", 13.1) is None  # valid_for_s = 3
    assert node.effective_state(13.1) == ("offline", SILENT)
    assert node.effective_state(12.0) == ("online", "")


def test_what_a_node_does_not_offer_is_never_offered() -> None:
    view = PoolView(ROOT)
    online(view)
    view.ingest(f"{ROOT}/s/b/state", message(session=1, seq=0, state="online"), 0.0)
    view.ingest(f"{ROOT}/s/b/capacity", capacity(1, 1, accepts_pool_jobs=False), 0.0)
    view.ingest(f"{ROOT}/s/c/state", message(session=1, seq=0, state="draining"), 0.0)
    view.ingest(f"{ROOT}/s/c/capacity", capacity(1, 1), 0.0)
    offered = {n.node for n in view.offering("m") if n.offer("m", 0.1) is not None}
    assert offered == {"a"}
    node = view.get("s", "a")
    assert node is not None
    node.quarantine = "canary failed"
    assert node.offer("m", 0.1) is None and "quarantined: canary failed" in view.table(0.1)


def test_garbage_is_ignored() -> None:
    view = PoolView(ROOT)
    for topic, payload in [
        (f"{ROOT}/s/a/state", b""),
        (f"{ROOT}/s/a/state", b"not json"),
        (f"{ROOT}/s/a/state", message(session="1", state="online")),
        (f"{ROOT}/s/a/state", message(session=True, state="online")),
        (f"{ROOT}/s/a/capacity", message(session=1, seq=1, models=[])),
        (f"{ROOT}/s/a/cmd", message(session=1)),
        (f"{ROOT}/_gateways/g", message(session=1)),
    ]:
        assert view.ingest(topic, payload, 0.0) is None
    assert view.ingested == 0


def test_draws_and_finds_only_nodes_that_still_report_the_model() -> None:
    view = PoolView(ROOT)
    for index in range(100):  # a large fleet: draws with replacement from a kept key list
        online(view, node=f"n{index:03d}")
    for index in range(0, 100, 2):  # half stop reporting `m`: their next report names another model
        other = {"max_ips_at_slo": 1.0, "spare_ips_at_slo": 1.0, "accepts_pool_jobs": True}
        report = message(session=1, seq=3, valid_for_s=3, models={"other": other})
        view.ingest(f"{ROOT}/s/n{index:03d}/capacity", report, 0.5)
    drawn = {n.node for _ in range(200) for n in view.sample("m", 4)}
    assert drawn <= {f"n{i:03d}" for i in range(1, 100, 2)} and len(drawn) > 25
    assert {n.node for n in view.sample("other", 4)} <= {f"n{i:03d}" for i in range(0, 100, 2)}
    assert len(view.offering("m")) == 50 and view.models() == ["m", "other"]
    found = view.find("m", lambda n: n.node > "n090")
    assert found is not None and found.node in {"n091", "n093", "n095", "n097", "n099"}
    assert view.find("m", lambda n: n.node == "n000") is None and view.find("x", lambda n: True) is None
    few = PoolView(ROOT)
    for name in ("a", "b", "c"):
        online(few, node=name)
    assert sorted(n.node for n in few.sample("m", 2)) in (["a", "b"], ["a", "c"], ["b", "c"])  # distinct
    assert sorted(n.node for n in few.sample("m", 8)) == ["a", "b", "c"]


def test_a_birth_the_gateway_cannot_use_is_ignored_whole_or_in_part_and_counted() -> None:
    view = PoolView(ROOT)
    good = {"sha256": "f" * 64, "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]}
    assert view.ingest(f"{ROOT}/s/a/birth", message(session=1, seq=0, models="zz"), 0.0) is None
    assert view.get("s", "a") is None and view.rejected["birth"] == 1
    broken = {
        "string": "zz",
        "list": [1],
        "digest": {"sha256": ["f" * 64]},
        "no datatype": {"sha256": "f" * 64, "inputs": [{"name": "x"}]},
        "unknown datatype": {"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}]},
        "datatype a list": {"inputs": [{"name": "x", "datatype": ["FP32"], "shape": [1]}]},
        "shape of text": {"inputs": [{"name": "x", "datatype": "FP32", "shape": "N,4"}]},
        "shape of floats": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1.5]}]},
        "shape of bools": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [True]}]},
        "inputs a table": {"inputs": {"x": "FP32"}},
        "outputs unnamed": {"outputs": [{"datatype": "FP32", "shape": [1]}]},
        "slo of text": {"slo_p99_ms": "fast"},
    }
    node = view.ingest(f"{ROOT}/s/a/birth", message(session=1, seq=1, models={"m": good, **broken}), 0.0)
    assert node is not None and list(node.birth["models"]) == ["m"]  # type: ignore[index]
    assert view.rejected["birth"] == 2 and view.ingested == 1
    assert node.inputs("m") == good["inputs"] and all(node.model_birth(name) == {} for name in broken)


def test_a_retained_report_holds_only_for_what_the_broker_says_is_left_of_it() -> None:
    view = PoolView(ROOT)
    online(view, at_s=10.0)
    node = view.get("s", "a")
    assert node is not None and node.offer("m", 12.9) is not None  # valid_for_s = 3 from receipt
    # A gateway that (re)connects gets the retained report with the remaining MessageExpiryInterval.
    view.ingest(f"{ROOT}/s/a/capacity", capacity(1, 3, valid_for_s=30), 20.0, expiry_s=2)
    assert node.offer("m", 21.9) is not None and node.offer("m", 22.1) is None
    assert node.effective_state(22.1) == ("offline", SILENT)
    # An expiry longer than valid_for_s (or none, from a 3.1.1 broker) leaves valid_for_s in charge.
    view.ingest(f"{ROOT}/s/a/capacity", capacity(1, 4, valid_for_s=3), 30.0, expiry_s=60)
    assert node.offer("m", 32.9) is not None and node.offer("m", 33.1) is None


def test_a_model_name_no_node_reports_any_more_is_forgotten() -> None:
    view = PoolView(ROOT)
    online(view)
    for seq in range(3, 1003):  # a node naming a new model in every report
        report = message(session=1, seq=seq, valid_for_s=3, models={f"m{seq}": {"spare_ips_at_slo": 1.0}})
        view.ingest(f"{ROOT}/s/a/capacity", report, 0.0)
    assert view.models() == ["m1002"] and list(view._offering._holders) == ["m1002"]
