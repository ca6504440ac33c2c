"""`appliance platform watch|submit|gateway` (and `appliance pool watch|submit`, their old names)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, InvalidInput

PRINTED_ELEMENTS = 16  # of each output, unless --full


def add_arguments(verbs: Any) -> None:
    """Add `platform` (watch, submit, gateway, ledger, nodes) and its alias `pool` (watch, submit)."""
    platform = verbs.add_parser(
        "platform", help="platform side: gateway, receipts ledger, nodes' keys, watch the pool, submit a job"
    )
    platform_verbs = platform.add_subparsers(dest="platform_verb", required=True, metavar="VERB")
    _add_tools(platform_verbs)
    from appliance.platform import ledger_cli, service

    service.add_arguments(platform_verbs)
    ledger_cli.add_arguments(platform_verbs)
    pool = verbs.add_parser("pool", help="the same as `appliance platform watch|submit`")
    _add_tools(pool.add_subparsers(dest="pool_verb", required=True, metavar="VERB"))


def _add_tools(tool_verbs: Any) -> None:
    watch = tool_verbs.add_parser("watch", help="live table of nodes, state and spare capacity per model")
    _add_connection(watch, is_required=False)
    watch.add_argument("--gateway", metavar="URL", help="show this gateway's view (GET /v2/pool/nodes)")
    watch.add_argument("--token-file", type=Path, help="file holding a bearer token for --gateway")
    watch.add_argument("--group", help="ingest as a member of this MQTT 5 shared-subscription group")
    watch.add_argument("--interval-s", type=float, default=1.0, help="table refresh period (default 1 s)")
    watch.add_argument("--once", action="store_true", help="print the table of retained state and exit")
    watch.add_argument("--json", action="store_true", help="print every message as a JSON line (ingest)")
    watch.set_defaults(func=run_watch)

    submit = tool_verbs.add_parser("submit", help="send a job to the node with the most spare capacity")
    _add_connection(submit)
    submit.add_argument("--model", required=True, help="model name")
    submit.add_argument(
        "--input", action="append", required=True, metavar="[NAME=]FILE.npy",
        help="input tensor; NAME may be left out for a model with one input; repeat for several",
    )  # fmt: skip
    submit.add_argument("--timeout-s", type=float, default=30.0, help="job expiry and wait (default 30 s)")
    submit.add_argument("--output", type=Path, help="also save the outputs, whole, to this .npz file")
    submit.add_argument(
        "--full", action="store_true",
        help=f"print every element of every output (default: the first {PRINTED_ELEMENTS} of each, and "
        "how many were left out)",
    )  # fmt: skip
    submit.set_defaults(func=run_submit)


def _add_connection(parser: argparse.ArgumentParser, *, is_required: bool = True) -> None:
    parser.add_argument("--broker", required=is_required, help="mqtt://host[:port] or mqtts://host[:port]")
    parser.add_argument("--topic-root", default="ecp/v1", help="topic levels before <site>/<node>/")
    parser.add_argument("--site", default="+", help="only this site (default: all)")
    parser.add_argument("--username", help="MQTT user name")
    parser.add_argument("--password-file", type=Path, help="file holding the MQTT password")
    parser.add_argument("--ca-file", type=Path, help="CA bundle for mqtts://")
    parser.add_argument("--cert-file", type=Path, help="client certificate for mutual TLS")
    parser.add_argument("--key-file", type=Path, help="client private key for mutual TLS")


def _client(args: argparse.Namespace) -> Any:
    from appliance.platform.client import PlatformClient
    from appliance.pool.wire import Broker, Security

    password = _read_secret(args.password_file, "--password-file") if args.password_file else None
    broker = Broker.parse(args.broker)
    security = Security.build(broker, args.username, password, args.ca_file, args.cert_file, args.key_file)
    return PlatformClient(args.broker, security=security)


def _read_secret(path: Path, flag: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise InvalidInput(f"{flag} {path}: {exc.strerror}") from exc


def run_watch(args: argparse.Namespace) -> int:
    from appliance.platform.watch import watch, watch_gateway

    if args.gateway:
        token = _read_secret(args.token_file, "--token-file") if args.token_file else None
        return watch_gateway(
            args.gateway, token=token, interval_s=args.interval_s, once=args.once, as_json=args.json
        )
    if not args.broker:
        raise InvalidInput("watch needs --broker URL (what the broker carries) or --gateway URL")
    with _client(args) as client:
        try:
            return watch(
                client, root=args.topic_root, site=args.site, group=args.group, interval_s=args.interval_s,
                once=args.once, as_json=args.json,
            )  # fmt: skip
        except KeyboardInterrupt:
            return 0


def run_submit(args: argparse.Namespace) -> int:
    import numpy as np

    from appliance.platform.submit import submit

    inputs = {}
    for item in args.input:
        name, _, path = item.rpartition("=")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"--input {item}: not a readable .npy file ({exc})") from exc
    with _client(args) as client:
        result = submit(
            client,
            root=args.topic_root,
            model=args.model,
            inputs=inputs,
            site=args.site,
            timeout_s=args.timeout_s,
        )
    if args.output is not None:
        try:
            np.savez(args.output, **result.outputs)
        except OSError as exc:
            raise InvalidInput(f"--output {args.output}: cannot be written ({exc.strerror})") from exc
    document = {
        "node": result.node.name,
        "model": args.model,
        "latency_ms": round(result.latency_ms, 2),
        "outputs": {
            name: printed_output(array, is_full=args.full, saved_to=args.output)
            for name, array in result.outputs.items()
        },
    }
    print(json.dumps(document, indent=2))
    return 0


def printed_output(array: Any, *, is_full: bool, saved_to: Path | None) -> dict[str, Any]:
    """How `submit` prints one output: its data whole, or the first PRINTED_ELEMENTS elements (row-major)
    and an `elided` note saying how many were left out and where the whole output is."""
    flat = array.reshape(-1)
    shown = flat if is_full else flat[:PRINTED_ELEMENTS]
    printed: dict[str, Any] = {
        "datatype": str(array.dtype),
        "shape": list(array.shape),
        "data": [_printable(value) for value in shown.tolist()],
    }
    elided = flat.size - shown.size
    if elided:
        where = (
            f"the whole output is in {saved_to}"
            if saved_to is not None
            else "pass --output FILE.npz to save it whole, or --full to print it"
        )
        printed["elided"] = (
            f"{elided} of {flat.size} elements not shown (data holds the first {shown.size}, row-major); "
            f"{where}"
        )
    return printed


def _printable(value: Any) -> Any:
    """A BYTES element as text (undecodable bytes escaped), anything else as numpy's tolist gives it."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def main(argv: Sequence[str] | None = None, *, verb: str = "platform") -> int:
    """`python -m appliance.platform.cli watch|submit|gateway ...` (the same as `appliance platform ...`)."""
    parser = argparse.ArgumentParser(prog="appliance")
    add_arguments(parser.add_subparsers(dest="verb", required=True, metavar="VERB"))
    args = parser.parse_args([verb, *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except ApplianceError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
