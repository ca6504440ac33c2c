"""The six OTA verbs; each is idempotent and returns the exit code firmware hooks read."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from appliance.ota import golden, restore, snapshot
from appliance.ota import verify as verifying
from appliance.ota.checks import busy_reasons
from appliance.ota.link import ServiceLink
from appliance.ota.store import OtaError, Store, records_dir
from appliance.settings import Settings

log = logging.getLogger(__name__)

EX_OK = 0
EX_FAILED = 1
EX_TEMPFAIL = 75  # sysexits.h: not now, try again later (Mender's shims turn it into 21)

UNIT = "appliance.service"
SYSTEMD_RUNTIME = Path("/run/systemd/system")  # exists only when systemd runs the box (sd_booted(3))
UNIT_QUERY_TIMEOUT_S = 10.0
_ANSWERING_STATES = ("active", "reloading")  # the admin socket listens before READY=1, closes after stop


def gate(settings: Settings, config_file: Path | None = None) -> int:
    """0 when an update may start now, 75 while line traffic is busy."""
    status = _status_or_stopped(_link(settings))
    if status is None:
        log.info("gate: the service is not running; no line traffic to protect: go")
        return EX_OK
    if status.get("state") != "ready":
        log.info("gate: the service is %s and serves no line traffic now: go", status.get("state"))
        return EX_OK
    options = settings.ota
    reasons = busy_reasons(status.get("line", {}), options.gate_max_line_requests, options.gate_max_line_ips)
    if reasons:
        log.warning("gate: busy, try again later: %s", "; ".join(reasons))
        return EX_TEMPFAIL
    line = status.get("line", {})
    log.info(
        "gate: line quiet (%s queued, %s inferences/s): go", line.get("queue_depth"), line.get("served_ips")
    )
    return EX_OK


def drain(settings: Settings, config_file: Path | None = None) -> int:
    """0 once admitted work is done and no more is admitted; 75 (serving again) if it took too long."""
    link, store = _link(settings), _store(settings)
    status = _status_or_stopped(link)
    if status is None:
        log.info("drain: the service is not running; nothing to drain")
        return EX_OK
    timeout_s = settings.ota.drain_timeout_s or settings.server.drain_timeout_s
    store.mark_drained(_pid(status))  # first: whatever happens next, commit/rollback undo it
    reply = link.drain(timeout_s, "ota drain")
    if reply.get("drained"):
        log.info(
            "drain: done; the service (pid %s) admits no requests until commit or rollback", status["pid"]
        )
        return EX_OK
    link.resume()
    store.clear_drained()
    log.warning(
        "drain: %s requests still in flight after %g s; the service serves again, try later",
        reply.get("inflight"),
        timeout_s,
    )
    return EX_TEMPFAIL


def take_snapshot(settings: Settings, config_file: Path | None = None) -> int:
    """Save the config file, model digests, providers and the golden-sample latency baseline.

    The config file and the repository are the verb's own (`config_file`, settings), never the
    paths the service's status names.
    """
    store = _store(settings)
    status = _status_or_stopped(_link(settings))  # never a snapshot without the baseline of a live service
    runs: dict[str, golden.GoldenRun] = {}
    if status is None:
        log.warning("snapshot: the service is not running; saving the config and digests on disk only")
    elif status.get("state") != "ready":
        log.warning(
            "snapshot: the service is %s; no latency baseline (snapshot before `ota drain`)", status["state"]
        )
    else:
        runs = golden.run_all(
            status,
            settings.models.repository,
            host=settings.server.host,
            api_token=verifying.api_token(settings),
            timed_requests=settings.ota.verify_timed_requests,
        )
    repository = settings.models.repository
    named = status.get("config_file") if status is not None else None
    if named and named != str(config_file):
        log.warning(
            "snapshot: the service reads config %s; saving %s, the config file this verb was given",
            named,
            config_file or "none",
        )
    if os.path.lexists(store.snapshot_path):
        log.info("snapshot: replacing the snapshot already in %s", store.snapshot_path)
    document, content = snapshot.build(
        status=status, golden=runs, repository=repository, config_path=config_file
    )
    store.save_snapshot(document, content)
    log.info(
        "snapshot: saved %s: %d models, %d latency baselines, config %s",
        store.snapshot_path,
        len(document["models"]),
        sum(m.get("golden_ms") is not None for m in document["models"].values()),
        config_file or "none",
    )
    return EX_OK


def verify(settings: Settings, config_file: Path | None = None) -> int:
    """0 healthy, 75 not ready yet (within the grace after boot), 1 unhealthy or never ready."""
    store, options = _store(settings), settings.ota
    before = store.read_snapshot()
    waited = verifying.wait_until_ready(_link(settings), store, options.verify_wait_s)
    if not waited.is_ready:
        what = "not running" if waited.status is None else f"still {waited.status.get('state')}"
        uptime_s = verifying.boot_uptime_s()
        if verifying.is_still_starting(waited.status, options.verify_boot_grace_s, uptime_s):
            log.warning("verify: the service is %s after %g s; try again later", what, options.verify_wait_s)
            return EX_TEMPFAIL
        log.error(
            "verify: the service is %s after %g s, past verify_boot_grace_s %g s (box up %.0f s)",
            what,
            options.verify_wait_s,
            options.verify_boot_grace_s,
            uptime_s,
        )
        return EX_FAILED
    assert waited.status is not None
    findings = verifying.inspect(waited.status, before, settings)
    for finding in findings:
        log.log(
            logging.ERROR if finding.is_failure else logging.INFO,
            "verify: %s: %s",
            finding.subject,
            finding.message,
        )
    failures = sum(finding.is_failure for finding in findings)
    against = f"the snapshot of {before.get('taken_at')}" if before else "no snapshot"
    if failures:
        log.error("verify: %d problem(s), compared with %s", failures, against)
        return EX_FAILED
    log.info("verify: healthy, %d models, compared with %s", len(waited.status.get("models", {})), against)
    return EX_OK


def commit(settings: Settings, config_file: Path | None = None) -> int:
    """Keep the update: drop the snapshot and admit requests again if `ota drain` stopped them.

    A service that systemd says is up but that does not answer cannot be told to admit again: the
    snapshot goes (the update is kept either way), the drain record stays, and the verb fails (1)."""
    store, link = _store(settings), _link(settings)
    existed = store.discard()
    status = _status_or_stopped(link)
    if status is not None:
        _resume_our_drain(link, store, status)
    store.clear_drained()
    log.info("commit: %s", "snapshot discarded" if existed else "no snapshot; nothing to discard")
    return EX_OK


def rollback(settings: Settings, config_file: Path | None = None) -> int:
    """Restore the configured config file, make the service serve what is on disk, admit again,
    discard. A config that cannot be restored fails the verb (1) and keeps the snapshot, as does a
    service that systemd says is up but that does not answer (it cannot be told to reload or admit)."""
    store, link = _store(settings), _link(settings)
    before = store.read_snapshot()
    is_config_restored, config_error = False, None
    if before is not None:
        try:
            is_config_restored = restore.config_file(store, before, config_file)
        except OtaError as exc:
            config_error = exc
    status = _status_or_stopped(link)
    repository = settings.models.repository
    if before is not None:
        on_disk = snapshot.digests_on_disk(repository)  # once: a file root refuses is logged once
        restore.report_models_not_restored(before, on_disk)
    if status is not None:
        if before is not None:
            restore.reload_if_stale(link, status, on_disk)
        _resume_our_drain(link, store, status)
        if is_config_restored:
            log.warning("rollback: restart appliance.service to apply the restored config")
    elif is_config_restored:
        log.info("rollback: the service is not running; it reads the restored config when it starts")
    store.clear_drained()
    if config_error is not None:
        log.error("rollback: config not restored, snapshot kept in %s: %s", store.root, config_error)
        return EX_FAILED
    store.discard()
    log.info("rollback: %s", "done" if before is not None else "no snapshot; nothing to restore")
    return EX_OK


def _resume_our_drain(link: ServiceLink, store: Store, status: dict[str, Any]) -> None:
    if status.get("state") != "draining":
        return
    if store.drained_pid() != status.get("pid"):
        log.info("the service is draining, but not because of `ota drain`; leaving it so")
        return
    link.resume()
    log.info("the service admits requests again")


def _status_or_stopped(link: ServiceLink) -> dict[str, Any] | None:
    """The service's status; None only when nothing answers and systemd does not say appliance.service
    is up. A silent socket while the unit is active means this verb looks in the wrong place (its
    settings are not the service's): saying "not running: go" then would update a box under load."""
    status = link.status()
    if status is not None:
        return status
    state = unit_state()
    if state in _ANSWERING_STATES:
        raise OtaError(
            f"systemd says {UNIT} is {state}, but nothing answers on admin socket {link.socket_path}: "
            "the verb cannot tell what the service is doing. It finds the socket from the config file "
            "(--config, else /etc/appliance/appliance.toml) and APPLIANCE_ variables, never from the "
            f"unit's environment: set [system] runtime_dir or admin_socket there as {UNIT} has it"
        )
    return None


def unit_state() -> str | None:
    """`systemctl is-active appliance.service` (systemd's word, not the service user's), or None
    where systemd does not run this box or cannot be asked."""
    systemctl = shutil.which("systemctl")
    if systemctl is None or not SYSTEMD_RUNTIME.is_dir():
        return None
    try:
        result = subprocess.run(
            [systemctl, "is-active", UNIT],
            capture_output=True,
            text=True,
            timeout=UNIT_QUERY_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot ask systemd whether %s runs: %s", UNIT, exc)
        return None
    state = result.stdout.strip()
    return state or None


def _pid(status: dict[str, Any]) -> int:
    pid = status.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise OtaError(f"the service's status names pid {pid!r}; expected a positive integer")
    return pid


def _link(settings: Settings) -> ServiceLink:
    return ServiceLink.from_settings(settings)


def _store(settings: Settings) -> Store:
    return Store(records_dir(settings))
