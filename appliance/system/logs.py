"""Service logging: one handler on stderr, text or JSON lines, journald's priorities, no duplicates."""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from typing import IO, Any

import orjson

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Under journald the journal stamps time and host itself; a "<N>" prefix gives each line its level.
JOURNAL_TEXT = "%(name)s: %(message)s"
_SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
# Attributes every LogRecord has; anything else on a record came from `extra=` and goes into JSON.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# Libraries whose own handlers would print a second copy of their lines.
_PROPAGATED = ("uvicorn", "uvicorn.error", "uvicorn.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, any extra fields, and the
    exception with its traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(document, default=str).decode()


class JournalFormatter(logging.Formatter):
    """`<priority>logger: message`, which journald stores with that priority."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_TEXT)

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelname, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def configure(level: str, log_format: str = "text", stream: IO[str] | None = None) -> None:
    """Route every record (ours, uvicorn's, asyncio's) through one handler on `stream` (stderr)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif is_journal(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _PROPAGATED:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True


def quiet_uvicorn() -> None:
    """After uvicorn.Config set its loggers' levels: its start-up chatter repeats our own lines
    (warnings and errors still show), while its access lines follow the service's level."""
    logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.getLogger("uvicorn.access").setLevel(logging.NOTSET)


def is_journal(stream: IO[str]) -> bool:
    """Whether `stream` is the journal systemd connected (JOURNAL_STREAM names its device:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(expected) and expected == f"{st.st_dev}:{st.st_ino}"
