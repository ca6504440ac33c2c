"""POSIX shared-memory objects for tests: made in /dev/shm as a client (shm_open) would, removed after."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SHM_DIR = "/dev/shm"


@dataclass
class ShmObject:
    key: str  # "/appliance-test-..." as shm_open names it
    path: str
    size: int

    def write(self, data: bytes, offset: int = 0) -> None:
        with open(self.path, "r+b") as stream:
            stream.seek(offset)
            stream.write(data)

    def read(self, size: int, offset: int = 0) -> bytes:
        with open(self.path, "rb") as stream:
            stream.seek(offset)
            return stream.read(size)

    def truncate(self, size: int) -> None:
        os.truncate(self.path, size)


@contextmanager
def shm_object(size: int, *, mode: int = 0o600, owner: tuple[int, int] | None = None) -> Iterator[ShmObject]:
    """A zeroed object of `size` bytes; `owner` (uid, gid) and `mode` as a client would set them."""
    name = f"appliance-test-{uuid.uuid4().hex[:12]}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)  # after the chown, which may clear bits; and whatever the umask
    finally:
        os.close(fd)
    try:
        yield ShmObject(f"/{name}", path, size)
    finally:
        if os.path.exists(path):
            os.unlink(path)
