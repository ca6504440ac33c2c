"""`appliance bench MODEL`: this box's throughput and latency curve for one model, against raw ONNX
Runtime, and the capacity the box would offer the pool; an installer runs it before joining."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from appliance.engine.baseline import raw_rows_per_s
from appliance.engine.repository import MODEL_FILE, Repository
from appliance.errors import ConfigError
from appliance.ota.link import ServiceLink
from appliance.providers.registry import Registry
from appliance.scheduler import bench
from appliance.scheduler.hub import ModelHub
from appliance.scheduler.view import ModelView
from appliance.settings import Settings
from appliance.system import cpu


def add_arguments(verbs: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = verbs.add_parser(
        "bench",
        help="measure a model's throughput and latency on this box, and the capacity it would offer",
        description=__doc__,
    )
    parser.add_argument(
        "model", help="a model of the repository (models.repository), a model folder, or a .onnx"
    )
    parser.add_argument(
        "--config", type=Path, help="TOML settings file (default /etc/appliance/appliance.toml)"
    )
    parser.add_argument("--duration-s", type=float, default=3.0, help="seconds per level (default 3)")
    parser.add_argument(
        "--clients",
        default=",".join(map(str, bench.LEVELS)),
        help="closed-loop clients per level (1,2,4,...)",
    )
    parser.add_argument(
        "--force", action="store_true", help="run even beside a live service (it takes its cores)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.load(args.config)
    levels = _levels(args.clients)
    if not 0 < args.duration_s <= 600:
        raise ConfigError(f"--duration-s must be in (0, 600], got {args.duration_s}")
    status = None if args.force else ServiceLink.from_settings(settings).status()
    if status is not None:
        raise ConfigError(
            f"appliance is serving here (pid {status.get('pid')}): bench would take the line's cores; "
            "stop the service, or pass --force"
        )
    with tempfile.TemporaryDirectory(prefix="appliance-bench-") as scratch:
        repository, name = _resolve(args.model, settings, Path(scratch))
        report = asyncio.run(_measure(settings, repository, name, levels, args.duration_s, args.json))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report, sys.stdout)
    return 0


async def _measure(
    settings: Settings, repository: Repository, name: str, levels: list[int], duration_s: float, quiet: bool
) -> dict[str, Any]:
    hub = ModelHub(settings, Registry.discover(), repository)
    bar = _Bar(sys.stderr, enabled=not quiet)
    bar("loading and warming up", 0.0)
    try:
        entry = await hub.load(name)
        if entry.scheduler is None:
            raise ConfigError(f"model {name!r} cannot be served: {entry.reason}")
        scheduler = entry.scheduler
        inputs = scheduler.model.example_inputs(1)
        if inputs is None:
            raise ConfigError(
                f"model {name!r} has dynamic non-batch dimensions: set input shapes in model.toml"
            )
        hub.is_loaded = True
        _observe_cpu(hub)  # the capacity's CPU budget: what the requests cost beyond ORT's compute
        points = await bench.curve(
            scheduler,
            inputs,
            levels=levels,
            duration_s=duration_s,
            progress=lambda done, what: bar(what, done),
        )
        _observe_cpu(hub)
        bar("raw ONNX Runtime", 1.0)
        raw = await asyncio.to_thread(raw_rows_per_s, scheduler.model, inputs)
        view = ModelView.of(entry)
        offer = bench.offer(scheduler, settings.pool.reserved_pct / 100.0)
    finally:
        await hub.close()
        bar.close()
    best = max((p.rows_per_s for p in points), default=0.0)
    return {
        "model": name,
        "version": view.version,
        "provider": view.provider,
        "precision": view.precision,
        "instances": view.instances,
        "curve": [p.as_dict() for p in points],
        "raw_ort": {k: round(v, 1) if isinstance(v, float) else v for k, v in raw.items()},
        "best_over_raw": round(best / raw["rows_per_s"], 3) if raw.get("rows_per_s") else None,
        "offer": offer,
    }


def _observe_cpu(hub: ModelHub) -> None:
    counters = cpu.sample()
    hub.observe_cpu(counters.wall_s, counters.own_cpu_s, counters.thread_cpu_s, counters.busy_cpu_s)


def _resolve(model: str, settings: Settings, scratch: Path) -> tuple[Repository, str]:
    """The repository and name to load: a .onnx file, a model folder, or a repository model's name."""
    path = Path(model)
    if path.is_file():
        folder = scratch / (path.stem if path.name != MODEL_FILE else path.parent.name or "model")
        (folder / "1").mkdir(parents=True)
        (folder / "1" / MODEL_FILE).symlink_to(path.resolve())
        return Repository(scratch), folder.name
    if path.is_dir():
        repository = Repository(path.resolve().parent)
        if repository.has(path.resolve().name):
            return repository, path.resolve().name
        raise ConfigError(f"{path} is not a model folder (<model>/<version>/model.onnx or model.toml)")
    repository = Repository.open(settings.models.repository)
    if not repository.has(model):
        known = ", ".join(repository.names()) or "none"
        raise ConfigError(
            f"no model {model!r} in {settings.models.repository} (models: {known}), and no such path"
        )
    return repository, model


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or any(not 1 <= level <= 256 for level in levels):
        raise ConfigError(f"--clients must be a comma-separated list of counts in [1, 256], got {text!r}")
    return levels


class _Bar:
    """A one-line progress bar on a terminal; one line per step elsewhere (a log, a pipe)."""

    WIDTH = 30

    def __init__(self, stream: TextIO, *, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.is_tty = stream.isatty()

    def __call__(self, what: str, done: float) -> None:
        if not self.enabled:
            return
        filled = int(self.WIDTH * done)
        line = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done * 100:3.0f}% {what}"
        self.stream.write(f"\r{line:<70}" if self.is_tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.is_tty:
            self.stream.write("\n")


def _print(report: dict[str, Any], out: TextIO) -> None:
    raw = report["raw_ort"]
    out.write(
        f"{report['model']} v{report['version']} on {report['provider']} ({report['precision']}, "
        f"{report['instances']} instance(s))\n"
    )
    out.write(f"{'clients':>7}  {'rows/s':>9}  {'/ raw':>6}  {'p50 ms':>8}  {'p99 ms':>8}  {'refused':>7}\n")
    for point in report["curve"]:
        ratio = point["rows_per_s"] / raw["rows_per_s"] if raw.get("rows_per_s") else float("nan")
        out.write(
            f"{point['clients']:>7}  {point['rows_per_s']:>9.1f}  {ratio:>6.2f}  {point['p50_ms']:>8.2f}  "
            f"{point['p99_ms']:>8.2f}  {point['refused']:>7}\n"
        )
    out.write(
        f"raw ONNX Runtime: {raw['rows_per_s']:.1f} rows/s ({raw.get('threads')} thread(s) x "
        f"{raw.get('callers')} caller(s), batch {raw.get('batch_rows')})\n"
    )
    offer = report["offer"]
    out.write(
        f"capacity at the SLO ({offer['slo_p99_ms']:g} ms p99): {offer['max_ips_at_slo']:.1f} inferences/s; "
        f"offered to the pool with the line idle: {offer['spare_ips_at_slo_if_line_idle']:.1f} "
        f"({offer['reserved_pct']:g}% kept for the line)\n"
    )
