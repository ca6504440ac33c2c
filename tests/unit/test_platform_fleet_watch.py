"""What operators are shown of a hostile pool: a fleet view one node cannot break, tables and JSON lines
with no terminal control sequences and no reserved topics; and the settings that bound the view."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from appliance.errors import ConfigError
from appliance.platform import fleet, gateway, view
from appliance.platform.credit import CreditBook
from appliance.platform.settings import GatewaySettings, PlatformSettings
from appliance.platform.view import PoolView
from appliance.platform.watch import _json_line, gateway_table
from appliance.pool.wire import Inbound

ROOT = "ecp/v1"
OFFER = {"max_ips_at_slo": 10.0, "spare_ips_at_slo": 5.0, "accepts_pool_jobs": True}


def online(pool: PoolView, name: str) -> None:
    base, now_s = f"{ROOT}/s/{name}", time.monotonic()  # the fleet view's clock
    models = {"m": {"sha256": "f" * 64, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}}
    pool.ingest(f"{base}/birth", orjson.dumps({"session": 1, "seq": 0, "models": models}), now_s)
    pool.ingest(f"{base}/state", orjson.dumps({"session": 1, "seq": 1, "state": "online"}), now_s)
    report = {"session": 1, "seq": 2, "valid_for_s": 60, "models": {"m": OFFER}}
    pool.ingest(f"{base}/capacity", orjson.dumps(report), now_s)


def nested(levels: int) -> list[Any]:
    found: list[Any] = []
    for _ in range(levels):
        found = [found]
    return found


def test_one_node_whose_part_cannot_be_written_does_not_hide_the_others() -> None:
    pool = PoolView(ROOT)
    for name in ("a", "b", "c"):
        online(pool, name)
    broken = pool.get("s", "b")
    assert broken is not None and broken.capacity is not None
    broken.capacity["models"]["m"]["precision"] = nested(300)  # as if intake had let it through
    connected = threading.Event()
    connected.set()
    place = SimpleNamespace(
        view=pool,
        credit=CreditBook(pool, clock=lambda: 0.0),
        presence=SimpleNamespace(live=lambda: ["gw"], share=lambda: 1.0),
        settings=SimpleNamespace(gateway_id="gw"),
        link=SimpleNamespace(connected=connected),
    )
    document = orjson.loads(orjson.dumps(fleet.nodes(place)))  # type: ignore[arg-type]
    shown = {node["node"]: node for node in document["nodes"]}
    assert [node["node"] for node in document["nodes"]] == ["a", "b", "c"]
    for name in ("a", "c"):
        assert shown[name]["models"]["m"]["spare_ips_at_slo"] == 5.0 and shown[name]["state"] == "online"
    assert shown["b"]["models"] == {} and shown["b"]["reason"].startswith("cannot be shown")
    assert "cannot be shown" in gateway_table(document)


def test_watch_streams_no_reserved_topic_and_no_document_it_cannot_write() -> None:
    assert _json_line(ROOT, Inbound(f"{ROOT}/_reply/fake/birth", b'{"session": 1}')) is None
    assert _json_line(ROOT, Inbound(f"{ROOT}/s/_x/state", b'{"session": 1}')) is None
    deep = Inbound(f"{ROOT}/s/a/birth", b'{"session": 1, "x": ' + b"[" * 300 + b"]" * 300 + b"}")
    record = orjson.loads(_json_line(ROOT, deep) or "")
    assert (record["node"], record["document"]) == ("a", None) and "cannot be written" in record["error"]
    big = Inbound(f"{ROOT}/s/a/state", b'{"pad": "' + b"x" * 20_000 + b'"}')
    record = orjson.loads(_json_line(ROOT, big) or "")
    assert record["document"] is None and "at most 16384" in record["error"]
    event = Inbound(f"{ROOT}/s/a/evt", b'{"session": 1, "event": "job"}')
    assert orjson.loads(_json_line(ROOT, event) or "")["document"] == {"session": 1, "event": "job"}


def test_the_gateways_table_escapes_control_characters() -> None:
    models = {"\x1b[31mred": {"spare_ips_at_slo": 1, "max_ips_at_slo": 2, "jobs_sent": 0}}
    models["\x1b[31mred"] |= {"jobs_answered": 0, "jobs_refused": 0}
    node = {
        "site": "s",
        "node": "n\x1b[2J",
        "state": "offline",
        "reason": "\x1b]0;pwned\x07",
        "quarantine": "\x9b31m",
        "session": 1,
        "report_age_s": None,
        "models": models,
    }
    text = gateway_table({"nodes": [node], "gateways": ["g\x1b"]})
    assert not any(char in text for char in "\x1b\x07\x9b") and "\\x1b]0;pwned\\x07" in text


def test_settings_bound_the_view_as_its_defaults_do() -> None:
    settings = GatewaySettings()
    assert (settings.max_nodes, settings.forget_after_s) == (view.MAX_NODES, view.FORGET_AFTER_S)
    assert settings.max_packet_bytes == gateway.MAX_BODY_BYTES  # the largest body, so its answer too
    environ = {"APPLIANCE_GATEWAY__MAX_NODES": "5", "APPLIANCE_GATEWAY__FORGET_AFTER_S": "600"}
    loaded = PlatformSettings.load(None, environ=environ).gateway
    assert (loaded.max_nodes, loaded.forget_after_s) == (5, 600.0)
    for key, value in (("site", "_reply"), ("forget_after_s", 1), ("max_packet_bytes", 2**28)):
        with pytest.raises(ConfigError, match=f"gateway.{key}"):
            PlatformSettings.load(None, environ={}, overrides={"gateway": {key: value}})
