"""Idempotent installation of files into a root: write what changed, never clobber an edited file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from appliance.errors import ConfigError


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
        del digests[str(path)]
        report.removed.append("/" + str(path))
    if digests != before:
        content = (json.dumps(digests, indent=2, sort_keys=True) + "\n").encode()
        _write(root, ManagedFile(stamp, content, 0o644))
    return report


_edited = "edited since appliance provision wrote it; keep the edit or pass --force to replace it"
_foreign = "exists and was not written by appliance provision; pass --force to replace it"


def _wants_write(
    root: Path, item: ManagedFile, digests: dict[str, str], force: bool, report: InstallReport
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


def _load(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        digests = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); delete it to provision from scratch") from exc
    if not isinstance(digests, dict):
        raise ConfigError(f"{path}: expected a JSON object of path -> sha256")
    return digests


def _write(root: Path, item: ManagedFile) -> None:
    """Replace atomically: a temporary file in the same directory, then a rename over the target."""
    target = root / item.path
    # Directories we create get the file's read bits as search bits: 0700 for secrets.
    dir_mode = 0o755 if item.mode & 0o044 else 0o700
    target.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as stream:
            os.fchmod(stream.fileno(), item.mode)
            stream.write(item.content)
        os.replace(scratch, target)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777
