"""Pool control verbs: off unless pool.remote_control, and no change at all on any bad argument."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jsonschema
import orjson
import pytest

from appliance.pool import commands, schemas
from appliance.pool.routes import Reply


@dataclass
class Hub:
    """What a command calls on the model hub, recorded."""

    calls: list[tuple[str, Any]] = field(default_factory=list)

    async def drain(self, timeout_s: float) -> bool:
        self.calls.append(("drain", timeout_s))
        return True

    def resume(self) -> None:
        self.calls.append(("resume", None))


@dataclass
class Node:
    """The link as a command sees it (commands.Node), recording every change."""

    is_remote_control: bool = True
    hub: Any = field(default_factory=Hub)
    state: str = "online"
    is_stopping: bool = False
    default_drain_timeout_s: float = 30.0
    changes: list[tuple[str, str]] = field(default_factory=list)
    births: int = 0

    def set_state(self, value: str, reason: str) -> None:
        self.state = value
        self.changes.append((value, reason))

    def publish_birth(self) -> None:
        self.births += 1


def is_untouched(node: Node) -> bool:
    return not node.changes and not node.hub.calls and not node.births


async def run(node: Node, verb: str, payload: bytes | dict[str, Any] = b"") -> dict[str, Any]:
    body = orjson.dumps(payload) if isinstance(payload, dict) else payload
    document = await commands.run(node, verb, body)
    jsonschema.validate(document, schemas.load("command_reply"), cls=jsonschema.Draft202012Validator)
    return document


@pytest.mark.asyncio
@pytest.mark.parametrize("verb", ["drain", "resume", "rebirth", "bench", "drain/now", "x" * 1000])
async def test_control_verbs_are_off_by_default(verb: str) -> None:
    node = Node(is_remote_control=False)
    document = await run(node, verb, {"timeout_s": 5})
    assert document["status"] == 403 and "pool.remote_control = false" in document["error"]
    assert len(document["error"]) < 400 and is_untouched(node)


@pytest.mark.asyncio
@pytest.mark.parametrize("is_remote_control", [True, False])
async def test_infer_without_a_model_is_not_found(is_remote_control: bool) -> None:
    document = await run(Node(is_remote_control=is_remote_control), "infer")
    assert document["status"] == 404 and "cmd/infer/<model>" in document["error"]


@pytest.mark.asyncio
async def test_drain_resume_rebirth_with_good_arguments() -> None:
    node = Node()
    document = await run(node, "drain", {"timeout_s": 2.5, "reason": "maintenance", "corr_id": 3})
    assert document == {"status": 200, "state": "draining", "drained": True}
    assert node.hub.calls == [("drain", 2.5)] and node.changes == [("draining", "maintenance")]
    assert (await run(node, "drain", b" "))["status"] == 200
    assert node.hub.calls[-1] == ("drain", 30.0)  # the node's default
    assert await run(node, "resume", {"reason": "done"}) == {"status": 200, "state": "online"}
    assert node.changes[-1] == ("online", "done")
    assert (await run(node, "rebirth", {"reply_to": "r/1"}))["status"] == 200 and node.births == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("verb", "payload", "text"),
    [
        ("drain", {"timeout_s": "nan"}, "timeout_s 'nan'"),
        ("drain", {"timeout_s": -1}, "above 0"),
        ("drain", {"timeout_s": 0}, "above 0"),
        ("drain", {"timeout_s": 3600.5}, "at most 3600"),
        ("drain", b'{"timeout_s": 1' + b"0" * 30 + b"}", "timeout_s 1"),
        ("drain", {"timeout_s": False}, "timeout_s False"),
        ("drain", {"timeout_s": [1]}, "timeout_s [1]"),
        ("drain", {"reason": ""}, "1 to 200 characters"),
        ("drain", {"reason": "x" * 201}, "1 to 200 characters"),
        ("drain", {"reason": None}, "reason None"),
        (
            "drain",
            {"timeout_s": 5, "force": True},
            "unknown argument 'force'; cmd/drain takes reason, timeout_s",
        ),
        ("resume", {"timeout_s": 5}, "cmd/resume takes reason"),
        ("rebirth", {"reason": "x"}, "cmd/rebirth takes none"),
        ("drain", b"[]", "JSON list"),
        ("drain", b"\xff", "not valid JSON"),
        ("drain", b"NaN", "not valid JSON"),
    ],
)
async def test_a_bad_argument_changes_nothing(verb: str, payload: Any, text: str) -> None:
    node = Node()
    document = await run(node, verb, payload)
    assert document["status"] == 400 and text in document["error"], document
    assert document["error"].startswith(f"cmd/{verb}: ")
    assert is_untouched(node)


@pytest.mark.asyncio
async def test_an_overlong_or_unknown_command() -> None:
    node = Node()
    document = await run(node, "drain", b'{"reason": "' + b"x" * commands.MAX_COMMAND_BYTES + b'"}')
    assert document["status"] == 413
    document = await run(node, "frobnicate")
    assert document["status"] == 404 and "unknown command 'frobnicate'" in document["error"]
    assert is_untouched(node)


@pytest.mark.asyncio
async def test_a_retained_command_is_stale() -> None:
    node = Node()
    document = await commands.run(node, "drain", b"", is_retained=True)
    assert document["status"] == 400 and "retained" in document["error"] and is_untouched(node)


@pytest.mark.asyncio
async def test_a_stopping_node_does_not_resume() -> None:
    node = Node(is_stopping=True)
    assert (await run(node, "resume"))["status"] == 503 and is_untouched(node)


def test_replies_go_where_the_route_says() -> None:
    answer = commands.reply(Reply("r/1", correlation=b"c"), {"status": 403, "error": "no"})
    assert (answer.topic, answer.correlation, answer.user) == ("r/1", b"c", {"status": "403"})
    answer = commands.reply(Reply("r/2", corr_id=7, is_in_body=True), {"status": 200, "state": "online"})
    assert orjson.loads(answer.payload) == {"corr_id": 7, "status": 200, "state": "online"}
