"""engine/memory.py's reading of the memory the service may use, on fake /proc and /sys trees: the machine's,
or less where a memory cgroup of the process (or one above it) is limited, v2 or v1; and engine/failures.py
on what a bounded arena answers (a 413 over its bound, a 503 under it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.dataplane.outcomes import outcome_of
from appliance.engine import failures
from appliance.engine.memory import available_memory_bytes, total_memory_bytes
from appliance.errors import Overloaded, RequestTooLarge

GiB, MiB = 1 << 30, 1 << 20
V1_UNLIMITED = 9223372036854771712  # what cgroup v1 says where there is no limit


def box(root: Path, cgroup: str, files: dict[str, str | int], *, total=16 * GiB, available=12 * GiB) -> Path:
    """A fake root: /proc/meminfo, /proc/self/cgroup and the cgroup files given (path -> content)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/meminfo").write_text(
        f"MemTotal:       {total // 1024} kB\nMemFree:  1024 kB\nMemAvailable:   {available // 1024} kB\n"
    )
    (root / "proc/self/cgroup").write_text(cgroup)
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(f"{content}\n")
    return root


UNIT = "sys/fs/cgroup/system.slice/appliance.service"


def test_a_cgroup_v2_memory_max_bounds_what_the_service_may_use(tmp_path: Path) -> None:
    root = box(
        tmp_path,
        "0::/system.slice/appliance.service\n",
        {
            f"{UNIT}/memory.max": 2 * GiB,
            f"{UNIT}/memory.current": 512 * MiB,
            f"{UNIT}/memory.stat": f"anon 100\nfile 200\ninactive_file {128 * MiB}\nactive_file 3",
            "sys/fs/cgroup/system.slice/memory.max": "max",
        },
    )
    assert total_memory_bytes(root) == 2 * GiB
    assert available_memory_bytes(root) == 2 * GiB - (512 - 128) * MiB  # its page cache can be dropped
    assert failures.total_memory_bytes(root) == 2 * GiB  # the one translate() reads


def test_a_limit_on_a_cgroup_above_the_services_own_counts_too(tmp_path: Path) -> None:
    root = box(
        tmp_path,
        "0::/system.slice/appliance.service\n",
        {
            f"{UNIT}/memory.max": "max",
            f"{UNIT}/memory.current": 300 * MiB,
            "sys/fs/cgroup/system.slice/memory.max": GiB,
            "sys/fs/cgroup/system.slice/memory.current": 900 * MiB,
        },
    )
    assert total_memory_bytes(root) == GiB
    assert available_memory_bytes(root) == 124 * MiB  # what the slice has left, not the service's own


def test_without_a_limit_the_machine_says(tmp_path: Path) -> None:
    unlimited = box(tmp_path / "a", "0::/system.slice/appliance.service\n", {f"{UNIT}/memory.max": "max"})
    assert total_memory_bytes(unlimited) == 16 * GiB
    assert available_memory_bytes(unlimited) == 12 * GiB
    bare = box(tmp_path / "b", "0::/\n", {})  # no cgroup files at all (not mounted, another system)
    assert (total_memory_bytes(bare), available_memory_bytes(bare)) == (16 * GiB, 12 * GiB)
    below = box(tmp_path / "c", "0::/x\n", {"sys/fs/cgroup/x/memory.max": 64 * GiB})  # more than the box
    assert total_memory_bytes(below) == 16 * GiB


def test_a_cgroup_v1_memory_limit_counts_where_v2_has_no_memory_controller(tmp_path: Path) -> None:
    v1 = "sys/fs/cgroup/memory"
    root = box(
        tmp_path,
        "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n0::/\n",
        {
            f"{v1}/memory.limit_in_bytes": V1_UNLIMITED,
            f"{v1}/process_api/memory.limit_in_bytes": V1_UNLIMITED,
            f"{v1}/process_api/abc/memory.limit_in_bytes": GiB,
            f"{v1}/process_api/abc/memory.usage_in_bytes": 100 * MiB,
            f"{v1}/process_api/abc/memory.stat": f"cache 5\ntotal_inactive_file {36 * MiB}\n",
        },
    )
    assert total_memory_bytes(root) == GiB
    assert available_memory_bytes(root) == GiB - 64 * MiB


def test_in_a_container_the_mounts_own_limit_counts_though_the_path_is_the_hosts(tmp_path: Path) -> None:
    """Without a cgroup namespace /proc/self/cgroup names the host's path; the container's mount is its
    own cgroup, where that path does not exist: the walk up ends at the mount, which has the limit."""
    root = box(
        tmp_path,
        "5:memory:/docker/0123abcd\n",
        {
            "sys/fs/cgroup/memory/memory.limit_in_bytes": 3 * GiB,
            "sys/fs/cgroup/memory/memory.usage_in_bytes": GiB,
        },
    )
    assert (total_memory_bytes(root), available_memory_bytes(root)) == (3 * GiB, 2 * GiB)


def test_nothing_readable_says_nothing(tmp_path: Path) -> None:
    assert total_memory_bytes(tmp_path) is None and available_memory_bytes(tmp_path) is None


def refusal(size: int, free: int = 0) -> Exception:
    """What ORT 1.32's bounded BFCArena raises for a buffer that does not fit under its bound."""
    return Exception(
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running ConstantOfShape node. "
        "Name:'' Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* "
        "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Available memory "
        f"of {free} is smaller than requested bytes of {size}\n"
    )


def test_a_buffer_a_bounded_arena_refuses_is_a_413_over_its_bound_and_a_503_under_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(failures, "total_memory_bytes", lambda: 16 * GiB)
    monkeypatch.setattr(failures, "run_memory_bound", lambda: 4 * GiB)
    never = failures.translate("m", refusal(2**63))
    assert type(never) is RequestTooLarge and outcome_of(never).http_status == 413
    assert "needs a buffer of 9223372036854775808 bytes, more than all of this machine's memory" in str(never)
    over = failures.translate("m", refusal(6 * GiB, free=3 * GiB))
    assert type(over) is RequestTooLarge and outcome_of(over).http_status == 413
    assert f"more than the runs of this service may hold at once ({4 * GiB} bytes" in str(over)
    held = failures.translate("m", refusal(3 * GiB, free=GiB))
    assert type(held) is Overloaded and outcome_of(held).http_status == 503 and held.retry_after_s > 0
    assert f"needs a buffer of {3 * GiB} bytes and other runs leave {GiB} bytes" in str(held)
    # Under the bound a reset may make room (engine/arena.py); over it nothing will. None spoils the arena.
    assert failures.needs_room(refusal(3 * GiB)) and not failures.needs_room(refusal(6 * GiB))
    assert not any(failures.spoils_session(refusal(size)) for size in (2**63, 6 * GiB, 3 * GiB))
    monkeypatch.setattr(failures, "run_memory_bound", lambda: None)  # a device's arena, its bound unknown
    assert type(failures.translate("m", refusal(6 * GiB))) is Overloaded
    assert failures.needs_room(refusal(6 * GiB))
