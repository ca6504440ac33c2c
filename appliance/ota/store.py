"""The OTA folder `<state_dir>/ota/`: the snapshot, its copy of the config file and the drain marker."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "snapshot.json"
CONFIG_COPY_FILE = "config.toml"
DRAINED_FILE = "drained.json"
REJECTED_CONFIG_FILE = "rejected-config.toml"
SNAPSHOT_FORMAT = 1


class OtaError(ApplianceError):
    """An OTA verb cannot do its job: an unreadable snapshot, an unwritable file, a config not restored."""


class Store:
    """Files under `<state_dir>/ota/`, each replaced atomically, so a power cut leaves old or new.

    Hooks run as root while the service's health check runs as the service user, so files root
    writes here are handed to the owner of the state dir (mode 0600: the config copy may hold secrets).
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.root = state_dir / "ota"

    @property
    def snapshot_path(self) -> Path:
        return self.root / SNAPSHOT_FILE

    @property
    def config_copy_path(self) -> Path:
        return self.root / CONFIG_COPY_FILE

    def read_snapshot(self) -> dict[str, Any] | None:
        """The saved snapshot; None when there is none; OtaError when it cannot be used."""
        path = self.snapshot_path
        document = _read_json(path)
        if document is None:
            return None
        if not isinstance(document, dict) or document.get("format") != SNAPSHOT_FORMAT:
            found = document.get("format") if isinstance(document, dict) else type(document).__name__
            raise OtaError(f"snapshot {path} has format {found!r}; expected {SNAPSHOT_FORMAT}")
        return document

    def save_snapshot(self, document: dict[str, Any], config: bytes | None) -> None:
        """Write the config copy first and the snapshot last, so a snapshot on disk is always whole."""
        self._make_root()
        if config is None:
            _unlink(self.config_copy_path)
        else:
            self._write(self.config_copy_path, config)
        self._write(self.snapshot_path, json.dumps(document, indent=2).encode() + b"\n")

    def read_config_copy(self) -> bytes:
        try:
            return self.config_copy_path.read_bytes()
        except OSError as exc:
            raise OtaError(f"config copy {self.config_copy_path}: cannot be read ({exc.strerror})") from exc

    def discard(self) -> bool:
        """Remove the snapshot, then its config copy; True if there was a snapshot (idempotent)."""
        existed = _unlink(self.snapshot_path)
        _unlink(self.config_copy_path)
        return existed

    def keep_rejected_config(self, content: bytes) -> Path:
        """Keep the config a rollback replaced, for whoever investigates the failed update."""
        self._make_root()
        path = self.root / REJECTED_CONFIG_FILE
        self._write(path, content)
        return path

    def mark_drained(self, pid: int) -> None:
        """Remember that `ota drain` drained the service process `pid` (commit/rollback undo it)."""
        self._make_root()
        self._write(self.root / DRAINED_FILE, json.dumps({"pid": pid}).encode() + b"\n")

    def drained_pid(self) -> int | None:
        """The service process `ota drain` left draining, if any."""
        try:
            document = _read_json(self.root / DRAINED_FILE)
        except OtaError as exc:
            log.warning("ignoring the drain marker: %s", exc)
            return None
        pid = document.get("pid") if isinstance(document, dict) else None
        return pid if isinstance(pid, int) and not isinstance(pid, bool) else None

    def clear_drained(self) -> None:
        _unlink(self.root / DRAINED_FILE)

    def _make_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise OtaError(f"cannot create {self.root} ({exc.strerror})") from exc
        self._hand_over(self.root)

    def _write(self, path: Path, data: bytes) -> None:
        write_atomically(path, data, mode=0o600, owner=self._owner())

    def _hand_over(self, path: Path) -> None:
        owner = self._owner()
        if owner is not None:
            try:
                os.chown(path, *owner)
            except OSError as exc:
                raise OtaError(f"cannot hand {path} to uid {owner[0]} ({exc.strerror})") from exc

    def _owner(self) -> tuple[int, int] | None:
        """The state dir's owner when we run as root and it is someone else, else None (keep ours)."""
        if os.geteuid() != 0:
            return None
        st = self.state_dir.stat()
        return (st.st_uid, st.st_gid) if st.st_uid != 0 else None


def write_atomically(path: Path, data: bytes, *, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `data`: temp file beside it, fsync, chmod/chown, rename, fsync the folder."""
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temp, mode)
            if owner is not None:
                os.chown(temp, *owner)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        raise OtaError(f"cannot write {path} ({exc.strerror or exc})") from exc


def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OtaError(f"{path}: cannot be read ({exc.strerror})") from exc
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OtaError(f"{path}: not valid JSON ({exc}); remove it and take a new snapshot") from exc


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise OtaError(f"cannot remove {path} ({exc.strerror})") from exc
    return True
