"""`appliance status|reload|drain|resume`: an operator's view of, and hand on, the running service."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from appliance.config_sources import ignoring_unit_directories
from appliance.ota.link import NotRunning, ServiceLink, describe_instance
from appliance.settings import Settings
from appliance.system.admin import MAX_WAIT_S, AdminError
from appliance.text import json_kind, printable

EX_OK = 0
EX_FAILED = 1
EX_NOT_RUNNING = 3  # LSB `status`: program is not running
EX_TEMPFAIL = 75  # sysexits.h: drain asked for, requests still in flight


class MalformedReply(AdminError):
    """The service answered ok=true, but with a document of a shape these verbs do not know."""


def add_arguments(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the four verbs to `appliance`'s subparsers; each sets `func` for the CLI's dispatch."""
    status = subparsers.add_parser(
        "status", help="what the running service serves: state, models, providers, line load"
    )
    status.add_argument("--json", action="store_true", help="print the admin socket's status document")
    status.set_defaults(func=run_status)
    reload = subparsers.add_parser(
        "reload", help="reload every model from the repository (what SIGHUP does), and say how each went"
    )
    reload.set_defaults(func=run_reload)
    drain = subparsers.add_parser(
        "drain", help="stop admitting requests and wait for those admitted (until `appliance resume`)"
    )
    drain.add_argument(
        "--timeout-s",
        type=_seconds,
        help="how long to wait for admitted requests (default server.drain_timeout_s)",
    )
    drain.add_argument("--reason", default="appliance drain", help="told to the pool and the log")
    drain.set_defaults(func=run_drain)
    resume = subparsers.add_parser("resume", help="admit requests again after a drain")
    resume.set_defaults(func=run_resume)
    for parser in (status, reload, drain, resume):
        parser.add_argument(
            "--config",
            type=Path,
            help="the service's TOML settings file, to find its admin socket (default "
            "/etc/appliance/appliance.toml)",
        )


def run_status(args: argparse.Namespace) -> int:
    """0 and the summary while the service answers; 3 when it does not run."""
    link = _link(args)
    status = link.status()
    if status is None:
        print(f"appliance: not running (nothing listens on {link.socket_path})", file=sys.stderr)
        return EX_NOT_RUNNING
    try:
        # --json: json.dumps escapes every control character the service may have put in a string
        print(json.dumps(status, indent=2) if args.json else summary(status, link.socket_path))
    except MalformedReply as exc:
        return _malformed(exc)
    return EX_OK


def run_reload(args: argparse.Namespace) -> int:
    """0 when every model is READY after the reload, 1 otherwise (the old version keeps serving)."""
    link = _running(_link(args))
    try:
        results = _models(link.reload(), "reload reply")
    except MalformedReply as exc:
        return _malformed(exc)
    names = {name: printable(name) for name in results}
    width = max((len(shown) for shown in names.values()), default=0)
    for name, result in results.items():
        state = result.get("state")
        detail = f"version {result.get('version')}" if state == "READY" else result.get("reason") or ""
        print(f"{names[name]:<{width}}  {printable(state)}  {printable(detail)}".rstrip())
    return EX_OK if all(result.get("state") == "READY" for result in results.values()) else EX_FAILED


def run_drain(args: argparse.Namespace) -> int:
    """0 once nothing is in flight, 75 if requests still were after the wait (it stays draining)."""
    settings = _settings(args)
    link = _running(ServiceLink.from_settings(settings))
    timeout_s = settings.server.drain_timeout_s if args.timeout_s is None else args.timeout_s
    reply = link.drain(timeout_s, args.reason)
    if reply.get("drained") is True:
        print("drained: no request in flight; none is admitted until `appliance resume`")
        return EX_OK
    print(
        f"draining: {printable(reply.get('inflight'))} request(s) still in flight after {timeout_s:g} s; "
        "none is admitted until `appliance resume`"
    )
    return EX_TEMPFAIL


def run_resume(args: argparse.Namespace) -> int:
    link = _running(_link(args))
    print(f"state: {printable(link.resume().get('state'))}")
    return EX_OK


def summary(status: dict[str, Any], socket_path: Path | None) -> str:
    """The status document as a person reads it: the instance, line load, providers, one line per model.

    Every value is the service's word: control characters are escaped (printable()), so that it
    cannot rewrite root's terminal or forge lines; a part of the wrong shape is a MalformedReply."""
    line = _object(status.get("line"), "status reply's 'line'")
    providers = _object(status.get("providers"), "status reply's 'providers'")
    available = [printable(name) for name, is_available in providers.items() if is_available]
    missing = [printable(name) for name, is_available in providers.items() if not is_available]
    p = printable
    lines = [
        f"{describe_instance(status, socket_path)}",
        f"state      {p(status.get('state'))} (version {p(status.get('version'))}, "
        f"up {p(status.get('uptime_s'))} s)",
        f"repository {p(status.get('repository'))}",
        f"line       {p(line.get('queue_depth'))} queued, {p(line.get('served_ips'))} inferences/s, "
        f"{p(line.get('inflight'))} in flight",
        f"providers  {', '.join(available) or 'none'}"
        + (f" (unavailable: {', '.join(missing)})" if missing else ""),
        "models",
    ]
    models = _models(status, "status reply")
    names = {name: p(name) for name in models}
    width = max((len(shown) for shown in names.values()), default=0)
    for name, model in models.items():
        shown = names[name]
        if model.get("state") != "READY":
            reason = model.get("reason") or "no reason given"
            lines.append(f"  {shown:<{width}}  {p(model.get('state'))}: {p(reason)}")
            continue
        placement = _object(model.get("placement"), f"status reply's model {shown}: 'placement'")
        provider = placement.get("provider")
        lines.append(
            f"  {shown:<{width}}  READY  version {p(model.get('version'))} on {p(provider)}, "
            f"SLO p99 {p(model.get('slo_p99_ms'))} ms, {p(model.get('line_served_ips'))} inferences/s, "
            f"{p(model.get('line_queue_depth'))} queued"
        )
    if not models:
        lines.append("  none")
    return "\n".join(lines)


def _models(reply: dict[str, Any], what: str) -> dict[str, dict[str, Any]]:
    """The reply's `models`: an object of objects (absent: none); MalformedReply otherwise."""
    models = _object(reply.get("models"), f"{what}'s 'models'")
    for name, model in models.items():
        _object(model, f"{what}'s model {printable(name)}", required=True)
    return models


def _object(value: Any, what: str, *, required: bool = False) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise MalformedReply(f"{what} is {json_kind(value)}, expected a JSON object")
    return value


def _malformed(exc: MalformedReply) -> int:
    print(f"appliance: the service's answer makes no sense: {exc}", file=sys.stderr)
    return EX_FAILED


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 < value <= MAX_WAIT_S:
        raise argparse.ArgumentTypeError(f"expected a number of seconds in (0, {MAX_WAIT_S:g}], got {text!r}")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    """The service's settings as a client reads them: run from another unit (a health check, an
    update agent), its $RUNTIME_DIRECTORY names that unit's folder, not the service's admin socket."""
    with ignoring_unit_directories():
        return Settings.load(args.config)


def _link(args: argparse.Namespace) -> ServiceLink:
    return ServiceLink.from_settings(_settings(args))


def _running(link: ServiceLink) -> ServiceLink:
    """The link, after one status that names the instance on stderr; NotRunning if none answers."""
    status = link.status()
    if status is None:
        raise NotRunning(f"not running (nothing listens on {link.socket_path})")
    print(describe_instance(status, link.socket_path), file=sys.stderr)
    return link
