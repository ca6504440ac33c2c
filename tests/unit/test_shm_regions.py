"""Shared-memory regions (dataplane/regions.py) on real /dev/shm objects: keys are names, never paths;
every access is bounds-checked; inputs are copied out and outputs written with pread/pwrite, never
through a mapping, so an object its client shrinks fails one access, not the service; the limits hold."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from shm_objects import SHM_DIR, ShmObject, shm_object

from appliance.dataplane.regions import SharedMemory
from appliance.errors import Forbidden, InvalidInput, RequestTooLarge
from appliance.protocol.shared_memory import RegionRef


@pytest.fixture
def regions() -> Iterator[SharedMemory]:
    found = SharedMemory(max_regions=4, max_bytes=1 << 20)
    yield found
    found.close()


@pytest.fixture
def obj() -> Iterator[ShmObject]:
    with shm_object(3 * 4096) as made:
        yield made


def test_an_input_is_a_private_copy_of_the_objects_bytes(regions: SharedMemory, obj: ShmObject) -> None:
    regions.register("in", obj.key, 5000, 64)  # not page-aligned
    obj.write(np.arange(4, dtype=np.float32).tobytes(), 5008)
    copy = regions.read(RegionRef("in", 16, 8))
    array = np.frombuffer(copy, np.float32)
    obj.write(np.full(4, 7, np.float32).tobytes(), 5008)  # the client reuses its buffer meanwhile
    obj.truncate(0)  # or shrinks it: a view of the mapping would now be SIGBUS to read
    assert array.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert copy.readonly and not array.flags.writeable


def test_outputs_are_written_into_the_object(regions: SharedMemory, obj: ShmObject) -> None:
    regions.register("out", obj.key, 4096, 4096)
    regions.write(RegionRef("out", 3, 10), b"abc")
    assert obj.read(3, 4106) == b"abc"


def test_status_and_unregister(regions: SharedMemory, obj: ShmObject) -> None:
    regions.register("a", obj.key, 0, 100)
    regions.register("b", obj.key.lstrip("/"), 100, 100)  # the '/' may be left out, as Python does
    assert [(s.name, s.offset, s.byte_size) for s in regions.status()] == [("a", 0, 100), ("b", 100, 100)]
    assert regions.status("b")[0].key == obj.key.lstrip("/")
    regions.unregister("nosuch")  # as Triton: nothing to do
    regions.unregister("a")
    assert [s.name for s in regions.status()] == ["b"] and regions.mapped_bytes == 100
    regions.unregister()
    assert regions.status() == [] and regions.mapped_bytes == 0
    with pytest.raises(InvalidInput, match="no shared-memory region 'a' is registered"):
        regions.status("a")


@pytest.mark.parametrize(
    "key",
    ["/dev/shm/x", "../etc/passwd", "a/b", "/a/b", "", "/", ".", "/..", "x\x00y", "//x", "x\n", "a" * 256, 7],
)
def test_keys_are_posix_names_never_paths(regions: SharedMemory, key: object) -> None:
    with pytest.raises(InvalidInput, match=r"not a POSIX shared-memory name|must be a string"):
        regions.register("r", key, 0, 1)  # type: ignore[arg-type]
    assert regions.status() == []


def test_a_link_or_a_folder_in_dev_shm_is_not_an_object(regions: SharedMemory, obj: ShmObject) -> None:
    link = os.path.join(SHM_DIR, f"{obj.path.rsplit('/', 1)[1]}-link")
    os.symlink("/etc/passwd", link)
    try:
        with pytest.raises(InvalidInput, match="symbolic link"):
            regions.register("r", "/" + os.path.basename(link), 0, 1)
    finally:
        os.unlink(link)
    folder = link + "-dir"
    os.mkdir(folder)
    try:
        with pytest.raises(InvalidInput, match=r"cannot open|not a shared-memory object"):
            regions.register("r", "/" + os.path.basename(folder), 0, 1)
    finally:
        os.rmdir(folder)


@pytest.mark.parametrize(
    ("offset", "byte_size", "error"),
    [
        (0, 3 * 4096 + 1, "past the end of shared-memory object"),
        (3 * 4096, 1, "past the end"),
        (-1, 1, "offset must be an integer >= 0"),
        (0, 0, "byte_size one > 0"),
        (0, 1.5, "byte_size one > 0"),
        ("0", 1, "offset must be"),
    ],
)
def test_a_region_must_lie_in_its_object(
    regions: SharedMemory, obj: ShmObject, offset: object, byte_size: object, error: str
) -> None:
    with pytest.raises(InvalidInput, match=error):
        regions.register("r", obj.key, offset, byte_size)  # type: ignore[arg-type]
    assert regions.status() == []


def test_unknown_objects_names_and_duplicates(regions: SharedMemory, obj: ShmObject) -> None:
    with pytest.raises(InvalidInput, match="no shared-memory object '/appliance-test-none' exists"):
        regions.register("r", "/appliance-test-none", 0, 1)
    with pytest.raises(InvalidInput, match="region name must be 1 to 255 printable"):
        regions.register("a\nb", obj.key, 0, 1)
    regions.register("r", obj.key, 0, 1)
    with pytest.raises(InvalidInput, match="'r' is already registered"):
        regions.register("r", obj.key, 0, 1)


def test_region_count_and_mapped_bytes_are_limited(obj: ShmObject) -> None:
    regions = SharedMemory(max_regions=2, max_bytes=8192)
    regions.register("a", obj.key, 0, 4096)
    with pytest.raises(RequestTooLarge, match=r"4096 bytes are mapped and server.max_shm_bytes is 8192"):
        regions.register("b", obj.key, 0, 4097)
    regions.register("b", obj.key, 0, 4096)
    with pytest.raises(RequestTooLarge, match=r"2 regions are registered, the most server\.max_shm_regions"):
        regions.register("c", obj.key, 0, 1)
    regions.unregister("a")
    regions.register("c", obj.key, 0, 1)  # room again
    with pytest.raises(InvalidInput, match="turned off"):
        SharedMemory(max_regions=0, max_bytes=8192).register("a", obj.key, 0, 1)
    regions.close()


def test_every_access_is_bounds_checked(regions: SharedMemory, obj: ShmObject) -> None:
    regions.register("r", obj.key, 4096, 100)
    for access in (regions.read, regions.check, lambda ref: regions.write(ref, bytes(ref.byte_size))):
        with pytest.raises(InvalidInput, match="offset 96 \\+ shared_memory_byte_size 8 is past the end"):
            access(RegionRef("r", 8, 96))
        with pytest.raises(InvalidInput, match="no shared-memory region 'x' is registered"):
            access(RegionRef("x", 1, 0))
    assert len(regions.read(RegionRef("r", 4, 96))) == 4


def test_an_object_shrunk_under_its_region_is_refused_not_a_crash(
    regions: SharedMemory, obj: ShmObject
) -> None:
    regions.register("r", obj.key, 4096, 4096)
    obj.truncate(4096)  # touching the region's pages through a mapping now would be SIGBUS
    with pytest.raises(InvalidInput, match="shrank to 4096 bytes under region 'r'"):
        regions.read(RegionRef("r", 4, 0))
    with pytest.raises(InvalidInput, match="shrank to 4096 bytes under region 'r'"):
        regions.write(RegionRef("r", 4, 0), b"abcd")
    assert os.path.getsize(obj.path) == 4096  # a refused write did not grow the client's object


def test_an_input_read_outlives_its_unregistration(regions: SharedMemory, obj: ShmObject) -> None:
    obj.write(b"kept")
    regions.register("r", obj.key, 0, 4)
    array = np.frombuffer(regions.read(RegionRef("r", 4, 0)), np.uint8)
    regions.unregister("r")  # a request still computing on it has its own bytes
    assert bytes(array) == b"kept"
    with pytest.raises(InvalidInput, match="no shared-memory region 'r' is registered"):
        regions.read(RegionRef("r", 4, 0))


def test_the_services_user_must_be_allowed_to_open_it(obj: ShmObject) -> None:
    if os.geteuid() == 0:
        pytest.skip("root opens any object; tests/integration/test_shm_users.py runs this as a user")
    os.chmod(obj.path, 0)
    with pytest.raises(Forbidden, match="may not open shared-memory object"):
        SharedMemory(4, 1 << 20).register("r", obj.key, 0, 1)
