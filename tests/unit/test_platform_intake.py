"""What the gateway's view takes of hostile pool messages: topic levels, identities, sizes, only the
fields it reads (nothing nested, nothing big), known states, and a bounded number of nodes."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from appliance.platform import intake
from appliance.platform.view import PoolView

ROOT = "ecp/v1"
SHA = "f" * 64
SPEC = {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
DEEP = b"[" * 300 + b"]" * 300  # orjson reads 1024 levels but writes only 254


def message(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def deep(document: dict[str, Any]) -> bytes:
    """`document` with every "@deep" string replaced by JSON nested 300 deep (orjson would not write it)."""
    return orjson.dumps(document).replace(b'"@deep"', DEEP)


def report(seq: int = 2, **models: dict[str, Any]) -> dict[str, Any]:
    return {"session": 1, "seq": seq, "valid_for_s": 60, "models": models}


OFFER = {"max_ips_at_slo": 10.0, "spare_ips_at_slo": 5.0, "accepts_pool_jobs": True}


def online(view: PoolView, site: str, node: str, at_s: float = 0.0) -> None:
    base = f"{ROOT}/{site}/{node}"
    view.ingest(f"{base}/birth", message(session=1, seq=0, models={"m": {"sha256": SHA}}), at_s)
    view.ingest(f"{base}/state", message(session=1, seq=1, state="online"), at_s)
    view.ingest(f"{base}/capacity", orjson.dumps(report(m=OFFER)), at_s)


def test_reserved_and_unusable_topic_levels_are_never_nodes() -> None:
    """A node may write answers under <root>/_reply/#: what it publishes there is not a node of site
    _reply. Nor is a level the box would never publish (too long, control characters)."""
    view = PoolView(ROOT)
    online(view, "plant-7", "good")
    levels = [
        ("_reply", "fake-0"),
        ("_gateways", "g"),
        ("plant-7", "_hidden"),
        ("plant-7", "n" * (intake.MAX_LEVEL_CHARS + 1)),
        ("plant-7", "bell\x07"),
        ("plant-7", "\x1b[2J"),
        ("plant-7", "cash$"),
        ("", "nobody"),
    ]
    for site, node in levels:
        online(view, site, node)
    assert [node.name for node in view.nodes()] == ["plant-7/good"]
    assert view.rejected["topic"] == 3 * len(levels) and view.models() == ["m"]
    assert [node.name for node in view.offering("m")] == ["plant-7/good"]
    online(view, "plant-7", "n" * intake.MAX_LEVEL_CHARS)  # the longest level taken
    online(view, "Werk Süd", "box-12")  # printable text, as the box allows it
    assert len(view.nodes()) == 3


def test_a_payload_that_names_another_node_than_its_topic_is_not_that_nodes() -> None:
    view = PoolView(ROOT)
    online(view, "s", "good")
    forged = message(session=2**64 - 1, state="offline", node="someone-else")
    assert view.ingest(f"{ROOT}/s/good/state", forged, 1.0) is None
    other_site = message(session=9, seq=0, node="good", site="elsewhere", models={})
    assert view.ingest(f"{ROOT}/s/good/birth", other_site, 1.0) is None
    node = view.get("s", "good")
    assert node is not None and (node.state, node.session) == ("online", 1)
    assert view.rejected == {"state": 1, "birth": 1}
    own = message(session=2, seq=0, node="good", site="s", state="draining", reason="update")
    assert view.ingest(f"{ROOT}/s/good/state", own, 1.0) is node and node.state == "draining"


def test_a_birth_and_a_report_keep_only_the_checked_fields_the_gateway_reads() -> None:
    """Nothing nested, nothing unread: whatever a node adds, what is kept is small and serialisable."""
    view = PoolView(ROOT)
    model = {
        "sha256": SHA,
        "version": 3,
        "precision": "fp32",
        "provider": "cpu",
        "slo_p99_ms": 50,
        "max_batch_size": 8,
        "inputs": [{**SPEC, "doc": "@deep"}],
        "outputs": [{**SPEC, "name": "y", "extra": {"a": ["@deep"]}}],
        "profile": {"intercept_ms": "@deep"},
        "state": "READY",
    }
    birth = {"session": 1, "seq": 0, "pad": "x" * 100_000, "hardware": "@deep", "models": {"m": model}}
    node = view.ingest(f"{ROOT}/s/a/birth", deep({**birth, "public_key": "ed25519:" + "A" * 43 + "="}), 0.0)
    assert node is not None and node.birth == {
        "models": {
            "m": {
                "sha256": SHA,
                "version": "3",
                "precision": "fp32",
                "provider": "cpu",
                "slo_p99_ms": 50,
                "max_batch_size": 8,
                "inputs": [SPEC],
                "outputs": [{**SPEC, "name": "y"}],
            }
        },
        "public_key": "ed25519:" + "A" * 43 + "=",
    }
    assert node.signature("m") == orjson.dumps([[SPEC], [{**SPEC, "name": "y"}]], option=orjson.OPT_SORT_KEYS)
    offer = {**OFFER, "precision": "@deep", "queue_depth": "@deep"}
    view.ingest(f"{ROOT}/s/a/capacity", deep(report(2, m=offer)), 0.0)
    assert node.capacity == {"models": {}, "valid_for_s": 60} and view.rejected == {"capacity": 1}
    view.ingest(f"{ROOT}/s/a/capacity", deep(report(3, m={**OFFER, "queue_depth": "@deep"})), 0.0)
    assert node.capacity == {"models": {"m": OFFER}, "valid_for_s": 60}  # what it does not read: dropped
    assert len(orjson.dumps([node.birth, node.capacity])) < 1000


def test_what_fails_its_check_is_dropped_and_counted() -> None:
    view = PoolView(ROOT)
    tensors = [SPEC] * (intake.MAX_TENSORS + 1)
    broken = {
        "long-version": {"sha256": SHA, "version": "v" * 65},
        "control": {"precision": "fp32\x1b[31m"},
        "provider": {"provider": {"name": "cpu"}},
        "many": {"inputs": tensors},
        "rank": {"inputs": [{**SPEC, "shape": [1] * (intake.MAX_RANK + 1)}]},
        "name": {"outputs": [{**SPEC, "name": "y" * 256}]},
        "../etc": {"sha256": SHA},
        "a b": {"sha256": SHA},
        "x" * 129: {"sha256": SHA},
        "batch": {"max_batch_size": -1},
        "batch-text": {"max_batch_size": "8"},
        "batch-bool": {"max_batch_size": True},
    }
    good = {"sha256": SHA, "inputs": [{**SPEC, "shape": [1] * intake.MAX_RANK}]}
    birth = message(session=1, seq=0, models={"m": good, **broken}, public_key=["not", "text"])
    node = view.ingest(f"{ROOT}/s/a/birth", birth, 0.0)
    assert node is not None and node.birth == {"models": {"m": good}}  # and no public_key
    assert view.rejected == {"birth": 1}


def test_a_node_offers_at_most_max_models_models() -> None:
    view = PoolView(ROOT)
    models = {f"m{index:04d}": {"sha256": SHA} for index in range(intake.MAX_MODELS + 50)}
    node = view.ingest(f"{ROOT}/s/a/birth", message(session=1, seq=0, models=models), 0.0)
    assert node is not None and list(node.birth["models"]) == list(models)[: intake.MAX_MODELS]  # type: ignore[index]
    offers = {name: OFFER for name in models}
    view.ingest(f"{ROOT}/s/a/capacity", orjson.dumps(report(**offers)), 0.0)
    assert len(view.models()) == intake.MAX_MODELS and view.rejected == {"birth": 1, "capacity": 1}


def test_a_message_larger_than_its_kind_allows_is_not_read() -> None:
    view = PoolView(ROOT)
    online(view, "s", "a")
    for kind, limit in (("birth", 1024 * 1024), ("capacity", 512 * 1024), ("state", 16 * 1024)):
        assert intake.MAX_BYTES[kind] == limit
        fields = {
            "birth": {"models": {}},
            "capacity": {"valid_for_s": 60, "models": {}},
            "state": {"state": "online"},
        }[kind]
        document = {"session": 1, "seq": 9, **fields}
        padding = limit - len(orjson.dumps({**document, "pad": ""})) + 1
        big = orjson.dumps({**document, "pad": "x" * padding})
        assert len(big) == limit + 1
        assert view.ingest(f"{ROOT}/s/a/{kind}", big, 0.0) is None
        assert view.ingest(f"{ROOT}/s/a/{kind}", orjson.dumps({**document, "pad": "x" * (padding - 1)}), 0.0)
    assert view.rejected == {"birth": 1, "capacity": 1, "state": 1}


def test_a_state_is_one_the_box_publishes_and_its_reason_short_and_printable() -> None:
    view = PoolView(ROOT)
    online(view, "s", "n")
    for value in ("S" * 10_000, "ONLINE", "", 7, None):
        assert view.ingest(f"{ROOT}/s/n/state", message(session=1, seq=5, state=value), 0.0) is None
    assert view.rejected == {"state": 5}
    reason = "\x1b[2J\x1b]0;pwned\x07 ok" + "r" * 1000
    node = view.ingest(f"{ROOT}/s/n/state", message(session=1, seq=5, state="offline", reason=reason), 0.0)
    assert node is not None and node.state == "offline"
    assert node.reason == ("[2J]0;pwned ok" + "r" * 1000)[: intake.MAX_REASON_CHARS - 3]
    assert len(node.reason) <= intake.MAX_REASON_CHARS and node.reason.isprintable()
    evil = {"\x1b[31mred\x1b[0m": {"max_ips_at_slo": 1}}
    view.ingest(f"{ROOT}/s/n/capacity", message(session=1, seq=9, valid_for_s=9, models=evil), 0.0)
    assert "\x1b" not in view.table(0.0) and "\x07" not in view.table(0.0)


def test_the_view_holds_at_most_max_nodes_and_forgets_the_silent() -> None:
    view = PoolView(ROOT, max_nodes=3, forget_after_s=100.0)
    for name in "abcde":
        online(view, "s", name, at_s=0.0)
    assert [node.node for node in view.nodes()] == ["a", "b", "c"]
    assert view.rejected == {"node_limit": 6}  # d and e: birth, state, report each
    assert {node.node for node in view.offering("m")} == {"a", "b", "c"}
    # a known node is still heard while the view is full
    assert view.ingest(f"{ROOT}/s/a/state", message(session=1, seq=5, state="draining"), 50.0)
    # at 120 s b and c have been silent for more than 100 s: forgotten (not a, heard at 50 s)
    online(view, "s", "d", at_s=120.0)
    assert [node.node for node in view.nodes()] == ["a", "d"] and view.forgotten == 2
    assert {node.node for node in view.offering("m")} == {"a", "d"}
    view.forget(149.0)
    assert [node.node for node in view.nodes()] == ["a", "d"]
    view.forget(151.0)  # without a message: what the gateway's link does once a second
    assert [node.node for node in view.nodes()] == ["d"] and view.forgotten == 3
    online(view, "s", "b", at_s=160.0)  # a forgotten node heard again is a node again
    assert [node.node for node in view.nodes()] == ["b", "d"]
    assert {node.node for node in view.offering("m")} == {"b", "d"} and view.models() == ["m"]


def test_made_up_names_by_the_thousand_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    view = PoolView(ROOT, max_nodes=1)
    online(view, "s", "a")
    with caplog.at_level(logging.DEBUG, logger="appliance.platform.view"):
        for index in range(1000):
            view.ingest(f"{ROOT}/_reply/fake-{index}/birth", message(session=1, seq=0, models={}), 0.0)
            view.ingest(f"{ROOT}/s/n{index}/birth", message(session=1, seq=0, models={}), 0.0)
    assert view.rejected == {"topic": 1000, "node_limit": 1000}
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2 and "reserved" in warnings[0] and "max_nodes" in warnings[1], warnings
