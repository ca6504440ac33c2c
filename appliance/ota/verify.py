"""`ota verify`'s two halves: wait (bounded) for a ready service, then measure and judge it."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.ota import golden
from appliance.ota.checks import Finding, Tolerance, judge
from appliance.ota.link import ServiceLink
from appliance.ota.snapshot import digests_on_disk
from appliance.ota.store import OtaError, Store
from appliance.settings import Settings
from appliance.system.provision import CREDSTORE

log = logging.getLogger(__name__)

# Where `appliance provision --api-token-file` puts the token (mode 0600, root's) for LoadCredential=.
CREDSTORE_TOKEN = Path("/", CREDSTORE, "appliance.server.api_token")
MAX_TOKEN_BYTES = 4096
POLL_S = 0.5  # between status requests while the service starts; each costs one admin round trip


@dataclass(frozen=True, slots=True)
class Waited:
    """The last status seen (None: the service never answered) and whether it was ready."""

    status: dict[str, Any] | None
    is_ready: bool


def wait_until_ready(
    link: ServiceLink,
    store: Store,
    wait_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Waited:
    """Poll the status until the service is ready or `wait_s` passed.

    A service that `ota drain` left draining (the drain marker names its pid) is resumed: after an
    in-place update nothing else would, and it cannot be verified without serving.
    """
    deadline_s = clock() + wait_s
    has_resumed = False
    while True:
        status = link.status()
        if status is not None and status.get("state") == "ready":
            return Waited(status, True)
        if status is not None and not has_resumed and _is_our_drain(status, store):
            log.info("resuming the service `ota drain` left draining (pid %s) to verify it", status["pid"])
            link.resume()
            has_resumed = True
            _forget_drain(store)
            continue
        if clock() >= deadline_s:
            return Waited(status, False)
        sleep(min(POLL_S, max(0.0, deadline_s - clock())))


def _is_our_drain(status: dict[str, Any], store: Store) -> bool:
    return status.get("state") == "draining" and store.drained_pid() == status.get("pid")


def _forget_drain(store: Store) -> None:
    try:
        store.clear_drained()
    except OtaError as exc:  # the health check's state dir is read-only; commit removes it later
        log.info("drain marker kept: %s", exc)


def is_still_starting(status: dict[str, Any] | None, grace_s: float, boot_uptime_s: float) -> bool:
    """Whether a service not ready yet may still come up: the service, or the box if none answers,
    has been up for less than `grace_s`."""
    uptime_s = float(status.get("uptime_s", 0.0)) if status is not None else boot_uptime_s
    return uptime_s < grace_s


def boot_uptime_s() -> float:
    """Seconds since the box booted, suspend included."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def inspect(status: dict[str, Any], snapshot: dict[str, Any] | None, settings: Settings) -> list[Finding]:
    """Run the golden samples, read the digests on disk and judge the service against the snapshot.

    The repository is the verb's own setting, not the one the status names.
    """
    options = settings.ota
    repository = settings.models.repository
    runs = golden.run_all(
        status,
        repository,
        host=settings.server.host,
        api_token=api_token(settings),
        timed_requests=options.verify_timed_requests,
    )
    serving = [name for name, model in status.get("models", {}).items() if model.get("state") == "READY"]
    on_disk = digests_on_disk(repository, serving)
    tolerance = Tolerance(options.verify_latency_growth_pct, options.verify_latency_slack_ms)
    return judge(status, snapshot, runs, on_disk, tolerance)


def api_token(settings: Settings) -> str | None:
    """The API token the golden requests send.

    The service gets it from LoadCredential=; the update frameworks' hooks (Mender, SWUpdate,
    RAUC) run as root without $CREDENTIALS_DIRECTORY, so root reads the provisioned credential from
    the credstore itself (see credstore_token) rather than have every golden request refused.
    """
    if settings.server.api_token:
        return settings.server.api_token.get_secret_value()
    if os.geteuid() == 0 and "CREDENTIALS_DIRECTORY" not in os.environ:
        return credstore_token(CREDSTORE_TOKEN)
    return None


def credstore_token(path: Path) -> str | None:
    """The token in `path`, None when there is none; OtaError unless it is a regular file, not a
    symlink, owned by root, readable by no one else and at most MAX_TOKEN_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OtaError(f"API token credential {path}: cannot be opened ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as stream:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OtaError(f"API token credential {path} is not a regular file")
        if st.st_uid != 0 or st.st_mode & 0o077:
            raise OtaError(
                f"API token credential {path} is owned by uid {st.st_uid} with mode "
                f"{stat.S_IMODE(st.st_mode):04o}; expected root's, readable by root only (0600)"
            )
        raw = stream.read(MAX_TOKEN_BYTES + 1)
    if len(raw) > MAX_TOKEN_BYTES:
        raise OtaError(f"API token credential {path} is longer than {MAX_TOKEN_BYTES} bytes")
    try:
        return raw.decode().strip() or None
    except UnicodeDecodeError as exc:
        raise OtaError(f"API token credential {path} is not UTF-8 text") from exc
