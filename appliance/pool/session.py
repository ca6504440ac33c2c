"""The pool `session` counter: persisted in the state directory, written atomically, only ever rising."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "pool-session"


class SessionCounter:
    """`take()` returns a number larger than any this node used before, and records it before use.

    A number is spent once a broker accepted a connection with it (`spend()`); until then the
    same number is offered again, so an outage of failed attempts does not wear the disk.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME
        self._current: int | None = None
        self._is_spent = True

    def take(self) -> int:
        if self._current is None or self._is_spent:
            self._current = self._read() + 1
            self._write(self._current)
            self._is_spent = False
        return self._current

    def spend(self) -> None:
        self._is_spent = True

    def _read(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            return self._recover(f"cannot be read ({exc})")
        if not text.isdigit():
            return self._recover(f"holds {text[:20]!r}, not a number")
        return int(text)

    def _recover(self, problem: str) -> int:
        # Wall-clock seconds outrun any counter a node reaches by connecting, so the session still rises.
        fallback = int(time.time())
        log.warning("pool session file %s %s; continuing from %d", self.path, problem, fallback)
        return fallback

    def _write(self, value: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=self.path.parent)
        try:
            with os.fdopen(descriptor, "w", encoding="ascii") as stream:
                stream.write(f"{value}\n")
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
