"""System shared-memory regions (Triton's extension): registered by name, opened once, every access
bounds-checked.

A local client (the camera process) creates a POSIX shared-memory object, writes its tensors there and
registers `[offset, offset + byte_size)` of it under a name; requests then name the region in
`parameters.shared_memory_region` instead of carrying the bytes. The service never maps a region: a
client may shrink an object it registered at any time (a crash and re-create, ftruncate), and a page of
a mapping past the object's new end stops the whole service (SIGBUS) when touched, however recently its
size was checked. So inputs are copied out with pread(2) when the request is decoded, and outputs are
written with pwrite(2) once after inference: a shrunk object reads short or is found shrunk by fstat, and
fails that one request with a 400 naming the region; no later read touches the client's object.
The copy costs one kernel memcpy per input: about 35 µs per request for a 602 KB (224x224x3 FP32)
tensor (timeit, best of 5 x 2000 preads from /dev/shm on the build box; numpy copies the same in 10).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from appliance.errors import Forbidden, InvalidInput, RequestTooLarge
from appliance.protocol.shared_memory import RegionRef

SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared-memory objects: shm_open("/x") is /dev/shm/x
MAX_NAME_CHARS = 255  # NAME_MAX, for keys; region names get the same bound
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY  # no link, FIFO or tty


@dataclass(frozen=True, slots=True)
class RegionStatus:
    """What the status routes report of one region (Triton's fields)."""

    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(slots=True)
class _Region:
    status: RegionStatus
    fd: int
    is_writable: bool
    users: int = 0  # reads in progress: a decode may run on a thread while the loop unregisters
    is_released: bool = False  # unregistered; the last user closes `fd` (never reused under a read)


class SharedMemory:
    """The registered regions of one service; register and unregister run on the event loop."""

    def __init__(self, max_regions: int, max_bytes: int, directory: str = SHM_DIR) -> None:
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.directory = directory
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()  # guards users/is_released against a decode on a thread

    @property
    def mapped_bytes(self) -> int:
        return sum(m.status.byte_size for m in self._regions.values())

    def register(self, name: str, key: str, offset: int, byte_size: int) -> RegionStatus:
        """Map `byte_size` bytes at `offset` of the object `key`; InvalidInput (400), Forbidden (403,
        the service's user may not open it) or RequestTooLarge (413, past server.max_shm_*)."""
        _check_name(name)
        object_name = _object_name(key)
        if type(offset) is not int or offset < 0 or type(byte_size) is not int or byte_size <= 0:
            raise InvalidInput(
                f"region {name!r}: offset must be an integer >= 0 and byte_size one > 0, got "
                f"offset {offset!r}, byte_size {byte_size!r}"
            )
        if name in self._regions:
            raise InvalidInput(f"shared-memory region {name!r} is already registered; unregister it first")
        self._check_room(name, byte_size)
        fd, is_writable = self._open(key, object_name)
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidInput(
                    f"region {name!r}: offset {offset} + byte_size {byte_size} is past the end of "
                    f"shared-memory object {key!r}, which has {size} bytes"
                )
            if is_writable:
                _reserve(fd, key, offset, byte_size)
        except BaseException:
            os.close(fd)
            raise
        status = RegionStatus(name, key, offset, byte_size)
        self._regions[name] = _Region(status, fd, is_writable)
        return status

    def _check_room(self, name: str, byte_size: int) -> None:
        if self.max_regions == 0:
            raise InvalidInput("shared memory is turned off on this service (server.max_shm_regions = 0)")
        if len(self._regions) >= self.max_regions:
            raise RequestTooLarge(
                f"cannot register region {name!r}: {len(self._regions)} regions are registered, the "
                f"most server.max_shm_regions allows; unregister one first"
            )
        if self.mapped_bytes + byte_size > self.max_bytes:
            raise RequestTooLarge(
                f"cannot register region {name!r} of {byte_size} bytes: {self.mapped_bytes} bytes are "
                f"mapped and server.max_shm_bytes is {self.max_bytes}"
            )

    def _open(self, key: str, object_name: str) -> tuple[int, bool]:
        """Open the object read-write, else read-only (such a region can only hold inputs)."""
        try:
            directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidInput(
                f"no shared memory on this system ({self.directory}: {exc.strerror})"
            ) from None
        try:
            for flags, is_writable in ((os.O_RDWR, True), (os.O_RDONLY, False)):
                try:
                    fd = os.open(object_name, flags | _OPEN_FLAGS, dir_fd=directory)
                except PermissionError:
                    continue
                except OSError as exc:
                    raise _open_error(key, exc) from None
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    os.close(fd)
                    raise InvalidInput(f"shared-memory key {key!r} is not a shared-memory object")
                return fd, is_writable
            raise Forbidden(
                f"the service's user (uid {os.geteuid()}) may not open shared-memory object {key!r}: "
                "give it a group the service is in and mode 0660 (README: shared memory)"
            )
        finally:
            os.close(directory)

    def unregister(self, name: str | None = None) -> None:
        """Forget one region (an unknown name is not an error, as in Triton) or, with None, all. A read
        in progress on a decode thread finishes first; inputs already read are the request's own."""
        names = list(self._regions) if name is None else [name]
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                with self._lock:
                    region.is_released = True
                    if region.users == 0:
                        os.close(region.fd)

    def status(self, name: str | None = None) -> list[RegionStatus]:
        if name is None:
            return [m.status for m in self._regions.values()]
        return [self._find(name).status]

    def check(self, ref: RegionRef, *, writable: bool = False) -> None:
        """InvalidInput unless `ref` lies inside a registered region (one the service may write, for
        an output): an output that cannot go where asked fails before compute."""
        self._checked(ref, writable)

    def read(self, ref: RegionRef) -> memoryview:
        """A private, read-only copy of the bytes `ref` names (one pread: see the module docstring)."""
        with self._using(ref, writable=False) as region:
            buffer = bytearray(ref.byte_size)
            done = 0
            while done < ref.byte_size:  # a regular file reads short only at its end
                rest = memoryview(buffer)[done:]
                count = os.preadv(region.fd, [rest], region.status.offset + ref.offset + done)
                if count == 0:
                    raise _shrank(region, ref)
                done += count
        return memoryview(buffer).toreadonly()

    def write(self, ref: RegionRef, data: bytes | memoryview) -> None:
        """Write `data` where `ref` names: pwrite, after checking the object still holds it. A client
        shrinking it in between makes pwrite grow the object again, never a SIGBUS."""
        with self._using(ref, writable=True) as region:
            if region.status.offset + ref.offset + ref.byte_size > os.fstat(region.fd).st_size:
                raise _shrank(region, ref)
            view = memoryview(data).cast("B")
            position = region.status.offset + ref.offset
            try:
                while view:
                    count = os.pwrite(region.fd, view, position)
                    view, position = view[count:], position + count
            except OSError as exc:  # ENOSPC: tmpfs full once the shrink gave the reserved pages back
                raise InvalidInput(
                    f"cannot write {ref.byte_size} bytes into shared-memory region {ref.region!r}: "
                    f"{exc.strerror}"
                ) from None

    def _checked(self, ref: RegionRef, writable: bool) -> _Region:
        region = self._find(ref.region)
        if ref.offset + ref.byte_size > region.status.byte_size:
            raise InvalidInput(
                f"shared_memory_offset {ref.offset} + shared_memory_byte_size {ref.byte_size} is past "
                f"the end of region {ref.region!r}, which has {region.status.byte_size} bytes"
            )
        if writable and not region.is_writable:
            raise InvalidInput(
                f"region {ref.region!r} is read-only to the service; outputs need a region it may write"
            )
        return region

    @contextmanager
    def _using(self, ref: RegionRef, *, writable: bool) -> Iterator[_Region]:
        """The checked region, its fd kept open until the access is done even if it is unregistered."""
        with self._lock:
            region = self._checked(ref, writable)
            region.users += 1
        try:
            yield region
        finally:
            with self._lock:
                region.users -= 1
                if region.users == 0 and region.is_released:
                    os.close(region.fd)

    def _find(self, name: str) -> _Region:
        region = self._regions.get(name)
        if region is None:
            raise InvalidInput(f"no shared-memory region {name!r} is registered")
        return region

    def close(self) -> None:
        self.unregister(None)


def _shrank(region: _Region, ref: RegionRef) -> InvalidInput:
    size = os.fstat(region.fd).st_size
    return InvalidInput(
        f"shared-memory object {region.status.key!r} shrank to {size} bytes under region "
        f"{ref.region!r}; register it again"
    )


def _reserve(fd: int, key: str, offset: int, byte_size: int) -> None:
    """Give the region's pages backing now, so an output's pwrite does not find tmpfs full (it would
    fail that request with ENOSPC, the service itself being safe either way)."""
    try:
        os.posix_fallocate(fd, offset, byte_size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise RequestTooLarge(f"no room in shared memory for {byte_size} bytes of {key!r}") from None
        # EOPNOTSUPP and the like: a file system that cannot reserve; writes take their chance


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise InvalidInput(
            f"region name must be 1 to {MAX_NAME_CHARS} printable characters, got {name!r:.80}"
        )


def _object_name(key: str) -> str:
    """The object's name in SHM_DIR: a POSIX shm name is '/' then a name with no '/' (shm_open's
    rule); the leading '/' may be left out, as Python's multiprocessing.shared_memory does."""
    if not isinstance(key, str):
        raise InvalidInput(f"shared-memory key must be a string, got {key!r:.80}")
    name = key[1:] if key.startswith("/") else key
    if (
        not name
        or "/" in name
        or name in (".", "..")
        or "\0" in name
        or len(name) > MAX_NAME_CHARS
        or not name.isprintable()
    ):
        raise InvalidInput(
            f"shared-memory key {key!r:.80} is not a POSIX shared-memory name: '/' then up to "
            f"{MAX_NAME_CHARS} printable characters, none of them '/', e.g. '/camera0' (never a path)"
        )
    return name


def _open_error(key: str, exc: OSError) -> InvalidInput:
    if exc.errno == errno.ENOENT:
        return InvalidInput(f"no shared-memory object {key!r} exists (shm_open it first)")
    if exc.errno == errno.ELOOP:
        return InvalidInput(f"shared-memory key {key!r} names a symbolic link, not an object")
    return InvalidInput(f"cannot open shared-memory object {key!r}: {exc.strerror}")
