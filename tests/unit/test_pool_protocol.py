"""Pool protocol pieces that need no broker: topics, schemas, message builders, reply routes, statuses."""

from __future__ import annotations

import jsonschema
import orjson
import pytest

from appliance.dataplane import outcomes
from appliance.pool import messages, schemas
from appliance.pool.jobs import status_of
from appliance.pool.routes import NoReply, ReplyRules
from appliance.pool.topics import NodeTopics, node_filter, parse_node_topic, shared
from appliance.pool.wire import Inbound
from appliance.server.errors import status_of as http_status_of


def valid(schema: str, document: object) -> None:
    jsonschema.validate(document, schemas.load(schema), cls=jsonschema.Draft202012Validator)


def test_node_topics() -> None:
    topics = NodeTopics("ecp/v1", "plant-7", "box-12")
    assert topics.birth == "ecp/v1/plant-7/box-12/birth"
    assert topics.commands == "ecp/v1/plant-7/box-12/cmd/#"
    assert topics.command("infer", "resnet") == "ecp/v1/plant-7/box-12/cmd/infer/resnet"
    assert topics.parse_command(topics.command("infer", "resnet")) == ("infer", "resnet")
    assert topics.parse_command(topics.command("rebirth")) == ("rebirth", None)
    assert topics.parse_command("ecp/v1/plant-7/box-13/cmd/drain") is None


def test_platform_topics() -> None:
    assert node_filter("ecp/v1", "capacity") == "ecp/v1/+/+/capacity"
    assert shared("ingest", "ecp/v1/+/+/capacity") == "$share/ingest/ecp/v1/+/+/capacity"
    assert shared(None, "a/b") == "a/b"
    origin = parse_node_topic("ecp/v1", "ecp/v1/plant-7/box-12/state")
    assert origin is not None and (origin.site, origin.node, origin.kind) == ("plant-7", "box-12", "state")
    for topic in ("ecp/v1/plant-7/box-12/cmd/drain", "ecp/v1/plant-7/_sync/x", "other/plant/box/state"):
        assert parse_node_topic("ecp/v1", topic) is None


@pytest.mark.parametrize("name", schemas.NAMES)
def test_schemas_are_valid_json_schema(name: str) -> None:
    jsonschema.Draft202012Validator.check_schema(schemas.load(name))


def test_unknown_schema_name() -> None:
    with pytest.raises(ValueError, match="no pool schema called 'nope'"):
        schemas.load("nope")


def test_state_and_event_builders_follow_their_schemas() -> None:
    online = messages.state(node="n", session=3, seq=1, value=messages.ONLINE)
    will = messages.state(node="n", session=3, seq=None, value=messages.OFFLINE, reason="lost", by_will=True)
    valid("state", online)
    valid("state", will)
    assert "seq" not in will and will["by_will"] is True
    with pytest.raises(jsonschema.ValidationError):
        valid("state", messages.state(node="n", session=3, seq=None, value=messages.ONLINE))  # seq or will
    event = messages.event(node="n", session=3, seq=4, kind="job_done", model="m", status=200, latency_ms=1.5)
    valid("evt", event)
    with pytest.raises(jsonschema.ValidationError):
        valid("evt", messages.event(node="n", session=3, seq=5, kind="job_done", model="m"))  # no status


def test_valid_for_is_three_intervals_in_whole_seconds() -> None:
    assert messages.valid_for_s(30) == 90
    assert messages.valid_for_s(0.5) == 2
    assert messages.valid_for_s(0.1) == 1


def test_spare_counts_only_models_that_take_jobs() -> None:
    report = {
        "models": {
            "a": {"spare_ips_at_slo": 10.0, "accepts_pool_jobs": True},
            "b": {"spare_ips_at_slo": 5.0, "accepts_pool_jobs": False},
            "broken": {"state": "UNAVAILABLE", "reason": "x"},
        }
    }
    assert messages.spare_by_model(report) == {"a": 10.0, "b": 0.0}


RULES = ReplyRules("ecp/v1")


def test_reply_route_prefers_mqtt5_properties() -> None:
    message = Inbound("t", b"{}", response_topic="r/1", correlation=b"c")
    route = RULES.route(message)
    assert (route.topic, route.correlation, route.is_in_body) == ("r/1", b"c", False)


def test_reply_route_from_the_body_on_mqtt311() -> None:
    route = RULES.route(Inbound("t", orjson.dumps({"inputs": [], "reply_to": "r/2", "corr_id": 7})))
    assert (route.topic, route.corr_id, route.is_in_body) == ("r/2", 7, True)


@pytest.mark.parametrize("payload", [b"", b"\x00binary", b'{"inputs": []}', b"[1]"])
def test_a_job_without_a_reply_topic(payload: bytes) -> None:
    with pytest.raises(NoReply, match="cannot be answered"):
        RULES.route(Inbound("t", payload))


def test_job_statuses_mirror_http() -> None:
    """Every error class a job can meet maps to the status the HTTP API gives it: one table."""
    for cls in outcomes.TABLE:
        assert status_of(cls("x")) == http_status_of(cls("x")), cls
    assert status_of(NoReply("x")) == 400
