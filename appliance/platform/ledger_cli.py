"""`appliance platform ledger` (what was done, per node and model, for billing) and `platform nodes`."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError, InvalidInput

COLUMNS = (
    "node", "model", "jobs", "rows", "compute_s", "slo_met_pct", "canaries_passed", "canaries_failed",
    "flagged_jobs", "unbilled_answers",
)  # fmt: skip


def add_arguments(verbs: Any) -> None:
    ledger = verbs.add_parser(
        "ledger",
        help="jobs, rows, compute and checks per node and model, from the receipts ledger",
        description="Per node and per model: billed jobs, their rows, compute seconds and SLO met %, "
        "canaries passed and failed, flagged jobs (done since a check the node later failed) and "
        "answers recorded but not billed (canaries, second opinions, late duplicates, refused answers).",
    )
    _add_ledger(ledger)
    ledger.add_argument("--since", metavar="T", help="from this ISO 8601 time (UTC if it names no zone)")
    ledger.add_argument("--until", metavar="T", help="up to this ISO 8601 time, exclusive")
    shape = ledger.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="one JSON document")
    shape.add_argument("--csv", action="store_true", help="CSV with a header row, for billing")
    ledger.set_defaults(func=run_ledger)

    nodes = verbs.add_parser("nodes", help="nodes' pinned keys and quarantine; trust a node's new key")
    node_verbs = nodes.add_subparsers(dest="nodes_verb", required=True, metavar="VERB")
    listing = node_verbs.add_parser("list", help="every node the ledger knows: key, quarantine")
    _add_ledger(listing)
    listing.add_argument("--json", action="store_true", help="one JSON document")
    listing.set_defaults(func=run_list)
    trust = node_verbs.add_parser("trust", help="accept the new device key a node offers (after a rotation)")
    _add_ledger(trust)
    trust.add_argument("node", metavar="NODE", help="site/node, or node alone when no other site has it")
    trust.set_defaults(func=run_trust)


def _add_ledger(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ledger", metavar="URL", help="SQLite file path or postgresql://... (default: "
                        "[ledger] url of --config, else <gateway.state_dir>/ledger.sqlite3)")  # fmt: skip
    parser.add_argument("--config", type=Path, help="the gateway's TOML settings file")


def open_ledger(args: argparse.Namespace) -> Any:
    try:
        from appliance.platform.ledger import Ledger
    except ImportError as exc:
        raise ConfigError(
            f"the ledger needs the platform extra: pip install 'appliance[platform]' ({exc})"
        ) from exc
    from appliance.platform.settings import PlatformSettings

    overrides = {"ledger": {"url": args.ledger}} if args.ledger else {}
    settings = PlatformSettings.load(args.config, overrides=overrides)
    url = settings.ledger.url or str(settings.gateway.state_dir / "ledger.sqlite3")
    if "://" not in url and not Path(url).expanduser().is_file():
        raise ConfigError(f"ledger {url}: no such file (--ledger names it)")
    return Ledger.open(url, is_writer=False)


def parse_time(value: str | None, flag: str) -> int | None:
    """Milliseconds since the epoch of an ISO 8601 time; a time with no zone is UTC."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(
            f"{flag} {value!r}: expected an ISO 8601 time such as 2025-06-01T00:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def run_ledger(args: argparse.Namespace) -> int:
    from appliance.platform.report import summary

    since_ms, until_ms = parse_time(args.since, "--since"), parse_time(args.until, "--until")
    if since_ms is not None and until_ms is not None and until_ms <= since_ms:
        raise InvalidInput(f"--until {args.until!r} is not after --since {args.since!r}")
    ledger = open_ledger(args)
    try:
        rows = summary(ledger, since_ms, until_ms)
    finally:
        ledger.close()
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elif args.json:
        print(
            json.dumps(
                {"ledger": ledger.url, "since": args.since, "until": args.until, "rows": rows}, indent=2
            )
        )
    else:
        print(_table([dict(zip(COLUMNS, COLUMNS, strict=True)), *rows], COLUMNS))
    return 0


def run_list(args: argparse.Namespace) -> int:
    ledger = open_ledger(args)
    try:
        records = ledger.nodes()
    finally:
        ledger.close()
    found = [
        {"node": r.node, "public_key": r.public_key, "offered_key": r.offered_key, "quarantine": r.quarantine,
         "quarantine_kind": r.quarantine_kind, "last_passed_ms": r.last_passed_ms}
        for r in records
    ]  # fmt: skip
    if args.json:
        print(json.dumps({"nodes": found}, indent=2))
    else:
        names = ("node", "public_key", "offered_key", "quarantine")
        print(_table([dict(zip(names, names, strict=True)), *found], names))
    return 0


def run_trust(args: argparse.Namespace) -> int:
    ledger = open_ledger(args)
    try:
        names = [record.node for record in ledger.nodes()]
        node = args.node if "/" in args.node else _only(args.node, names)
        before = next((record for record in ledger.nodes() if record.node == node), None)
        record = ledger.trust(node)
    finally:
        ledger.close()
    print(f"{record.node}: key {record.public_key} trusted (was {before.public_key if before else '-'})")
    return 0


def _only(name: str, nodes: list[str]) -> str:
    found = [node for node in nodes if node.rpartition("/")[2] == name]
    if len(found) != 1:
        where = "no site has it" if not found else f"several sites have it: {', '.join(found)}"
        raise ConfigError(f"node {name!r}: {where}; name it as site/node")
    return found[0]


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    cells = [["-" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )
