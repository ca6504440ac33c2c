"""Pool commands besides jobs: cmd/rebirth, cmd/drain and cmd/resume, answered like a job when asked."""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import orjson

from appliance.errors import ApplianceError, ModelNotFound, ModelNotReady
from appliance.pool.jobs import NoReply, reply_route, status_of
from appliance.pool.messages import DRAINING, ONLINE
from appliance.pool.wire import STATUS, Inbound, Outbound
from appliance.scheduler.hub import ModelHub

VERBS = ("rebirth", "drain", "resume")


class Node(Protocol):
    """What a command acts on (the link)."""

    hub: ModelHub
    state: str
    is_stopping: bool
    default_drain_timeout_s: float

    def set_state(self, value: str, reason: str) -> None: ...
    def publish_birth(self) -> None: ...


async def run(node: Node, verb: str, payload: bytes) -> dict[str, Any]:
    """Carry out one command; the reply document (status 200, or status and error)."""
    arguments = _json_object(payload)
    try:
        if verb == "rebirth":
            node.publish_birth()
        elif verb == "drain":
            reason = str(arguments.get("reason") or "cmd/drain")
            timeout_s = float(arguments.get("timeout_s") or node.default_drain_timeout_s)
            node.set_state(DRAINING, reason)
            return {"status": 200, "state": DRAINING, "drained": await node.hub.drain(timeout_s)}
        elif verb == "resume":
            if node.is_stopping:
                raise ModelNotReady("this node is stopping; it cannot resume")
            node.hub.resume()
            node.set_state(ONLINE, "cmd/resume")
        else:
            raise ModelNotFound(
                f"unknown command {verb!r}; this node answers infer/<model>, {', '.join(VERBS)}"
            )
    except ApplianceError as exc:
        return {"status": status_of(exc), "error": f"cmd/{verb}: {exc}"}
    except (ValueError, TypeError) as exc:
        return {"status": 400, "error": f"cmd/{verb}: bad argument: {exc}"}
    return {"status": 200, "state": node.state}


def reply(message: Inbound, document: dict[str, Any]) -> Outbound | None:
    """The answer to a command, sent where the command asked; None when it named no response topic."""
    try:
        route = reply_route(message)
    except NoReply:
        return None
    if route.is_in_body:
        return Outbound(route.topic, orjson.dumps({"corr_id": route.corr_id, **document}))
    outbound = Outbound(route.topic, orjson.dumps(document), correlation=route.correlation)
    outbound.user[STATUS] = str(document["status"])
    return outbound


def _json_object(payload: bytes) -> dict[str, Any]:
    with contextlib.suppress(orjson.JSONDecodeError):
        document = orjson.loads(payload) if payload.strip() else {}
        if isinstance(document, dict):
            return document
    return {}
