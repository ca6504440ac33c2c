"""The running service as `appliance ota` reaches it: the admin socket, or the fact that none listens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.system.admin import AdminError, admin_request, admin_socket_path

STATUS_TIMEOUT_S = 10.0
RELOAD_TIMEOUT_S = 900.0  # a reload warms every model up again; a TensorRT build can take minutes


class NotRunning(AdminError):
    """Nothing listens on the admin socket: the service is stopped, starting, or never ran here."""


class ServiceLink:
    """Blocking calls to the admin socket; NotRunning when no service answers, AdminError otherwise."""

    def __init__(self, runtime_dir: Path) -> None:
        self.socket_path = admin_socket_path(runtime_dir)

    def status(self) -> dict[str, Any] | None:
        """The service's status document (see Control.status), or None when it is not running."""
        try:
            return self._request("status", {}, STATUS_TIMEOUT_S)
        except NotRunning:
            return None

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
        try:
            return admin_request(self.socket_path, verb, args, timeout_s=timeout_s)
        except AdminError as exc:
            if isinstance(exc.__cause__, FileNotFoundError | ConnectionRefusedError):
                raise NotRunning(str(exc)) from exc.__cause__
            raise
