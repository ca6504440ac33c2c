"""The running service as `appliance ota` reaches it: the admin socket, or the fact that none listens."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from appliance.settings import Settings
from appliance.system.admin import AdminError, admin_request
from appliance.text import printable

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 10.0
RELOAD_TIMEOUT_S = 900.0  # a reload warms every model up again; a TensorRT build can take minutes


class NotRunning(AdminError):
    """Nothing listens on the admin socket: the service is stopped, starting, or never ran here."""


class ServiceLink:
    """Blocking calls to the admin socket; NotRunning when no service answers, AdminError otherwise.

    The socket is found from the same settings the service reads (`system.admin_socket`, else
    `<system.runtime_dir>/admin.sock`). The first status names the instance in the log. What a
    reply says is the service's word: the verbs read it, but never act on a path it names.
    """

    def __init__(self, socket_path: Path | None) -> None:
        self.socket_path = socket_path
        self._has_named_instance = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceLink:
        return cls(settings.system.admin_socket_path)

    def status(self) -> dict[str, Any] | None:
        """The service's status document (see Control.status), or None when it is not running."""
        try:
            status = self._request("status", {}, STATUS_TIMEOUT_S)
        except NotRunning:
            return None
        if not self._has_named_instance:
            self._has_named_instance = True
            log.info("talking to %s", describe_instance(status, self.socket_path))
        return status

    def drain(self, timeout_s: float, reason: str) -> dict[str, Any]:
        """Stop admitting and wait up to `timeout_s`; {"drained": bool, "inflight": int}."""
        return self._request(
            "drain", {"timeout_s": timeout_s, "reason": reason}, timeout_s + STATUS_TIMEOUT_S
        )

    def resume(self) -> dict[str, Any]:
        return self._request("resume", {}, STATUS_TIMEOUT_S)

    def reload(self) -> dict[str, Any]:
        """Reload every model from the repository; {"models": {name: {"state", "version", "reason"}}}."""
        return self._request("reload", {}, RELOAD_TIMEOUT_S)

    def _request(self, verb: str, args: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if self.socket_path is None:
            raise AdminError(
                'the admin socket is turned off (system.admin_socket = ""); nothing can reach the service'
            )
        try:
            return admin_request(self.socket_path, verb, args, timeout_s=timeout_s)
        except AdminError as exc:
            if isinstance(exc.__cause__, FileNotFoundError | ConnectionRefusedError):
                raise NotRunning(str(exc)) from exc.__cause__
            raise


def describe_instance(status: dict[str, Any], socket_path: Path | None) -> str:
    """`appliance pid 42 (config /etc/appliance/appliance.toml, http://127.0.0.1:8000) on <socket>`.

    The fields are the service's word and go into root's hook log: control characters are escaped,
    so that a newline in them cannot forge a line (a verdict) of that log.
    """
    http = status.get("http") if isinstance(status.get("http"), dict) else {}
    address = (
        f"http://{printable(http.get('host'))}:{printable(http.get('port'))}" if http else "no HTTP address"
    )
    config = printable(status.get("config_file") or "no config file")
    return f"appliance pid {printable(status.get('pid'))} ({config}, {address}) on admin socket {socket_path}"
