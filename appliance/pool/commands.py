"""Pool control verbs (cmd/rebirth, drain, resume, bench): off unless pool.remote_control; arguments
checked before anything is done."""

from __future__ import annotations

import math
from typing import Any, Protocol

import orjson

from appliance.dataplane import outcomes
from appliance.errors import (
    ApplianceError,
    Forbidden,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    RequestTooLarge,
)
from appliance.pool.messages import DRAINING, ONLINE
from appliance.pool.routes import Reply, shown
from appliance.pool.wire import STATUS, Outbound
from appliance.scheduler import bench
from appliance.scheduler.hub import ModelHub
from appliance.scheduler.queues import Priority

# Every verb but infer is a control verb, and each new one is off unless pool.remote_control is on.
VERBS = ("rebirth", "drain", "resume", "bench")
ARGUMENTS = {
    "rebirth": (),
    "drain": ("reason", "timeout_s"),
    "resume": ("reason",),
    "bench": ("model", "duration_s", "clients"),
}
ROUTE_KEYS = ("reply_to", "corr_id")  # where a 3.1.1 command asks to be answered, not arguments
MAX_COMMAND_BYTES = 64 * 1024
MAX_REASON_CHARS = 200
MAX_DRAIN_TIMEOUT_S = 3600.0
MAX_BENCH_S = 10.0  # per level: cmd/bench answers within the platform's patience (levels x this)
MAX_BENCH_LEVELS = 8
MAX_BENCH_CLIENTS = 64


class Node(Protocol):
    """What a command acts on (the link)."""

    hub: ModelHub
    state: str
    is_stopping: bool
    is_remote_control: bool
    default_drain_timeout_s: float

    def set_state(self, value: str, reason: str) -> None: ...
    def publish_birth(self) -> None: ...


async def run(node: Node, verb: str, payload: bytes, *, is_retained: bool = False) -> dict[str, Any]:
    """Carry out one command named by the topic levels after cmd/; the reply document (status 200, or
    status and error). Nothing changes unless the verb is allowed and all its arguments are valid."""
    try:
        arguments = _arguments(node, verb, payload, is_retained)
        if verb == "rebirth":
            node.publish_birth()
        elif verb == "drain":
            timeout_s = arguments.get("timeout_s", node.default_drain_timeout_s)
            node.set_state(DRAINING, arguments.get("reason", "cmd/drain"))
            return {"status": 200, "state": DRAINING, "drained": await node.hub.drain(timeout_s)}
        elif verb == "resume":
            if node.is_stopping:
                raise ModelNotReady("this node is stopping; it cannot resume")
            node.hub.resume()
            node.set_state(ONLINE, arguments.get("reason", "cmd/resume"))
        elif verb == "bench":
            return {"status": 200, "state": node.state, "models": await _bench(node, arguments)}
    except ApplianceError as exc:
        return {
            "status": outcomes.outcome_of(exc).http_status,
            "error": f"cmd/{verb:.{MAX_REASON_CHARS}}: {exc}",
        }
    return {"status": 200, "state": node.state}


def reply(route: Reply, document: dict[str, Any]) -> Outbound:
    """The answer to a command, sent where the command asked (route checked by `routes`)."""
    if route.is_in_body:
        return Outbound(route.topic, orjson.dumps({"corr_id": route.corr_id, **document}))
    outbound = Outbound(route.topic, orjson.dumps(document), correlation=route.correlation)
    outbound.user[STATUS] = str(document["status"])
    return outbound


