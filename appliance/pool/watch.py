"""`appliance pool watch`: a live table of the pool's nodes, or the raw ingest stream as JSON lines."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

import orjson

from appliance.pool.platform import PlatformClient
from appliance.pool.topics import node_filter, parse_node_topic, shared
from appliance.pool.view import PoolView
from appliance.pool.wire import Inbound

KINDS = ("birth", "state", "capacity")
_CLEAR = "\x1b[H\x1b[2J"


def subscriptions(
    root: str, *, site: str = "+", group: str | None = None, kinds: tuple[str, ...] = KINDS
) -> list[str]:
    """What an ingest consumer subscribes to; with `group`, an MQTT 5 shared subscription, so that each
    message goes to one member of the group (retained messages do not reach shared subscribers)."""
    return [shared(group, node_filter(root, kind, site=site)) for kind in kinds]


def watch(
    client: PlatformClient,
    *,
    root: str,
    site: str = "+",
    group: str | None = None,
    interval_s: float = 1.0,
    once: bool = False,
    as_json: bool = False,
    out: TextIO | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Print the table every `interval_s` (or once, after the retained state), or stream JSON lines."""
    out = out or sys.stdout
    view = PoolView(root)
    lock = threading.Lock()

    def on_message(message: Inbound, received_s: float) -> None:
        view.ingest(message.topic, message.payload, received_s)
        if as_json:
            with lock:
                out.write(_json_line(root, message) + "\n")
                out.flush()

    client.on_message = on_message
    kinds = (*KINDS, "evt") if as_json else KINDS
    client.subscribe(*subscriptions(root, site=site, group=group, kinds=kinds))
    if group is None:
        client.sync(root)
    if once:
        if not as_json:
            out.write(view.table(time.monotonic()) + "\n")
        return 0
    stop = stop or threading.Event()
    is_terminal = out.isatty() and not as_json
    while not stop.wait(interval_s):
        if not as_json:
            with lock:
                out.write((_CLEAR if is_terminal else "") + view.table(time.monotonic()) + "\n")
                out.flush()
    return 0


def _json_line(root: str, message: Inbound) -> str:
    origin = parse_node_topic(root, message.topic)
    try:
        document = orjson.loads(message.payload) if message.payload else None
    except orjson.JSONDecodeError:
        document = None
    record = {
        "received_ms": int(time.time() * 1000),
        "site": origin.site if origin else None,
        "node": origin.node if origin else None,
        "kind": origin.kind if origin else None,
        "document": document,
    }
    return orjson.dumps(record).decode()
