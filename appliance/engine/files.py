"""How the model repository reads the disk.

The service reads its own repository and follows symlinks (an installer may link a model folder in
from elsewhere). Root's OTA verbs read the same repository, which the service user can rewrite at any
moment: they pass their own `Files` (see `appliance.ota.repofiles.RootFiles`) that follows no link and
opens nothing that could block.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from appliance.errors import ConfigError


class Files:
    """The service's view: ordinary path operations, symlinks followed."""

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def is_file(self, path: Path) -> bool:
        return path.is_file()

    def iterdir(self, path: Path) -> Iterator[Path]:
        return path.iterdir()

    def read(self, path: Path, limit: int) -> bytes:
        """At most `limit` bytes from the start of `path`; OSError if it cannot be read."""
        with path.open("rb") as stream:
            return stream.read(limit)


FOLLOW = Files()


def read_bounded(files: Files, path: Path, limit: int, read_as: str, expected: str) -> bytes:
    """`path` whole through `files`, at most `limit` bytes; ConfigError if it cannot be read ("cannot
    be read as <read_as>") or is larger ("expected <expected>")."""
    try:
        data = files.read(path, limit + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read as {read_as} ({exc})") from exc
    if len(data) > limit:
        raise ConfigError(f"{path}: larger than {limit} bytes; expected {expected}")
    return data
