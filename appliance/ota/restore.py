"""What `ota rollback` puts back: the config file, and models served from the files on disk."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.ota.checks import OnDisk
from appliance.ota.link import ServiceLink
from appliance.ota.store import OtaError, Store, write_atomically

log = logging.getLogger(__name__)


def config_file(store: Store, before: dict[str, Any], target: Path | None) -> bool:
    """Put the configured config file `target` back as the snapshot saw it; True when that changed
    anything. Only `target` (the verb's --config, or /etc/appliance/appliance.toml) is ever written
    or removed: a snapshot taken of another path is an OtaError, not a reason to write there."""
    record = before.get("config")
    if not record:
        return False
    if target is None or record.get("path") != str(target):
        raise OtaError(
            f"the snapshot holds config file {record.get('path')!r}, but this rollback restores "
            f"{str(target) if target else 'no config file'} (--config); not restoring either"
        )
    current = target.read_bytes() if target.is_file() else None
    if not record.get("exists"):
        if current is None:
            return False
        kept = store.keep_rejected_config(current)
        target.unlink()
        log.warning("rollback: removed %s, which the update added (kept as %s)", target, kept)
        return True
    wanted = store.read_config_copy()
    mode, owner = _mode_and_owner(record)
    if current == wanted and _has_mode_and_owner(target, mode, owner):
        return False
    if current is not None and current != wanted:
        store.keep_rejected_config(current)
    write_atomically(target, wanted, mode=mode, owner=owner)
    log.warning(
        "rollback: restored %s (mode %04o%s) from the snapshot of %s",
        target,
        mode,
        f", owner {owner[0]}:{owner[1]}" if owner else "",
        before.get("taken_at"),
    )
    return True


def _mode_and_owner(record: dict[str, Any]) -> tuple[int, tuple[int, int] | None]:
    """The mode and owner the snapshot recorded (root's own record, not the file the update left:
    an update that made the config 0600 root:root would otherwise lock the service out of it),
    never group- or world-writable; the owner is only set when running as root."""
    mode, uid, gid = int(record.get("mode", 0o600)), int(record.get("uid", 0)), int(record.get("gid", 0))
    return mode & 0o755, ((uid, gid) if os.geteuid() == 0 else None)


def _has_mode_and_owner(target: Path, mode: int, owner: tuple[int, int] | None) -> bool:
    try:
        st = target.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != mode:
        return False
    return owner is None or (st.st_uid, st.st_gid) == owner


def report_models_not_restored(before: dict[str, Any], on_disk: Mapping[str, OnDisk]) -> None:
    for name, then in before.get("models", {}).items():
        disk = on_disk.get(name)
        if then.get("sha256") and (disk is None or disk.sha256 != then["sha256"]):
            found = f"version {disk.version} (sha256 {disk.sha256})" if disk else "nothing"
            log.warning(
                "rollback: model %s: the repository holds %s, the snapshot had version %s (sha256 %s); "
                "the update framework did not restore it",
                name,
                found,
                then.get("version"),
                then["sha256"],
            )


def reload_if_stale(link: ServiceLink, status: dict[str, Any], on_disk: Mapping[str, OnDisk]) -> None:
    """Reload when the service serves files other than those on disk (restored, removed or new ones).

    Models the service could not load are left out: a reload would fail them again the same way.
    """
    models = status.get("models", {})
    served = {name: m.get("sha256") for name, m in models.items() if m.get("state") == "READY"}
    changed = {
        name for name, sha256 in served.items() if name not in on_disk or on_disk[name].sha256 != sha256
    }
    stale = sorted(changed | (set(on_disk) - set(models)))
    if not stale:
        return
    log.info("rollback: reloading models whose files changed on disk: %s", ", ".join(stale))
    for name, result in link.reload().get("models", {}).items():
        if result.get("state") != "READY":
            log.warning(
                "rollback: model %s is %s after the reload: %s",
                name,
                result.get("state"),
                result.get("reason"),
            )
