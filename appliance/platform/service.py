"""`appliance platform gateway`: settings from flags, file, environment and credentials; run until stopped."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def add_arguments(verbs: Any) -> None:
    gateway = verbs.add_parser(
        "gateway",
        help="sell the pool's capacity to buyers: KServe v2 over HTTP, jobs over MQTT",
        description="Serve buyers (KServe v2) on the pool's spare capacity until SIGTERM. Settings: "
        "--config TOML ([gateway], [ledger], [canary]) < $CREDENTIALS_DIRECTORY/gateway.password < "
        "APPLIANCE_GATEWAY__<KEY> variables < these flags.",
    )
    gateway.add_argument("--config", type=Path, help="TOML settings file")
    gateway.add_argument("--broker", help="mqtt://host[:port] or mqtts://host[:port] (gateway.broker)")
    gateway.add_argument("--host", help="buyer API address (gateway.host; default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="buyer API port (gateway.port; default 8100; 0 picks one)")
    gateway.add_argument("--catalogue", type=Path, help="TOML catalogue of models buyers may call")
    gateway.add_argument("--buyers", type=Path, help="TOML of buyers' token digests and quotas")
    gateway.add_argument("--ledger", help="receipts ledger: a SQLite file path or postgresql://...")
    gateway.add_argument(
        "--log-level", type=str.upper, default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    gateway.set_defaults(func=run_gateway)


def settings_from(args: argparse.Namespace) -> Any:
    from appliance.platform.settings import PlatformSettings

    gateway: dict[str, Any] = {}
    for flag, key in (
        ("broker", "broker"),
        ("host", "host"),
        ("port", "port"),
        ("catalogue", "catalogue"),
        ("buyers", "buyers_file"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            gateway[key] = value
    overrides: dict[str, Any] = {"gateway": gateway}
    if getattr(args, "ledger", None):
        overrides["ledger"] = {"url": args.ledger}
    return PlatformSettings.load(args.config, overrides=overrides)


def run_gateway(args: argparse.Namespace) -> int:
    from appliance.errors import ConfigError
    from appliance.system import logs

    try:
        from appliance.platform.gateway import Gateway
    except ImportError as exc:
        raise ConfigError(
            f"the gateway needs the platform extra: pip install 'appliance[platform]' ({exc})"
        ) from exc

    settings = settings_from(args)
    logs.configure(args.log_level, "text")
    open_files_for(settings.gateway.max_connections)
    gateway = Gateway(settings)
    _freeze_startup_heap()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(gateway.run())


# Files besides buyer connections: the listening socket, the broker link, the ledger, logs, the loop's own.
OTHER_FILES = 64


def open_files_for(max_connections: int) -> int:
    """Raise this process's open-files limit (RLIMIT_NOFILE, systemd's LimitNOFILE=, 1024 by default) as
    far as its hard limit allows towards what `max_connections` needs: each buyer connection is a file,
    and so is each refused one while it lingers to deliver its 503. Below that, accepting fails (EMFILE)
    before gateway.max_connections refuses anyone, and so may the broker link's reconnection. Returns the
    limit now in force; a warning says when it is short."""
    needed = 2 * max_connections + OTHER_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if wanted > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open files limited to %d, below the %d that gateway.max_connections = %d needs: connections "
            "fail (EMFILE) before the limit refuses them; raise LimitNOFILE= or lower max_connections",
            soft,
            needed,
            max_connections,
        )
    return soft


def _freeze_startup_heap() -> None:
    """Take what was built at start (modules, the app, settings: about 115,000 objects) out of the
    cyclic collector's sight. Every full collection scanned all of it: 90-150 ms with the gateway
    stopped, a few times a minute at 250 jobs/s: most of dispatch's p99 (bench/swarm.py).
    Those objects live as long as the process; reference counting still frees any of them let go."""
    gc.collect()
    gc.freeze()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (uvicorn[standard] brings it), as `appliance serve` runs. On its own it
    made no difference measurable on bench/swarm.py; the gateway's time is in Python, not the loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
