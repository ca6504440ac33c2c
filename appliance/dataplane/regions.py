"""System shared-memory regions (Triton's extension): registered by name, mapped once, every access
bounds-checked.

A local client (the camera process) creates a POSIX shared-memory object, writes its tensors there and
registers `[offset, offset + byte_size)` of it under a name; requests then name the region in
`parameters.shared_memory_region` instead of carrying the bytes. Inputs are read as read-only views of
the mapping (no copy); outputs are written into it. For local, trusted clients: a client that shrinks
an object it registered while the service reads it makes the kernel stop the service (SIGBUS), so every
access also checks the object's current size first.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
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
class _Mapping:
    status: RegionStatus
    fd: int
    memory: mmap.mmap
    start: int  # the region's place in `memory`: mmap offsets are page-aligned, regions need not be
    is_writable: bool


class SharedMemory:
    """The registered regions of one service; register and unregister run on the event loop."""

    def __init__(self, max_regions: int, max_bytes: int, directory: str = SHM_DIR) -> None:
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.directory = directory
        self._regions: dict[str, _Mapping] = {}

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
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            access = mmap.ACCESS_WRITE if is_writable else mmap.ACCESS_READ
            memory = mmap.mmap(fd, offset - start + byte_size, access=access, offset=start)
        except BaseException:
            os.close(fd)
            raise
        status = RegionStatus(name, key, offset, byte_size)
        self._regions[name] = _Mapping(status, fd, memory, offset - start, is_writable)
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
        """Forget one region (an unknown name is not an error, as in Triton) or, with None, all. Requests
        still reading a region keep its mapping alive until they are done."""
        names = list(self._regions) if name is None else [name]
        for each in names:
            mapping = self._regions.pop(each, None)
            if mapping is not None:
                _release(mapping)

    def status(self, name: str | None = None) -> list[RegionStatus]:
        if name is None:
            return [m.status for m in self._regions.values()]
        return [self._find(name).status]

    def view(self, ref: RegionRef, *, writable: bool = False) -> memoryview:
        """The bytes a tensor names, bounds-checked against the region and the object's size now."""
        mapping = self._find(ref.region)
        region = mapping.status
        if ref.offset + ref.byte_size > region.byte_size:
            raise InvalidInput(
                f"shared_memory_offset {ref.offset} + shared_memory_byte_size {ref.byte_size} is past "
                f"the end of region {ref.region!r}, which has {region.byte_size} bytes"
            )
        if writable and not mapping.is_writable:
            raise InvalidInput(
                f"region {ref.region!r} is read-only to the service; outputs need a region it may write"
            )
        try:
            size = os.fstat(mapping.fd).st_size
            if region.offset + ref.offset + ref.byte_size > size:
                raise InvalidInput(
                    f"shared-memory object {region.key!r} shrank to {size} bytes under region "
                    f"{ref.region!r}; register it again"
                )
            begin = mapping.start + ref.offset
            view = memoryview(mapping.memory)[begin : begin + ref.byte_size]
        except (OSError, ValueError):  # unregistered meanwhile, by another request (fd or map closed)
            raise InvalidInput(f"shared-memory region {ref.region!r} was unregistered") from None
        return view if writable else view.toreadonly()

    def _find(self, name: str) -> _Mapping:
        mapping = self._regions.get(name)
        if mapping is None:
            raise InvalidInput(f"no shared-memory region {name!r} is registered")
        return mapping

    def close(self) -> None:
        self.unregister(None)


def _release(mapping: _Mapping) -> None:
    os.close(mapping.fd)
    # A view still in use (a request being computed) keeps the pages mapped until it is dropped.
    with contextlib.suppress(BufferError):
        mapping.memory.close()


def _reserve(fd: int, key: str, offset: int, byte_size: int) -> None:
    """Give the region's pages backing now: writing an output into a page tmpfs has no room for
    would otherwise stop the service (SIGBUS) rather than fail one request."""
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
