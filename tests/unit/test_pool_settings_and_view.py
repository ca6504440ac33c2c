"""Pool settings and broker URLs, TLS checks at start-up, and the platform's view of the pool."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from paho.mqtt import _packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties
from pydantic import ValidationError

from appliance.errors import ConfigError
from appliance.platform import intake
from appliance.platform.view import PoolView
from appliance.pool.wire import Broker, FastProperties, Outbound, Security, publish_properties
from appliance.settings import PoolSettings, Settings


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.local", Broker("broker.local", 1883, False)),
        ("mqtts://broker.local", Broker("broker.local", 8883, True)),
        ("mqtt://10.0.0.5:11883", Broker("10.0.0.5", 11883, False)),
        ("mqtts://[::1]:8884", Broker("::1", 8884, True)),
    ],
)
def test_broker_urls(url: str, expected: Broker) -> None:
    assert PoolSettings(broker=url).broker == url
    assert Broker.parse(url) == expected


@pytest.mark.parametrize("url", ["http://h:1883", "mqtt://", "mqtt://h:port", "mqtt://h:1883/x", "h:1883"])
def test_bad_broker_urls_name_the_value(url: str) -> None:
    with pytest.raises(ValidationError, match="expected mqtt://host"):
        PoolSettings(broker=url)
    with pytest.raises(ConfigError, match="expected mqtt://host"):
        Broker.parse(url)


def test_blank_broker_means_no_pool_link() -> None:
    assert PoolSettings(broker="").broker is None
    assert Settings.load(None, environ={"APPLIANCE_POOL__BROKER": ""}).pool.broker is None


@pytest.mark.parametrize(
    ("field", "value"), [("site", "a/b"), ("node_id", "n+1"), ("site", ""), ("node_id", "#")]
)
def test_site_and_node_are_single_topic_levels(field: str, value: str) -> None:
    with pytest.raises(ValidationError, match="one non-empty MQTT topic level"):
        PoolSettings(**{field: value})


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("site", "_reply", "must not start with _"),
        ("node_id", "_gateways", "must not start with _"),
        ("node_id", "n" * 129, "at most 128 printable characters"),
        ("site", "plant\x1b[2J", "at most 128 printable characters"),
    ],
)
def test_site_and_node_are_ids_a_gateway_takes(field: str, value: str, says: str) -> None:
    """What the gateway ignores as no node (platform/intake.py) a box refuses at start, rather than
    serving while no gateway ever sees it."""
    with pytest.raises(ValidationError, match=says):
        PoolSettings(**{field: value})
    assert intake.topic_problem(value, "n") if field == "site" else intake.topic_problem("s", value)
    assert PoolSettings(**{field: "n" * 128}).model_dump()[field] == "n" * 128


def test_topic_root_is_trimmed_and_checked() -> None:
    assert PoolSettings(topic_root="/ecp/v1/").topic_root == "ecp/v1"
    with pytest.raises(ValidationError, match="topic levels"):
        PoolSettings(topic_root="ecp//v1")


def test_tls_files_are_checked_at_start_up(tmp_path: Path) -> None:
    tls = Broker.parse("mqtts://h")
    with pytest.raises(ConfigError, match=r"pool.ca_file .*missing.pem"):
        Security.build(tls, None, None, ca_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="not mqtts://"):
        Security.build(Broker.parse("mqtt://h"), None, None, ca_file=tmp_path / "ca.pem")
    assert "secret" not in repr(Security.build(Broker.parse("mqtt://h"), "u", "secret"))


def test_publish_properties() -> None:
    properties = publish_properties(
        Outbound("t", b"", expiry_s=2.4, correlation=b"c", response_topic="r", user={"status": "200"})
    )
    assert properties.MessageExpiryInterval == 2
    assert (properties.CorrelationData, properties.ResponseTopic) == (b"c", "r")
    assert properties.UserProperty == [("status", "200")]


@pytest.mark.parametrize(
    "message",
    [
        Outbound("t", b""),
        Outbound("t", b"", expiry_s=0.2, correlation=b"job/0", response_topic="ecp/v1/_reply/gw/acme/1"),
        Outbound("t", b"", content_type="application/json", user={"status": "200", "a": "b"}),
        Outbound("t", b"", expiry_s=600, correlation=b"\x00\xff", response_topic="r", user={"x": ""}),
    ],
)
def test_publish_properties_pack_as_pahos_checked_ones(message: Outbound) -> None:
    checked = Properties(PacketTypes.PUBLISH)  # paho's own way: every assignment checked
    if message.expiry_s is not None:
        checked.MessageExpiryInterval = max(1, int(message.expiry_s))
    if message.correlation is not None:
        checked.CorrelationData = message.correlation
    if message.response_topic is not None:
        checked.ResponseTopic = message.response_topic
    if message.content_type is not None:
        checked.ContentType = message.content_type
    for pair in message.user.items():
        checked.UserProperty = pair
    fast = publish_properties(message)
    assert fast.pack() == checked.pack()
    assert publish_properties(Outbound("t", b"")).pack() == b"\x00"  # what it copies stayed empty


PUBLISH_PROPERTIES = [
    ("PayloadFormatIndicator", 1), ("MessageExpiryInterval", 7), ("ContentType", "application/json"),
    ("ResponseTopic", "ecp/v1/_reply/g/acme/1"), ("CorrelationData", b"job/0\xff"), ("TopicAlias", 3),
    ("SubscriptionIdentifier", 268435455), ("UserProperty", ("status", "200")),
    ("UserProperty", [("a", ""), ("status", "503")]), ("SubscriptionIdentifier", 5),
]  # fmt: skip


def test_fast_properties_pack_and_unpack_as_pahos() -> None:
    """FastProperties (what paho now decodes received PUBLISH properties with) against paho's own."""
    assert _packet.Properties is FastProperties  # installed by importing appliance.pool.wire
    pahos, fast = Properties(PacketTypes.PUBLISH), FastProperties(PacketTypes.PUBLISH)
    for name, value in PUBLISH_PROPERTIES:
        setattr(pahos, name, value)
        setattr(fast, name, value)
    assert fast.pack() == pahos.pack() and fast.json() == pahos.json()
    for kind in (Properties, FastProperties):  # each unpacks what the other packed, as paho does
        decoded, length = kind(PacketTypes.PUBLISH).unpack(pahos.pack())
        assert decoded.json() == pahos.json() and length == len(pahos.pack())
    fast.clear()
    assert fast.isEmpty() and fast.pack() == b"\x00" and FastProperties(PacketTypes.PUBLISH).pack() == b"\x00"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NoSuchProperty", 1),
        ("ReceiveMaximum", 10),  # a CONNECT/CONNACK property, not a PUBLISH one
        ("TopicAlias", 0),
        ("SubscriptionIdentifier", 0),
        ("PayloadFormatIndicator", 2),
    ],
)
def test_fast_properties_refuse_what_pahos_refuse(name: str, value: object) -> None:
    with pytest.raises(MQTTException) as pahos:
        setattr(Properties(PacketTypes.PUBLISH), name, value)
    with pytest.raises(MQTTException) as fast:
        setattr(FastProperties(PacketTypes.PUBLISH), name, value)
    assert str(fast.value) == str(pahos.value)


