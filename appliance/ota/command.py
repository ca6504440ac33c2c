"""`appliance ota VERB`: its arguments, its logging to stderr, and the exit code hooks read."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from appliance.config_sources import ignoring_unit_directories
from appliance.errors import ApplianceError
from appliance.ota import verbs
from appliance.settings import SYSTEM_CONFIG_FILE, Settings
from appliance.text import printable

log = logging.getLogger(__name__)

VERBS: dict[str, Callable[[Settings, Path | None], int]] = {
    "gate": verbs.gate,
    "drain": verbs.drain,
    "snapshot": verbs.take_snapshot,
    "verify": verbs.verify,
    "commit": verbs.commit,
    "rollback": verbs.rollback,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `appliance ota`; sets `func` to `run` for the CLI's dispatch."""
    parser.set_defaults(func=run)
    parser.add_argument(
        "ota_verb",
        choices=list(VERBS),
        metavar="VERB",
        help="gate (may an update start?), drain, snapshot, verify, commit or rollback",
    )
    parser.add_argument(
        "--config", type=Path, help="TOML settings file (default /etc/appliance/appliance.toml)"
    )


def run(args: argparse.Namespace) -> int:
    """Run one verb: 0 done, 75 not now (try later), 1 failed; the reasons go to stderr."""
    logger = logging.getLogger("appliance")
    handler, level = _StderrHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    verb = args.ota_verb
    try:
        # The update agent's unit may have a RuntimeDirectory= or StateDirectory= of its own, which
        # systemd hands to this hook as $RUNTIME_DIRECTORY / $STATE_DIRECTORY: the service's folders
        # come from the settings (and where provisioning puts them), never from those variables.
        with ignoring_unit_directories():
            settings = Settings.load(args.config)
        logger.setLevel(settings.system.log_level)
        # The config file the service reads, and the only one a rollback may write: never one named
        # by the service's status or by a record the service user could have written.
        config_file = args.config or SYSTEM_CONFIG_FILE
        return VERBS[verb](settings, config_file)
    except (ApplianceError, OSError) as exc:
        log.error("ota %s failed: %s", verb, exc)
        return verbs.EX_FAILED
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines for the hook's log (the journal, Mender's deployment log): `appliance ota: LEVEL text`."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("appliance ota: %(levelname)s %(message)s"))

    def format(self, record: logging.LogRecord) -> str:
        """One line per record: what the service's status says cannot start a line of its own."""
        return printable(super().format(record))
