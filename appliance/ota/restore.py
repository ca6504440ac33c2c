"""What `ota rollback` puts back: the config file, and models served from the files on disk."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from appliance.ota.link import ServiceLink
from appliance.ota.snapshot import digests_on_disk
from appliance.ota.store import Store, write_atomically

log = logging.getLogger(__name__)


def config_file(store: Store, before: dict[str, Any]) -> bool:
    """Put the config file back as the snapshot saw it; True when that changed anything."""
    record = before.get("config")
    if not record:
        return False
    target = Path(record["path"])
    current = target.read_bytes() if target.is_file() else None
    if not record.get("exists"):
        if current is None:
            return False
        kept = store.keep_rejected_config(current)
        target.unlink()
        log.warning("rollback: removed %s, which the update added (kept as %s)", target, kept)
        return True
    wanted = store.read_config_copy()
    if current == wanted:
        return False
    if current is not None:
        store.keep_rejected_config(current)
    owner = (record["uid"], record["gid"]) if os.geteuid() == 0 else None
    write_atomically(target, wanted, mode=record["mode"], owner=owner)
    log.warning("rollback: restored %s from the snapshot of %s", target, before.get("taken_at"))
    return True


def report_models_not_restored(before: dict[str, Any], repository: Path) -> None:
    on_disk = digests_on_disk(repository)
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


def reload_if_stale(link: ServiceLink, status: dict[str, Any], repository: Path) -> None:
    """Reload when the service serves files other than those on disk (restored, removed or new ones).

    Models the service could not load are left out: a reload would fail them again the same way.
    """
    on_disk = digests_on_disk(repository)
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
