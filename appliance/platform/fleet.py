"""Documents the gateway serves about the pool: the fleet view, the repository index, model metadata."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol
from weakref import WeakKeyDictionary

import orjson

from appliance import errors
from appliance.platform import kept
from appliance.platform.attempts import Answer, Job
from appliance.platform.buyers import Buyers
from appliance.platform.catalogue import Catalogue, Files
from appliance.platform.credit import CreditBook
from appliance.platform.metrics import GatewayMetrics
from appliance.platform.presence import Presence
from appliance.platform.settings import GatewaySettings
from appliance.platform.view import NodeView, PoolView
from appliance.protocol.codec import InferenceRequest
from appliance.tensors import TensorSpec

log = logging.getLogger(__name__)


class Link(Protocol):
    connected: threading.Event

    def is_learning(self) -> bool: ...


class Gateway(Protocol):
    """What the HTTP side needs of the gateway (gateway.py builds it)."""

    settings: GatewaySettings
    view: PoolView
    presence: Presence
    catalogue: Catalogue
    credit: CreditBook
    buyers: Buyers
    metrics: GatewayMetrics
    link: Link
    max_body_bytes: int

    async def dispatch(self, job: Job, decoded: InferenceRequest) -> Answer: ...


def nodes(gateway: Gateway) -> dict[str, Any]:
    """GET /v2/pool/nodes: every node with its state, session, report age and per-model figures. Each
    node's part is written on its own (an orjson Fragment), so that one node's part, should it ever fail
    to build or to serialise, shows as that node's error and every other node as usual."""
    now_s = time.monotonic()
    return {
        "gateway": gateway.settings.gateway_id,
        "gateways": gateway.presence.live(),
        "share": gateway.presence.share(),
        "broker_connected": gateway.link.connected.is_set(),
        "nodes": [_node_part(gateway, node, now_s) for node in gateway.view.nodes()],
    }


def _node_part(gateway: Gateway, node: NodeView, now_s: float) -> orjson.Fragment:
    try:
        return orjson.Fragment(orjson.dumps(_node(gateway, node, now_s)))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # JSONEncodeError is a TypeError
        log.warning("fleet view: node %s cannot be shown: %s", node.name, exc)
        failed = {
            "site": node.site,
            "node": node.node,
            "state": "unknown",
            "reason": f"cannot be shown: {type(exc).__name__}: {str(exc)[:200]}",
            "session": node.session,
            "report_age_s": None,
            "capacity_age_s": None,
            "quarantine": node.quarantine if isinstance(node.quarantine, str) else None,
            "public_key": None,
            "models": {},
        }
        return orjson.Fragment(orjson.dumps(failed))


def _node(gateway: Gateway, node: NodeView, now_s: float) -> dict[str, Any]:
    state, reason = node.effective_state(now_s)
    seen_s = node.last_received_s
    models = {}
    for name, report in ((node.capacity or {}).get("models") or {}).items():
        born = node.model_birth(name)
        counts = node.jobs.get(name, {})
        models[name] = {
            "sha256": born.get("sha256"),
            "precision": report.get("precision", born.get("precision")),
            "provider": report.get("provider", born.get("provider")),
            "max_ips_at_slo": report.get("max_ips_at_slo", 0.0),
            "spare_ips_at_slo": report.get("spare_ips_at_slo", 0.0),
            "accepts_pool_jobs": bool(report.get("accepts_pool_jobs")),
            "is_offer_usable": node.offer(name, now_s) is not None,
            "credit_rows": round(gateway.credit.credit_rows(node, name, now_s), 3),
            "in_flight_rows": gateway.credit.in_flight(node, name),
            "withheld_for_s": round(gateway.credit.withheld_for_s(node, name), 3),
            "jobs_sent": counts.get("sent", 0),
            "jobs_answered": counts.get("answered", 0),
            "jobs_refused": counts.get("refused", 0),
            "jobs_lost": counts.get("lost", 0),
        }
    return {
        "site": node.site,
        "node": node.node,
        "state": state,
        "reason": reason,
        "session": node.session,
        "report_age_s": None if seen_s is None else round(now_s - seen_s, 3),
        "capacity_age_s": None if node.age_s(now_s) is None else round(node.age_s(now_s) or 0.0, 3),
        "quarantine": node.quarantine,
        "public_key": node.public_key,
        "models": models,
    }


# A model's spare total walks every node offering it: 26 ms of the loop at 5,000 nodes, for any buyer's
# index, metadata or readiness call, none of which a rate quota bounds. Where it costs over
# kept.MIN_KEPT_COST_S of CPU, the total is kept for KEEP_FACTOR times what it cost (kept.costly):
# however often buyers ask, it takes at most 1/KEEP_FACTOR of the loop, and it is at most half a second
# old at 5,000 nodes. Below that cost (small fleets) it is counted afresh at every call.
MAX_KEPT_TOTALS = 1024  # (model, files) pairs kept per view; all are dropped past it
_kept_totals: WeakKeyDictionary[PoolView, dict[tuple[str, Files | None], tuple[float, float]]]
_kept_totals = WeakKeyDictionary()


