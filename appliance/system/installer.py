"""Idempotent installation of files into a root: write what changed, never clobber an edited file."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.errors import ConfigError
from appliance.ota.store import write_atomically


@dataclass(frozen=True)
class ManagedFile:
    """One file to install: where in the root, what bytes, which mode."""

    path: PurePosixPath  # relative to the root
    content: bytes
    mode: int
    is_tracked: bool = True  # secrets are not: their digest would be a password hash in /etc


@dataclass
class InstallReport:
    """What a run did; paths as they appear inside the root (/etc/...)."""

    written: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # the written files that did not exist before
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    @property
    def is_complete(self) -> bool:
        return not self.refused


def install(
    root: Path,
    files: Sequence[ManagedFile],
    *,
    stamp: PurePosixPath,
    removable: Sequence[PurePosixPath] = (),
    force: bool = False,
) -> InstallReport:
    """Make `files` exist in `root` and remove those of `removable` we wrote and nobody edited.

    The sha256 of every file written is kept in the JSON file `stamp` inside the root. An existing
    file whose content still matches its recorded digest is ours to update or remove; any other is
    refused unless `force`, and a run with a refusal writes nothing at all. Files in `removable`
    that were never ours are left alone, even with `force`.
    """
    digests = _load(root / stamp)
    before = dict(digests)
    report = InstallReport()
    writes = [item for item in files if _wants_write(root, item, digests, force, report)]
    wanted = {f.path for f in files}
    removals = []
    for path in removable:
        if path in wanted or str(path) not in digests:
            continue
        if not (root / path).is_file():
            del digests[str(path)]  # someone deleted it; forget it
            continue
        if force or digests[str(path)] == _digest((root / path).read_bytes()):
            removals.append(path)
        else:
            report.refused.append(("/" + str(path), "no longer wanted, but " + _edited))
    if report.refused:
        return report
    for item in writes:
        if not (root / item.path).exists():
            report.created.append("/" + str(item.path))
        _write(root, item)
        report.written.append("/" + str(item.path))
        if item.is_tracked:
            digests[str(item.path)] = _digest(item.content)
    for path in removals:
        (root / path).unlink()
        _sync_folder((root / path).parent)
        del digests[str(path)]
        report.removed.append("/" + str(path))
    if digests != before:
        _save(root, stamp, digests)
    return report


def read_record(root: Path, stamp: PurePosixPath, key: str) -> Any:
    """What `write_record` kept under `key` in the stamp, or None. Keys of records are not paths
    (they hold a space), so no managed file's digest can collide with one."""
    return _load(root / stamp).get(key)


def write_record(root: Path, stamp: PurePosixPath, key: str, value: Any) -> None:
    """Keep `value` (JSON) under `key` in the stamp, beside the digests, e.g. what was applied."""
    if " " not in key:
        raise ValueError(f"record key {key!r} must hold a space: keys without one are paths")
    digests = _load(root / stamp)
    if digests.get(key) != value:
        _save(root, stamp, {**digests, key: value})


_edited = "edited since appliance provision wrote it; keep the edit or pass --force to replace it"
_foreign = "exists and was not written by appliance provision; pass --force to replace it"


def _wants_write(
    root: Path, item: ManagedFile, digests: dict[str, Any], force: bool, report: InstallReport
) -> bool:
    target = root / item.path
    shown = "/" + str(item.path)
    if target.is_symlink() or target.is_dir():
        report.refused.append((shown, "is a symlink or a directory, not a file"))
        return False
    current = target.read_bytes() if target.exists() else None
    if current == item.content:
        if item.is_tracked:
            digests[str(item.path)] = _digest(item.content)  # adopt an identical file
        if _mode(target) == item.mode:
            report.unchanged.append(shown)
            return False
        return True
    recorded = digests.get(str(item.path))
    if current is None or not item.is_tracked or force or recorded == _digest(current):
        return True
    report.refused.append((shown, _edited if recorded else _foreign))
    return False


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        digests = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); delete it to provision from scratch") from exc
    if not isinstance(digests, dict):
        raise ConfigError(f"{path}: expected a JSON object of path -> sha256")
    return digests


def _save(root: Path, stamp: PurePosixPath, digests: dict[str, Any]) -> None:
    content = (json.dumps(digests, indent=2, sort_keys=True) + "\n").encode()
    _write(root, ManagedFile(stamp, content, 0o644))


def _write(root: Path, item: ManagedFile) -> None:
    """Replace durably: a temporary file in the same folder, fsync, rename over the target, fsync the
    folder (and each folder it had to create), so a power cut leaves the old file or the new one,
    never an empty one."""
    target = root / item.path
    # Directories we create get the file's read bits as search bits: 0700 for secrets.
    _make_folders(target.parent, 0o755 if item.mode & 0o044 else 0o700)
    write_atomically(target, item.content, mode=item.mode)


def _make_folders(folder: Path, mode: int) -> None:
    """`mkdir -p` that fsyncs the parent of every folder it makes, so the new entries survive too."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir(mode=mode, exist_ok=True)
        _sync_folder(made.parent)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777
