"""`appliance platform watch`: a live table of the pool's nodes, or the raw ingest stream as JSON lines."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

import orjson

from appliance.platform import intake
from appliance.platform.client import PlatformClient
from appliance.platform.view import PoolView
from appliance.pool.topics import node_filter, parse_node_topic, shared
from appliance.pool.wire import Inbound
from appliance.text import printable

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
        view.ingest(message.topic, message.payload, received_s, message.expiry_s)
        line = _json_line(root, message) if as_json else None
        if line is not None:
            with lock:
                out.write(line + "\n")
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


def _json_line(root: str, message: Inbound) -> str | None:
    """The message as one JSON line; None for a topic no node may publish under (intake.py). A document
    too large to read, or one nested too deep to write again, is shown as its error."""
    origin = parse_node_topic(root, message.topic)
    if origin is None or intake.topic_problem(origin.site, origin.node) is not None:
        return None
    record: dict[str, Any] = {
        "received_ms": int(time.time() * 1000),
        "site": origin.site,
        "node": origin.node,
        "kind": origin.kind,
        "document": None,
    }
    problem = intake.size_problem(origin.kind, message.payload)
    if problem is not None:
        return orjson.dumps({**record, "error": problem}).decode()
    try:
        record["document"] = orjson.loads(message.payload) if message.payload else None
        return orjson.dumps(record).decode()
    except orjson.JSONDecodeError:
        return orjson.dumps(record).decode()  # not JSON: shown as no document, as before
    except orjson.JSONEncodeError as exc:
        return orjson.dumps({**record, "document": None, "error": f"cannot be written: {exc}"}).decode()


def watch_gateway(
    url: str,
    *,
    token: str | None = None,
    interval_s: float = 1.0,
    once: bool = False,
    as_json: bool = False,
    out: TextIO | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Show a gateway's view (GET /v2/pool/nodes): the table, or the document as JSON."""
    import httpx

    from appliance.platform.client import PoolUnreachable

    out = out or sys.stdout
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    stop = stop or threading.Event()
    with httpx.Client(base_url=url, headers=headers, timeout=10.0) as http:
        while True:
            try:
                response = http.get("/v2/pool/nodes")
            except httpx.HTTPError as exc:
                raise PoolUnreachable(f"gateway {url}: {exc}") from exc
            if response.status_code != 200:
                raise PoolUnreachable(f"gateway {url} answered {response.status_code}: {response.text[:200]}")
            document = response.json()
            text = orjson.dumps(document).decode() if as_json else gateway_table(document)
            out.write(text + "\n")
            out.flush()
            if once or stop.wait(interval_s):
                return 0


def gateway_table(document: dict[str, Any]) -> str:
    """The fleet view as a terminal table: node, state, session, report age, per-model figures; every
    control character a node (or the gateway) could put in a cell escaped."""
    rows = [("node", "state", "session", "age_s", "spare/max at SLO, jobs sent/answered/refused")]
    for node in document.get("nodes", []):
        state = f"{node['state']}" + (
            f" ({node['reason']})" if node["reason"] and node["state"] != "online" else ""
        )
        if node.get("quarantine"):
            state += f" [quarantined: {node['quarantine']}]"
        models = (
            ", ".join(
                f"{name} {m['spare_ips_at_slo']:.0f}/{m['max_ips_at_slo']:.0f} "
                f"{m['jobs_sent']}/{m['jobs_answered']}/{m['jobs_refused']}"
                for name, m in node["models"].items()
            )
            or "-"
        )
        age = "-" if node["report_age_s"] is None else f"{node['report_age_s']:.1f}"
        name = f"{node['site']}/{node['node']}"
        rows.append((printable(name), printable(state), str(node["session"]), age, printable(models)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4] for row in rows
    ]
    gateways = document.get("gateways", [])
    lines.append(printable(f"gateways: {', '.join(gateways)}"))
    return "\n".join(lines)
