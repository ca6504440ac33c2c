"""The `appliance` command line: serve, inspect models and providers, provision, OTA, pool tools."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.errors import ApplianceError
from appliance.ota import command as ota
from appliance.platform import cli as platform_cli
from appliance.providers import report as providers_report
from appliance.settings import BUNDLED_MODELS, Settings, config_schema
from appliance.system import benchmark, logs, operator, provision

log = logging.getLogger("appliance")

SERVE_EPILOG = """\
Settings, lowest priority first: defaults, the TOML file (--config, else
/etc/appliance/appliance.toml if present), $CREDENTIALS_DIRECTORY secrets, environment
variables, these flags. Environment variables are APPLIANCE_<SECTION>__<KEY>, for example
APPLIANCE_SERVER__PORT=9000 or APPLIANCE_POOL__BROKER=mqtt://10.0.0.5:1883.
`appliance config-schema` lists every setting with its default."""


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "host", None):
        overrides.setdefault("server", {})["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides.setdefault("server", {})["port"] = args.port
    if getattr(args, "grpc_port", None) is not None:
        overrides.setdefault("server", {})["grpc_port"] = args.grpc_port
    if getattr(args, "model_repository", None):
        overrides.setdefault("models", {})["repository"] = args.model_repository
    if getattr(args, "log_level", None):
        overrides.setdefault("system", {})["log_level"] = args.log_level
    if getattr(args, "log_format", None):
        overrides.setdefault("system", {})["log_format"] = args.log_format
    return Settings.load(getattr(args, "config", None), overrides=overrides)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="TOML settings file (default /etc/appliance/appliance.toml)"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.scheduler.loading import exit_if_loads_stuck
    from appliance.service import Service

    settings = _settings(args)
    logs.configure(settings.system.log_level, settings.system.log_format)
    service = Service(settings, sockets=_activated_sockets(), config_file=_config_file(args))
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        code = runner.run(service.run())
    exit_if_loads_stuck(code)  # a load stuck in ONNX Runtime would abort the interpreter's teardown
    return code


def _activated_sockets() -> list[socket.socket] | None:
    """Sockets systemd passed in (appliance.socket, FileDescriptorName=http), if any."""
    from appliance.system.sdnotify import listen_fds

    fds = listen_fds()
    chosen = fds.get("http") or fds.get("unknown") or []
    return [socket.socket(fileno=fd) for fd in chosen] or None


def _config_file(args: argparse.Namespace) -> Path | None:
    from appliance.settings import SYSTEM_CONFIG_FILE

    if getattr(args, "config", None):
        return Path(args.config)
    return SYSTEM_CONFIG_FILE if SYSTEM_CONFIG_FILE.is_file() else None


def cmd_models_check(args: argparse.Namespace) -> int:
    """Load each model of DIR (no warm-up timing) and print its signature or why it fails."""
    from appliance.engine.bounds import request_bytes_limit
    from appliance.engine.model import LoadedModel
    from appliance.engine.repository import Repository
    from appliance.providers.registry import Registry

    settings = _settings(args)
    repository = Repository.open(args.directory)  # a missing folder is one line, exit 2
    registry = Registry.discover()
    configs = registry.configs(settings.providers)
    names = repository.names()
    if not names:
        print(f"no models in {args.directory}")
        return 1
    failures = 0
    report = []
    for name in names:
        try:
            model = LoadedModel.load(
                repository.source(name),
                registry=registry,
                settings=settings.models,
                provider_configs=configs,
                cache_dir=settings.system.cache_dir,
                threads_per_call=1,
                max_request_bytes=request_bytes_limit(settings.server),
            )
        except ApplianceError as exc:
            failures += 1
            report.append({"name": name, "state": "UNAVAILABLE", "reason": str(exc)})
            continue
        report.append(_describe_model(model))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for item in report:
            print(_format_model(item))
    return 1 if failures else 0


def _describe_model(model: Any) -> dict[str, Any]:
    from appliance.scheduler.view import ModelView

    view = ModelView.of_model(model)
    return {
        "name": view.name,
        "version": view.version,
        "state": view.state,
        "provider": view.provider,
        "precision": view.precision,
        "sha256": view.sha256,
        "max_batch_size": view.max_batch_size,
        "inputs": list(view.inputs),
        "outputs": list(view.outputs),
    }


def _format_model(item: dict[str, Any]) -> str:
    if item["state"] != "READY":
        return f"{item['name']}: UNAVAILABLE: {item['reason']}"
    lines = [
        f"{item['name']} v{item['version']}: READY on {item['provider']} ({item['precision']}, "
        f"max_batch_size {item['max_batch_size']})"
    ]
    for kind in ("inputs", "outputs"):
        for spec in item[kind]:
            lines.append(f"  {kind[:-1]:6} {spec['name']}: {spec['datatype']} {spec['shape']}")
    return "\n".join(lines)


def cmd_config_schema(args: argparse.Namespace) -> int:
    print(json.dumps(config_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    serve = verbs.add_parser(
        "serve",
        help="serve the model repository over HTTP (KServe v2)",
        description="Serve every model of the repository over HTTP (KServe v2) until SIGTERM.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config(serve)
    serve.add_argument(
        "--model-repository",
        type=Path,
        metavar="DIR",
        help=f"model repository folder (models.repository; default: the bundled models, {BUNDLED_MODELS})",
    )
    serve.add_argument("--host", help="listen address (server.host; default 127.0.0.1; 0.0.0.0 for the line)")
    serve.add_argument("--port", type=int, help="listen port (server.port; default 8000; 0 picks a free one)")
    serve.add_argument(
        "--grpc-port",
        type=int,
        metavar="PORT",
        help="KServe v2 gRPC port on the same host (server.grpc_port; default 8001 as Triton; 0 picks a "
        "free one; -1 turns gRPC off)",
    )
    serve.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="least severe level logged (system.log_level; default INFO)",
    )
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="text lines, or one JSON object per line for log shippers (system.log_format; default text)",
    )
    serve.set_defaults(func=cmd_serve)

    models = verbs.add_parser("models", help="inspect a model repository")
    model_verbs = models.add_subparsers(dest="models_verb", required=True, metavar="VERB")
    check = model_verbs.add_parser("check", help="load each model and print its signature or why it fails")
    _add_config(check)
    check.add_argument("directory", type=Path)
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(func=cmd_models_check)

    providers = verbs.add_parser(
        "providers", help="list execution providers, availability and the order used"
    )
    _add_config(providers)
    providers_report.add_arguments(providers)
    providers.set_defaults(func=lambda args: providers_report.run(args, _settings(args)))

    provision.add_arguments(
        verbs.add_parser("provision", help="install units, config and secrets into a root")
    )

    platform_cli.add_arguments(verbs)  # platform watch|submit|gateway|ledger|nodes; pool watch|submit

    benchmark.add_arguments(verbs)

    ota.add_arguments(
        verbs.add_parser("ota", help="update hooks: gate, drain, snapshot, verify, commit, rollback")
    )
    operator.add_arguments(verbs)  # status, reload, drain, resume over the admin socket

    schema = verbs.add_parser("config-schema", help="print the JSON Schema of the settings")
    schema.set_defaults(func=cmd_config_schema)
    return parser


def _loop_factory():
    """uvloop when installed (uvicorn[standard] brings it): a cheaper event loop per request."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ApplianceError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
