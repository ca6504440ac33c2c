"""Where a node may answer: the one check of reply topics, shared by jobs and commands.

A reply topic comes from a peer (an MQTT 5 ResponseTopic, or `reply_to` in a 3.1.1 JSON body), so the
node publishes only where a reply can do no harm: never under a node's command tree (a reply there
would be a command, the node's own `cmd/drain` included), never on a node's own topics, never on a
topic the broker would reject as malformed (it drops the connection on those), and, where
`pool.reply_topic_prefix` is set, only under it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from appliance import errors
from appliance.pool.topics import KINDS
from appliance.pool.wire import Inbound

MAX_TOPIC_BYTES = 65535  # MQTT's UTF-8 string length limit (MQTT 5 section 1.5.4)
MAX_CORR_ID_CHARS = 256  # a 3.1.1 corr_id is echoed in the answer: an id, not a payload
SHOWN_CHARS = 80  # how much of a hostile topic an error message or event repeats
# Bodies up to this are parsed whole for `reply_to`; a larger 3.1.1 body is only scanned for its keys,
# so that finding where to answer allocates nothing, whether or not the job is ever run (it is not: a
# pool job carries at most 64 KiB of JSON, pool/jobs.py). Only its first and last SCAN_BYTES are
# scanned, where an encoder puts keys written before or after the tensors: a scan of the whole holds
# the event loop too, 1.5 ms a MB of numbers and 5 ms a MB of escaped quotes (80 ms for 16 MiB).
PARSE_LIMIT_BYTES = 64 * 1024
SCAN_BYTES = 64 * 1024


class Unanswerable(errors.ApplianceError):
    """A job or command that names nowhere it may be answered: reported on evt, never published."""


class NoReply(Unanswerable, errors.InvalidInput):
    """The message names no reply topic at all (400)."""


class BadReplyRoute(NoReply):
    """The reply topic or corr_id is malformed: the broker would drop the connection, or the answer
    could not be matched (400)."""


class ReplyTopicForbidden(Unanswerable, errors.Forbidden):
    """A well-formed reply topic where this node will not publish (403)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """Where an answer goes: MQTT 5 ResponseTopic + CorrelationData, or reply_to + corr_id in the body."""

    topic: str
    correlation: bytes | None = None
    corr_id: Any = None
    is_in_body: bool = False

    @property
    def sender(self) -> str:
        """Who asked, as far as the message tells: the reply topic without its last level.

        A peer chooses its reply topic, so it can claim any sender; this identity only keeps honest
        but greedy peers to their share. The broker's ACL is the real identity.
        """
        return self.topic.rpartition("/")[0]