def _arguments(node: Node, verb: str, payload: bytes, is_retained: bool) -> dict[str, Any]:
    """The command's checked arguments; raises before anything is done."""
    if verb == "infer":
        raise ModelNotFound("cmd/infer names no model; publish jobs to cmd/infer/<model>")
    if not node.is_remote_control:
        raise Forbidden(
            "this node takes only cmd/infer/<model> from the pool; control verbs are off "
            "(pool.remote_control = false)"
        )
    if verb not in VERBS:
        raise ModelNotFound(
            f"unknown command {shown(verb)}; this node answers infer/<model>, {', '.join(VERBS)}"
        )
    if is_retained:  # the broker would replay it on every reconnect
        raise InvalidInput("a retained command is stale by definition; publish commands without retain")
    if len(payload) > MAX_COMMAND_BYTES:
        raise RequestTooLarge(f"command of {len(payload)} bytes; at most {MAX_COMMAND_BYTES} bytes")
    document = _json_object(payload)
    allowed = ARGUMENTS[verb]
    unknown = sorted(key for key in document if key not in allowed and key not in ROUTE_KEYS)
    if unknown:
        raise InvalidInput(
            f"unknown argument {shown(unknown[0])}; cmd/{verb} takes {', '.join(allowed) or 'none'}"
        )
    arguments: dict[str, Any] = {}
    if "reason" in document:
        arguments["reason"] = _reason(document["reason"])
    if "timeout_s" in document:
        arguments["timeout_s"] = _timeout_s(document["timeout_s"])
    if "model" in document:
        arguments["model"] = _model(node, document["model"])
    if "duration_s" in document:
        arguments["duration_s"] = _bounded("duration_s", document["duration_s"], MAX_BENCH_S)
    if "clients" in document:
        arguments["clients"] = _clients(document["clients"])
    return arguments


async def _bench(node: Node, arguments: dict[str, Any]) -> dict[str, Any]:
    """The curve at pool priority (line work always goes first) and the offer, per model asked."""
    names = [arguments["model"]] if "model" in arguments else [e.name for e in node.hub if e.scheduler]
    reserved_share = node.hub.settings.pool.reserved_pct / 100.0
    found: dict[str, Any] = {}
    for name in names:
        scheduler = node.hub.scheduler(name)
        inputs = scheduler.model.example_inputs(1)
        if inputs is None:
            found[name] = {"error": "dynamic non-batch dimensions: no example input to measure with"}
            continue
        points = await bench.curve(
            scheduler,
            inputs,
            priority=Priority.POOL,
            levels=arguments.get("clients", (1, 4, 16)),
            duration_s=arguments.get("duration_s", 2.0),
        )
        found[name] = {
            "curve": [p.as_dict() for p in points],
            "offer": bench.offer(scheduler, reserved_share),
        }
    return found


def _model(node: Node, value: Any) -> str:
    if not isinstance(value, str) or not node.hub.is_served(value):
        raise ModelNotFound(f"model {value!r:.80}: not a model of this node")
    return value


def _bounded(key: str, value: Any, limit: float) -> float:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not 0 < value <= limit or not math.isfinite(value):
        raise InvalidInput(f"{key} {value!r:.80}: expected a number of seconds above 0 and at most {limit:g}")
    return float(value)


def _clients(value: Any) -> tuple[int, ...]:
    is_list = isinstance(value, list) and 0 < len(value) <= MAX_BENCH_LEVELS
    if not is_list or not all(type(n) is int and 0 < n <= MAX_BENCH_CLIENTS for n in value):
        raise InvalidInput(
            f"clients {value!r:.80}: expected a list of 1 to {MAX_BENCH_LEVELS} counts in [1, "
            f"{MAX_BENCH_CLIENTS}]"
        )
    return tuple(value)


def _json_object(payload: bytes) -> dict[str, Any]:
    if not payload.strip():
        return {}
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(
            f"the payload is not valid JSON ({exc}); expected a JSON object or nothing"
        ) from None
    if not isinstance(document, dict):
        raise InvalidInput(
            f"the payload is a JSON {type(document).__name__}; expected a JSON object or nothing"
        )
    return document


def _reason(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REASON_CHARS:
        raise InvalidInput(f"reason {value!r:.80}: expected a string of 1 to {MAX_REASON_CHARS} characters")
    return value


def _timeout_s(value: Any) -> float:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    # The range test comes first: NaN fails it, and a huge integer never reaches float conversion.
    if not is_number or not 0 < value <= MAX_DRAIN_TIMEOUT_S or not math.isfinite(value):
        raise InvalidInput(
            f"timeout_s {value!r:.80}: expected a number of seconds above 0 and at most "
            f"{MAX_DRAIN_TIMEOUT_S:g}"
        )
    return float(value)
