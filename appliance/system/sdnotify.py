"""The service side of systemd's notify and socket-activation protocols, with no dependency."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): inherited sockets start at fd 3


class Notifier:
    """Sends sd_notify(3) messages to $NOTIFY_SOCKET; without one, every method does nothing.

    Sending never raises: a vanished or full socket is logged once and the call returns False,
    because the service must keep serving even when the manager cannot hear it.
    """

    def __init__(self, address: str | None = None, *, watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(address) if address else None
        self._display = address
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._has_warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> Notifier:
        """Build from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID; `environ` defaults to os.environ."""
        environ = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        address = environ.get("NOTIFY_SOCKET") or None
        try:
            return cls(address, watchdog_usec=_watchdog_usec(environ, pid))
        except ValueError as exc:  # e.g. vsock: addresses (systemd 253+); serve rather than die
            logger.warning("not notifying systemd: %s", exc)
            return cls(None)

    @property
    def is_enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """READY=1: every model is loaded and warm and the API accepts requests."""
        return self.notify("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: send only while the event loop and every worker are alive."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1; send ready() when done. MONOTONIC_USEC is what Type=notify-reload (253+) needs."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", *_status(status))

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for `seconds` more to start or stop (a long model warm-up)."""
        if seconds <= 0:
            raise ValueError(f"extend_timeout needs a positive number of seconds, got {seconds}")
        return self.notify(f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}")

    def watchdog_interval_s(self) -> float | None:
        """How often to send watchdog(): half of WatchdogSec=, as sd_watchdog_enabled(3) advises.

        None when the manager expects no keep-alive pings from this process.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, *fields: str) -> bool:
        """Send KEY=VALUE fields as one datagram; True if it left, False if disabled or failed."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)  # never stall the event loop on a full queue
            self._socket.sendto(payload, self._address)
        except OSError as exc:
            if not self._has_warned:
                self._has_warned = True
                logger.warning(
                    "sd_notify to %s failed (%s); further failures are not logged", self._display, exc
                )
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def listen_fds(environ: Mapping[str, str] | None = None, *, pid: int | None = None) -> dict[str, list[int]]:
    """Sockets systemd passed to this process (LISTEN_FDS), by FileDescriptorName= ("unknown" unset).

    The descriptors are made non-inheritable, as sd_listen_fds(3) does. Empty when the variables
    are absent or meant for another process (LISTEN_PID).
    """
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    if environ.get("LISTEN_PID") != str(pid):
        return {}
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        logger.warning("ignoring LISTEN_FDS=%r: not a number", environ.get("LISTEN_FDS"))
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    found: dict[str, list[int]] = {}
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) and names[index] else "unknown"
        found.setdefault(name, []).append(fd)
    return found


def _socket_address(address: str) -> str | bytes:
    if address.startswith("@"):  # abstract namespace: a leading NUL byte instead of the '@'
        return b"\0" + address[1:].encode()
    if not address.startswith("/"):
        raise ValueError(f"NOTIFY_SOCKET={address!r}: expected an absolute path or an @abstract name")
    return address


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        logger.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", raw)
        return None
    return usec if usec > 0 else None


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.splitlines()),)