@dataclass(frozen=True, slots=True)
class ReplyRules:
    """The topic root every node lives under, and the prefix replies must start with (if any)."""

    root: str
    prefix: str | None = None

    def check(self, topic: Any) -> str:
        """The topic if this node may publish a reply to it; NoReply or ReplyTopicForbidden naming why."""
        if not isinstance(topic, str) or not topic:
            raise BadReplyRoute(f"reply topic {topic!r:.{SHOWN_CHARS}}: expected a non-empty string")
        try:
            size = len(topic.encode("utf-8"))
        except UnicodeEncodeError:
            raise BadReplyRoute(f"reply topic {shown(topic)} is not valid UTF-8") from None
        if size > MAX_TOPIC_BYTES:
            raise BadReplyRoute(f"reply topic of {size} bytes is longer than MQTT's {MAX_TOPIC_BYTES} bytes")
        if "+" in topic or "#" in topic:
            raise BadReplyRoute(f"reply topic {shown(topic)} holds a wildcard (+ or #)")
        bad = _BAD_CHARACTER.search(topic)
        if bad is not None:
            raise BadReplyRoute(
                f"reply topic {shown(topic)} holds U+{ord(bad.group()):04X} at {bad.start()}: NUL, "
                "control characters and Unicode non-characters make the broker drop the connection"
            )
        if topic.startswith("$"):
            raise ReplyTopicForbidden(f"reply topic {shown(topic)} is a broker topic ($...)")
        if self.prefix and not topic.startswith(self.prefix):
            raise ReplyTopicForbidden(
                f"reply topic {shown(topic)} is not under {self.prefix!r} (pool.reply_topic_prefix)"
            )
        levels = topic.split("/")
        root = self.root.split("/")
        if levels[: len(root)] == root:
            own = levels[len(root) :]  # <site>/<node>/<kind or cmd>/...
            if len(own) >= 3 and own[2] == "cmd":
                raise ReplyTopicForbidden(
                    f"reply topic {shown(topic)} is under a node's command tree ({self.root}/+/+/cmd/#): "
                    "a reply there would be a command"
                )
            if len(own) == 3 and own[2] in KINDS:
                raise ReplyTopicForbidden(f"reply topic {shown(topic)} is a node's own {own[2]} topic")
        return topic

    def route(self, message: Inbound) -> Reply:
        """Where to answer `message`: the MQTT 5 properties win; otherwise `reply_to` and `corr_id`
        from a JSON body (MQTT 3.1.1). Raises Unanswerable (NoReply, ReplyTopicForbidden)."""
        if message.response_topic is not None:
            return Reply(self.check(message.response_topic), correlation=message.correlation)
        found = body_route(message.payload)
        if found is None:
            raise NoReply(
                "job has no MQTT 5 ResponseTopic and no 'reply_to' topic in a JSON body; it cannot be "
                "answered"
            )
        reply_to, corr_id = found
        topic = self.check(reply_to)
        if not _is_corr_id(corr_id):
            raise BadReplyRoute(
                f"'corr_id' must be a string of at most {MAX_CORR_ID_CHARS} characters, an integer or "
                "null; the answer could not be matched"
            )
        return Reply(topic, corr_id=corr_id, is_in_body=True)


def body_route(payload: bytes) -> tuple[Any, Any] | None:
    """(`reply_to`, `corr_id`) of a JSON object body, or None where it names no `reply_to`."""
    if len(payload) <= PARSE_LIMIT_BYTES:
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(document, dict) or "reply_to" not in document:
            return None
        return document["reply_to"], document.get("corr_id")
    reply_to = _scan(payload, _REPLY_TO)
    return None if reply_to is _MISSING else (reply_to, _scan(payload, _CORR_ID, default=None))


def shown(topic: str) -> str:
    """A peer's topic as messages repeat it: quoted, escaped and cut to SHOWN_CHARS."""
    return repr(topic if len(topic) <= SHOWN_CHARS else topic[:SHOWN_CHARS] + "...")


def _is_corr_id(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_CORR_ID_CHARS
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


# What mosquitto's UTF-8 check refuses in a topic (it then drops the connection): NUL and the other
# C0 controls, DEL and C1 controls, lone surrogates and the Unicode non-characters.
_BAD_CHARACTER = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(f"{chr(plane * 0x10000 + 0xFFFE)}{chr(plane * 0x10000 + 0xFFFF)}" for plane in range(17))
    + "]"
)
_MISSING = object()
# A key and a JSON scalar after it; a key inside a string cannot match, its quotes being escaped.
_SCALAR = rb'("(?:[^"\\]|\\.)*"|-?\d+|null|true|false)'
_REPLY_TO = re.compile(rb'"reply_to"\s*:\s*' + _SCALAR)
_CORR_ID = re.compile(rb'"corr_id"\s*:\s*' + _SCALAR)


def _scan(payload: bytes, pattern: re.Pattern[bytes], default: Any = _MISSING) -> Any:
    """The JSON scalar after the first match of `pattern` in the first SCAN_BYTES of `payload`, else
    in its last SCAN_BYTES; `default` where neither holds one."""
    found = pattern.search(payload, 0, SCAN_BYTES) or pattern.search(
        payload, max(0, len(payload) - SCAN_BYTES)
    )
    if found is None:
        return default
    try:
        return orjson.loads(found.group(1))
    except orjson.JSONDecodeError:
        return default
