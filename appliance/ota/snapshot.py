"""What `ota snapshot` records: the config file, model digests, providers and a latency baseline."""

from __future__ import annotations

import datetime
import hashlib
import logging
import stat
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.engine.repository import Repository
from appliance.errors import ApplianceError
from appliance.ota import repofiles
from appliance.ota.checks import OnDisk
from appliance.ota.golden import GoldenRun
from appliance.ota.store import SNAPSHOT_FORMAT, OtaError

log = logging.getLogger(__name__)

_SERVED_FIELDS = ("state", "reason", "version", "sha256", "precision", "placement", "slo_p99_ms")


def build(
    *,
    status: dict[str, Any] | None,
    golden: dict[str, GoldenRun],
    repository: Path,
    config_path: Path | None,
) -> tuple[dict[str, Any], bytes | None]:
    """The snapshot document and the config file's bytes (None when there is no config file).

    From a running service it records what it serves; with none running, the digests of what the
    repository holds, so that verify and rollback still have the files to compare with.
    """
    config, content = config_record(config_path)
    if status is not None:
        models = {
            name: _served(name, model, golden.get(name)) for name, model in status.get("models", {}).items()
        }
        service = {k: status.get(k) for k in ("state", "version", "pid", "repository")}
        providers = status.get("providers")
    else:
        models = {
            name: {"state": None, "version": disk.version, "sha256": disk.sha256, "golden_ms": None}
            for name, disk in digests_on_disk(repository).items()
        }
        service, providers = None, None
    document = {
        "format": SNAPSHOT_FORMAT,
        "taken_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "appliance_version": __version__,
        "service": service,
        "config": config,
        "providers": providers,
        "models": models,
    }
    return document, content


def config_record(path: Path | None) -> tuple[dict[str, Any] | None, bytes | None]:
    """{"path", "exists", "sha256", "mode", "uid", "gid"} of the config file, and its bytes."""
    if path is None:
        return None, None
    try:
        content = path.read_bytes()
        st = path.stat()
    except FileNotFoundError:
        return {"path": str(path), "exists": False}, None
    except OSError as exc:
        raise OtaError(f"config file {path}: cannot be read ({exc.strerror})") from exc
    record = {
        "path": str(path),
        "exists": True,
        "sha256": hashlib.sha256(content).hexdigest(),
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
    }
    return record, content


def digests_on_disk(repository: Path, names: list[str] | None = None) -> dict[str, OnDisk]:
    """The version each model of the repository would serve, and its digest as the service reports it
    (model.onnx, with its external data where it has some).

    A model whose file root may not read (a symlink, not a regular file, too large: see repofiles)
    is left out with a warning, as one that cannot be read is: the caller goes on without it.
    """
    repo = Repository(repository, repofiles.RootFiles(repository))
    found = {}
    for name in repo.names() if names is None else names:
        try:
            source = repo.source(name)
            found[name] = OnDisk(str(source.version), repofiles.model_digest(repository, source.path))
        except (ApplianceError, OSError) as exc:
            log.warning("model %s: no digest on disk: %s", name, exc)
    return found


def _served(name: str, model: dict[str, Any], golden: GoldenRun | None) -> dict[str, Any]:
    entry = {key: model.get(key) for key in _SERVED_FIELDS}
    entry["golden_ms"] = None
    if golden is not None:
        if golden.problems:
            log.warning(
                "model %s: golden samples do not reproduce before the update either: %s",
                name,
                "; ".join(golden.problems),
            )
        entry["golden_ms"] = golden.median_ms
    return entry
