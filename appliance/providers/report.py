"""`appliance providers`: every known provider, available or why not, and the order a model would try."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from appliance.errors import ApplianceError, ConfigError
from appliance.providers.host import Host, SystemHost
from appliance.providers.registry import Registry


def inventory(
    registry: Registry, preference: Sequence[str] | None, host: Host | None = None
) -> dict[str, Any]:
    """JSON-ready listing of the providers, the installed ONNX Runtime and the resulting order."""
    host = host or SystemHost()
    providers = []
    for name in registry.names:
        probe = registry.probe(name)
        try:
            provider = registry.get(name)
            ep_name, is_default = provider.ep_name, bool(provider.is_default)
        except ApplianceError:  # a plugin that failed to import: only its name and reason are known
            ep_name, is_default = "", False
        providers.append({
            "name": name,
            "ep_name": ep_name,
            "available": probe.available,
            "reason": probe.reason,
            "details": dict(probe.details),
            "is_default": is_default,
            "source": registry.source(name),
        })  # fmt: skip
    report: dict[str, Any] = {
        "ort_version": host.ort_version(),
        "ort_package": host.ort_package(),
        "plugin_ep_libraries": host.has_plugin_ep_api(),
        "providers": providers,
        "order_source": "models.providers" if preference is not None else "default",
    }
    try:
        report["order"] = registry.chain(preference)
    except ConfigError as exc:
        report["order"], report["order_error"] = [], str(exc)
    # The order less what probes unavailable: what a model load would actually try, first to last.
    report["usable"] = [name for name in report["order"] if registry.probe(name).available]
    if "+" in report["ort_package"]:
        report["warning"] = (
            f"several ONNX Runtime packages are installed ({report['ort_package']}); they overwrite each "
            "other's files: uninstall all but one"
        )
    return report


def format_table(report: dict[str, Any]) -> str:
    """The inventory as a terminal table, one provider per line, then the order."""
    lines = [
        f"ONNX Runtime {report['ort_version']} (package {report['ort_package']}); plugin EP libraries: "
        + ("supported" if report["plugin_ep_libraries"] else "not supported (needs 1.22+)")
    ]
    if "warning" in report:
        lines.append(f"warning: {report['warning']}")
    width = max([len(p["name"]) for p in report["providers"]] + [8])
    source_width = max([len(p["source"]) for p in report["providers"]] + [6])
    lines.append(f"{'provider':<{width}}  {'status':<11}  {'source':<{source_width}}  notes")
    for p in report["providers"]:
        status = "available" if p["available"] else "unavailable"
        notes = p["reason"] if not p["available"] else ", ".join(f"{k} {v}" for k, v in p["details"].items())
        if p["available"] and not p["is_default"]:
            notes = "; ".join(filter(None, ["only when listed in models.providers", notes]))
        lines.append(f"{p['name']:<{width}}  {status:<11}  {p['source']:<{source_width}}  {notes}".rstrip())
    origin = "default: available accelerators, then cpu"
    if report["order_source"] != "default":
        origin = "from models.providers"
    if "order_error" in report:
        lines.append(f"order: invalid ({report['order_error']})")
    else:
        lines.append(f"order ({origin}): {' -> '.join(report['order'])}")
        lines.append(f"would try now (available): {' -> '.join(report['usable']) or 'none'}")
    return "\n".join(lines)


def schemas(registry: Registry) -> dict[str, Any]:
    """JSON Schema of each provider's [providers.<key>] options, descriptions included."""
    found = {}
    for name in registry.names:
        try:
            found[name] = registry.get(name).config_model.model_json_schema()
        except ApplianceError:  # a plugin that failed to import has no schema to show
            continue
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the inventory as JSON")
    parser.add_argument(
        "--schema", action="store_true", help="print the JSON Schema of every provider's options"
    )


def run(args: argparse.Namespace, settings: Any) -> int:
    """Print the inventory; exit 2 when the configured order or provider options are invalid."""
    registry = Registry.discover()
    if getattr(args, "schema", False):
        print(json.dumps(schemas(registry), indent=2))
        return 0
    report = inventory(registry, settings.models.providers)
    try:
        registry.configs(settings.providers)
    except ConfigError as exc:
        report["config_error"] = str(exc)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if "config_error" in report and not args.json:
        print(f"error: {report['config_error']}", file=sys.stderr)
    return 2 if "order_error" in report or "config_error" in report else 0