def test_a_property_twice_in_a_packet_is_refused_as_paho_refuses_it() -> None:
    twice = b"\x04\x02\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x02"  # MessageExpiryInterval twice
    packed = bytes([len(twice) - 1]) + twice[1:]
    for kind in (Properties, FastProperties):
        with pytest.raises(MQTTException, match="must not exist more than once"):
            kind(PacketTypes.PUBLISH).unpack(packed)


def capacity(session: int, seq: int, spare: float, *, accepts: bool = True, valid_for_s: int = 3) -> bytes:
    model = {"max_ips_at_slo": 100.0, "spare_ips_at_slo": spare, "accepts_pool_jobs": accepts}
    return orjson.dumps({"session": session, "seq": seq, "valid_for_s": valid_for_s, "models": {"m": model}})


def state(session: int, value: str, reason: str = "") -> bytes:
    return orjson.dumps({"session": session, "seq": 1, "state": value, "reason": reason})


def feed(view: PoolView, node: str, *messages: tuple[str, bytes, float]) -> None:
    for kind, payload, received_s in messages:
        view.ingest(f"ecp/v1/s/{node}/{kind}", payload, received_s)


def test_best_node_is_online_fresh_and_has_the_most_spare() -> None:
    view = PoolView("ecp/v1")
    feed(view, "a", ("state", state(1, "online"), 0.0), ("capacity", capacity(1, 2, 50.0), 10.0))
    feed(view, "b", ("state", state(4, "online"), 0.0), ("capacity", capacity(4, 2, 80.0), 10.0))
    feed(view, "c", ("state", state(2, "draining", "ota"), 0.0), ("capacity", capacity(2, 2, 500.0), 10.0))
    feed(
        view,
        "d",
        ("state", state(1, "online"), 0.0),
        ("capacity", capacity(1, 2, 900.0, accepts=False), 10.0),
    )
    best = view.best("m", now_s=11.0)
    assert best is not None and best.name == "s/b"
    assert view.best("m", now_s=13.5) is None  # every report is older than its valid_for_s by receive time
    assert view.best("other", now_s=11.0) is None
    table = view.table(11.0)
    assert "s/c" in table and "draining (ota)" in table and "m 900/100 (no jobs)" in table


def test_messages_of_an_older_session_are_ignored() -> None:
    view = PoolView("ecp/v1")
    feed(view, "a", ("state", state(5, "online"), 0.0), ("state", state(4, "offline"), 1.0))
    (node,) = view.nodes()
    assert (node.state, node.session) == ("online", 5)
    feed(view, "a", ("state", b"", 2.0), ("state", b"not json", 2.0), ("cmd", state(9, "x"), 2.0))
    assert view.nodes()[0].session == 5


def test_stale_report_is_marked_in_the_table() -> None:
    view = PoolView("ecp/v1")
    feed(
        view,
        "a",
        ("state", state(1, "offline", "connection lost"), 0.0),
        ("capacity", capacity(1, 2, 5.0), 0.0),
    )
    assert "stale: m 5/100" in view.table(100.0) and "offline (connection lost)" in view.table(100.0)
