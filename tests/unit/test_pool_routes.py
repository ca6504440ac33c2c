"""Reply topics a node may answer on, and who a sender is: the rules `routes` applies to every reply."""

from __future__ import annotations

import re

import orjson
import pytest

from appliance.pool.routes import (
    MAX_TOPIC_BYTES,
    PARSE_LIMIT_BYTES,
    BadReplyRoute,
    NoReply,
    Reply,
    ReplyRules,
    ReplyTopicForbidden,
    Unanswerable,
    body_route,
)
from appliance.pool.wire import Inbound

RULES = ReplyRules("ecp/v1")


@pytest.mark.parametrize(
    "topic",
    [
        "ecp/v1/_reply/platform-1",
        "ecp/v1/plant-7/platform/1234",
        "ecp/v1/plant-7/box-12/evt/x",  # below a node's topic, not the topic itself
        "replies/ünïcode/✓",
        "ecp/v2/plant-7/box-12/cmd/drain",  # another topic root is the broker ACL's business
        "a" * MAX_TOPIC_BYTES,
    ],
)
def test_topics_a_node_may_answer_on(topic: str) -> None:
    assert RULES.check(topic) == topic


@pytest.mark.parametrize(
    ("topic", "error", "text"),
    [
        ("ecp/v1/plant-7/box-12/cmd/drain", ReplyTopicForbidden, "command tree"),
        ("ecp/v1/plant-7/other/cmd/infer/m", ReplyTopicForbidden, "command tree"),
        ("ecp/v1/plant-7/other/cmd", ReplyTopicForbidden, "command tree"),
        ("ecp/v1//box/cmd/x", ReplyTopicForbidden, "command tree"),
        ("ecp/v1/plant-7/box-12/state", ReplyTopicForbidden, "own state topic"),
        ("$SYS/broker/x", ReplyTopicForbidden, "broker topic"),
        ("a/\x00b", BadReplyRoute, "U+0000 at 2"),
        ("a/\x1fb", BadReplyRoute, "U+001F"),
        ("a/\x7f", BadReplyRoute, "U+007F"),
        ("a/\x85", BadReplyRoute, "U+0085"),
        ("a/\ufdd0", BadReplyRoute, "U+FDD0"),
        ("a/\U0001fffe", BadReplyRoute, "U+1FFFE"),
        ("a/\ud800", BadReplyRoute, "not valid UTF-8"),
        ("a/+/b", BadReplyRoute, "wildcard"),
        ("a/#", BadReplyRoute, "wildcard"),
        ("", BadReplyRoute, "non-empty string"),
        (7, BadReplyRoute, "non-empty string"),
        (None, BadReplyRoute, "non-empty string"),
        ("é" * MAX_TOPIC_BYTES, BadReplyRoute, f"{2 * MAX_TOPIC_BYTES} bytes is longer"),
    ],
)
def test_topics_a_node_never_answers_on(topic: object, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=re.escape(text)) as caught:
        RULES.check(topic)
    assert isinstance(caught.value, Unanswerable)
    assert len(str(caught.value)) < 300  # a hostile topic is not repeated whole


def test_a_configured_prefix_is_required() -> None:
    rules = ReplyRules("ecp/v1", "ecp/v1/_reply/")
    assert rules.check("ecp/v1/_reply/platform-1/x") == "ecp/v1/_reply/platform-1/x"
    with pytest.raises(ReplyTopicForbidden, match=r"pool\.reply_topic_prefix"):
        rules.check("ecp/v1/plant-7/platform/1234")
    with pytest.raises(ReplyTopicForbidden, match="command tree"):  # the prefix does not excuse a command
        ReplyRules("ecp/v1", "ecp/v1/").check("ecp/v1/s/n/cmd/drain")


def test_routes_check_both_kinds_of_reply_topic() -> None:
    with pytest.raises(ReplyTopicForbidden):
        RULES.route(Inbound("t", b"{}", response_topic="ecp/v1/s/n/cmd/drain"))
    with pytest.raises(BadReplyRoute):
        RULES.route(Inbound("t", b"{}", response_topic=""))  # an empty ResponseTopic is not "none"
    with pytest.raises(BadReplyRoute, match="U\\+0000"):
        RULES.route(Inbound("t", orjson.dumps({"reply_to": "r/\x00", "corr_id": 1})))
    with pytest.raises(ReplyTopicForbidden):
        RULES.route(Inbound("t", orjson.dumps({"reply_to": "ecp/v1/s/n/cmd/drain"})))


@pytest.mark.parametrize("corr_id", [{"a": 1}, [1], 1.5, True, "x" * 257])
def test_a_corr_id_that_is_no_id(corr_id: object) -> None:
    with pytest.raises(BadReplyRoute, match="corr_id"):
        RULES.route(Inbound("t", orjson.dumps({"reply_to": "r/1", "corr_id": corr_id})))


def test_no_reply_topic_at_all_is_its_own_error() -> None:
    with pytest.raises(NoReply) as caught:
        RULES.route(Inbound("t", b'{"inputs": []}'))
    assert type(caught.value) is NoReply  # commands without a reply topic still run; bad ones do not


def test_a_large_body_is_scanned_not_parsed() -> None:
    padding = "x" * PARSE_LIMIT_BYTES
    payload = orjson.dumps({"inputs": [], "padding": padding, "reply_to": "r/\u00e9\\n", "corr_id": "c-1"})
    assert len(payload) > PARSE_LIMIT_BYTES
    assert body_route(payload) == ("r/\u00e9\\n", "c-1")
    assert body_route(payload.replace(b'"corr_id"', b'"other"')) == ("r/\u00e9\\n", None)
    assert body_route(payload.replace(b'"reply_to"', b'"other"')) is None
    escaped = orjson.dumps({"padding": padding + '"reply_to": "fake"', "reply_to": "r/real"})
    assert body_route(escaped) == ("r/real", None)  # a key inside a string does not count
    with pytest.raises(BadReplyRoute, match="U\\+0000"):  # scanned or parsed, the same check
        RULES.route(Inbound("t", orjson.dumps({"padding": padding, "reply_to": "r/\x00"})))


def test_the_sender_is_the_reply_topic_without_its_last_level() -> None:
    assert Reply("ecp/v1/_reply/platform-1/job-9").sender == "ecp/v1/_reply/platform-1"
    assert Reply("single").sender == ""