def spare_ips(gateway: Gateway, name: str, files: Files | None) -> float:
    """The pool's total spare inferences/s for the model (whole offers, before this gateway's share),
    kept a while where counting it is costly (kept.costly)."""
    totals = _kept_totals.setdefault(gateway.view, {})
    found = totals.get((name, files))
    if found is not None and kept.is_fresh(found[0]):
        return found[1]
    total, until_s = kept.costly(lambda: _spare_ips(gateway.view, name, files))
    if until_s is not None:
        if len(totals) >= MAX_KEPT_TOTALS:
            totals.clear()
        totals[(name, files)] = (until_s, total)
    return total


def _spare_ips(view: PoolView, name: str, files: Files | None) -> float:
    now_s = time.monotonic()
    total = 0.0
    for node in view.offering(name):
        offer = node.offer(name, now_s)
        if offer is not None and (files is None or offer.sha256 in files):
            total += offer.spare_ips
    return round(total, 3)


def index(gateway: Gateway) -> list[dict[str, Any]]:
    """POST /v2/repository/index in KServe's shape, with the pool's spare capacity per model."""
    found = []
    for name in gateway.catalogue.names(gateway.view):
        files = gateway.catalogue.files(name, gateway.view)
        spare = spare_ips(gateway, name, files)
        found.append(
            {
                "name": name,
                "version": _version(gateway, name, files) or "",
                "state": "READY" if spare > 0 else "UNAVAILABLE",
                "reason": "" if spare > 0 else "no node offers spare capacity for it now",
                "parameters": {"pool_spare_ips_at_slo": spare, "sha256": _shown(files)},
            }
        )
    return found


def metadata(gateway: Gateway, name: str, version: str | None = None) -> dict[str, Any]:
    """GET /v2/models/{name}[/versions/{version}]: the model's signature from its nodes' births
    (Catalogue.described), plus the pool's spare capacity."""
    files = gateway.catalogue.files(name, gateway.view)
    born = _birth(gateway, name, files)
    if files is None or born is None:
        raise not_served(gateway, name)
    if version is not None:
        check_version(gateway, name, files, version)
    return {
        "name": name,
        "versions": [str(born.get("version", ""))],
        "platform": "onnxruntime_onnx",
        "inputs": born.get("inputs", []),
        "outputs": born.get("outputs", []),
        "parameters": {"pool_spare_ips_at_slo": spare_ips(gateway, name, files), "sha256": _shown(files)},
    }


def not_served(gateway: Gateway, name: str) -> errors.ApplianceError:
    """The error for a model no node is known to offer: 404, except from a gateway without a catalogue
    that has only just (re)connected, which may not have heard of it yet: 503, try again."""
    if gateway.catalogue.entries is None and gateway.link.is_learning():
        return errors.NoPoolCapacity(
            f"model {name!r} is not known yet: the gateway has just connected to the broker and is still "
            "reading the pool's retained state; try again",
            retry_after_s=1.0,
        )
    return errors.ModelNotFound(f"model {name!r} is not served by the pool (see POST /v2/repository/index)")


def check_version(gateway: Gateway, name: str, files: Files, version: str) -> None:
    """A request naming a version (Triton's /versions/{v} routes) is served only under the one the
    model's metadata names: a pool sells a model name by its file (sha256), and lists under it the
    version most nodes in good standing give that file."""
    served = _version(gateway, name, files)
    if served is not None and version != served:  # None: no node serves it now, which says so itself
        raise errors.ModelNotFound(
            f"model {name!r} has no version {version!r} in the pool; it serves version {served!r}"
        )


def signature(gateway: Gateway, name: str, files: Files) -> list[TensorSpec]:
    """The inputs buyers must send, as most nodes in good standing serving one of those files describe
    them (their births' inputs were checked at ingest: intake.py)."""
    born = _birth(gateway, name, files)
    if born is None:
        raise errors.NoPoolCapacity(f"no node serves model {name!r} with sha256 {_shown(files)} now")
    return [
        TensorSpec(spec["name"], spec["datatype"], tuple(spec["shape"])) for spec in born.get("inputs", [])
    ]


def outputs(gateway: Gateway, name: str, files: Files) -> list[TensorSpec] | None:
    """The outputs the model gives, from the same birth entry as `signature`'s inputs (what buyers are
    told); None when that entry names none."""
    born = _birth(gateway, name, files)
    if born is None or "outputs" not in born:
        return None
    return [TensorSpec(spec["name"], spec["datatype"], tuple(spec["shape"])) for spec in born["outputs"]]


def is_batched(gateway: Gateway, name: str, files: Files) -> bool | None:
    """Whether the model batches (its birth's max_batch_size above 0), from the same birth entry as
    `signature`; None when that entry does not say."""
    born = _birth(gateway, name, files)
    batch = None if born is None else born.get("max_batch_size")
    return None if batch is None else batch > 0


def _shown(files: Files | None) -> str | None:
    """The sha256 of the file a name runs on (several, comma-separated: a parameter is one string)."""
    return None if files is None else ",".join(sorted(files))


def _birth(gateway: Gateway, name: str, files: Files | None) -> dict[str, Any] | None:
    return None if files is None else gateway.catalogue.described(name, files, gateway.view)


def _version(gateway: Gateway, name: str, files: Files | None) -> str | None:
    born = _birth(gateway, name, files)
    return None if born is None else str(born.get("version", ""))
