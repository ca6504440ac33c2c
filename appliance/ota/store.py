"""The OTA records (snapshot, config copy, drain marker) in a folder only root, or the verb's user, owns."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.settings import Settings

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "snapshot.json"
CONFIG_COPY_FILE = "config.toml"
DRAINED_FILE = "drained.json"
REJECTED_CONFIG_FILE = "rejected-config.toml"
SNAPSHOT_FORMAT = 1
RECORDS_SUFFIX = "-ota"
MAX_RECORD_BYTES = 16 * 1024 * 1024  # a snapshot of hundreds of models is a few hundred KiB


class OtaError(ApplianceError):
    """An OTA verb cannot do its job: an unreadable snapshot, an unwritable file, a config not restored."""


def records_dir(settings: Settings) -> Path:
    """`ota.records_dir`, else beside the state dir: /var/lib/appliance -> /var/lib/appliance-ota."""
    if settings.ota.records_dir is not None:
        return settings.ota.records_dir
    state_dir = settings.system.state_dir
    return state_dir.with_name(state_dir.name + RECORDS_SUFFIX)


def trusted_uids() -> frozenset[int]:
    """Owners whose files this process acts on: root, and itself (only root, when it is root)."""
    return frozenset({0, os.geteuid()})


class Store:
    """Files in the records folder, each replaced atomically, so a power cut leaves old or new.

    Root acts on these records (it restores a config file from them), so none of them may be
    writable by the service user: the folder and every folder above it must belong to root or to
    whoever runs the verb and be writable by no one else (sticky folders such as /tmp excepted),
    and each file must be a regular file, not a symlink, owned the same way. Anything else is
    refused with OtaError naming the path. The snapshot and the drain marker are world-readable
    (0644): the boot health check reads them as the service user. The config copies are 0600.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def snapshot_path(self) -> Path:
        return self.root / SNAPSHOT_FILE

    @property
    def config_copy_path(self) -> Path:
        return self.root / CONFIG_COPY_FILE

    def read_snapshot(self) -> dict[str, Any] | None:
        """The saved snapshot; None when there is none; OtaError when it cannot be used or trusted."""
        path = self.snapshot_path
        document = _parse_json(path, self._read(path))
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
            self._unlink(self.config_copy_path)
        else:
            write_atomically(self.config_copy_path, config, mode=0o600)
        write_atomically(self.snapshot_path, json.dumps(document, indent=2).encode() + b"\n", mode=0o644)

    def read_config_copy(self) -> bytes:
        content = self._read(self.config_copy_path)
        if content is None:
            raise OtaError(f"config copy {self.config_copy_path}: missing; the snapshot needs it")
        return content

    def discard(self) -> bool:
        """Remove the snapshot, then its config copy; True if there was a snapshot (idempotent)."""
        existed = self._unlink(self.snapshot_path)
        self._unlink(self.config_copy_path)
        return existed

    def keep_rejected_config(self, content: bytes) -> Path:
        """Keep the config a rollback replaced, for whoever investigates the failed update."""
        self._make_root()
        path = self.root / REJECTED_CONFIG_FILE
        write_atomically(path, content, mode=0o600)
        return path

    def mark_drained(self, pid: int) -> None:
        """Remember that `ota drain` drained the service process `pid` (commit/rollback undo it)."""
        self._make_root()
        write_atomically(self.root / DRAINED_FILE, json.dumps({"pid": pid}).encode() + b"\n", mode=0o644)

    def drained_pid(self) -> int | None:
        """The service process `ota drain` left draining, if any."""
        path = self.root / DRAINED_FILE
        try:
            document = _parse_json(path, self._read(path))
        except OtaError as exc:
            log.warning("ignoring the drain marker: %s", exc)
            return None
        pid = document.get("pid") if isinstance(document, dict) else None
        return pid if isinstance(pid, int) and not isinstance(pid, bool) else None

    def clear_drained(self) -> None:
        self._unlink(self.root / DRAINED_FILE)

    def _make_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as exc:
            raise OtaError(f"cannot create records folder {self.root} ({exc.strerror})") from exc
        check_folder(self.root)

    def _read(self, path: Path) -> bytes | None:
        """The bytes of a trusted record, None when it (or the records folder) does not exist."""
        if not os.path.lexists(self.root):
            return None
        check_folder(self.root)
        return read_trusted(path)

    def _unlink(self, path: Path) -> bool:
        if not os.path.lexists(self.root):
            return False
        check_folder(self.root)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise OtaError(f"cannot remove {path} ({exc.strerror})") from exc
        return True


def check_folder(folder: Path) -> None:
    """OtaError unless `folder` is a real folder (not a symlink) and it and each folder above it
    belongs to a trusted uid and is writable by no one else; a sticky folder above it (/tmp) may
    be writable by others, and a folder above it may be a trusted symlink (/var/run -> /run)."""
    trusted = trusted_uids()
    leaf = Path(os.path.abspath(folder))
    for part in (leaf, *leaf.parents):
        try:
            st = os.lstat(part)
        except OSError as exc:
            raise OtaError(f"records folder {folder}: cannot inspect {part} ({exc.strerror})") from exc
        is_leaf = part == leaf
        if st.st_uid not in trusted:
            raise OtaError(
                f"records folder {folder}: {part} is owned by uid {st.st_uid}; `appliance ota` running as "
                f"uid {os.geteuid()} trusts only folders owned by uid {_names(trusted)}"
            )
        if stat.S_ISLNK(st.st_mode):
            if is_leaf:
                raise OtaError(f"records folder {folder} is a symlink; expected a real folder")
            check_folder(Path(os.path.realpath(part)))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise OtaError(f"records folder {folder}: {part} is not a folder")
        if st.st_mode & 0o022 and (is_leaf or not st.st_mode & stat.S_ISVTX):
            raise OtaError(
                f"records folder {folder}: {part} has mode {stat.S_IMODE(st.st_mode):04o}, writable by "
                "group or others; expected no write access beyond its owner"
            )


def read_trusted(path: Path) -> bytes | None:
    """A regular file's bytes, opened without following a symlink and owned by a trusted uid;
    None when it does not exist; OtaError naming the path otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OtaError(f"{path} is a symlink; refusing to follow it") from exc
        raise OtaError(f"{path}: cannot be read ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as stream:
        st = os.fstat(fd)
        trusted = trusted_uids()
        if not stat.S_ISREG(st.st_mode):
            raise OtaError(f"{path} is not a regular file; refusing it")
        if st.st_uid not in trusted:
            raise OtaError(
                f"{path} is owned by uid {st.st_uid}; `appliance ota` running as uid {os.geteuid()} "
                f"trusts only files owned by uid {_names(trusted)}"
            )
        if st.st_mode & 0o022:
            raise OtaError(
                f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, writable by group or others; refusing it"
            )
        if st.st_size > MAX_RECORD_BYTES:
            raise OtaError(f"{path} holds {st.st_size} bytes; a record holds at most {MAX_RECORD_BYTES}")
        try:
            return stream.read(MAX_RECORD_BYTES + 1)
        except OSError as exc:
            raise OtaError(f"{path}: cannot be read ({exc.strerror})") from exc


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


def _parse_json(path: Path, raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OtaError(f"{path}: not valid JSON ({exc}); remove it and take a new snapshot") from exc


def _names(uids: frozenset[int]) -> str:
    return " or ".join(str(uid) for uid in sorted(uids))
