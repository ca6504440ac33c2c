"""The memory this service may use, and the bound on what ONNX Runtime's runs may hold of it at once.

A model may take the sizes of its tensors from the request's values (ConstantOfShape, Expand, Tile, Range,
Resize of a size it is sent: OCR and detection models do): a request of a few bytes can ask ORT for a
buffer of many GB inside the graph, where the data plane's bounds on inputs and outputs never see it.
Linux's heuristic overcommit gives any malloc smaller than the machine, and the pages are taken as ORT
fills them: on a 23 GiB box, `appliance serve` in a 1 GiB memory cgroup was SIGKILLed by the OOM killer
0.8 s after one request for 12 GB (ConstantOfShape of n = 3*10^9), or two of 600 MB at once; without a
cgroup, two requests of 12 GB at once would take all of its memory (not tried).

ORT's CPU arena can be bounded (OrtArenaCfg max_mem), but only for an arena registered with ORT's
environment and shared by the sessions that opt in (session.use_env_allocators): neither session config
entries nor CPU provider options reach a session's own arena (ORT 1.32). So every session of a process
allocates its CPU tensors from one arena bounded at `run_memory_bytes`: a buffer that does not fit under
the bound is refused before any memory is asked of the system, naming its size (engine/failures.py:
over the bound itself a 413, under it a 503 with a reset to free what the arena keeps: engine/arena.py).
A refused request cannot spoil this arena: BFCArena checks the bound before it doubles the size of its
next region. The bound covers every buffer of ConstantOfShape, Expand, Tile, Range and Resize; not the
memory kernels take from the heap themselves (string contents, some scratch space), nor a device's own.

The bound is per process: a pool process (engine/replica.py) has its own, derived when it loads.

It is off by default (models.run_memory_bytes). A bounded session prepacks no weights: ORT reserves them in
the arena without a check, and once they passed max_mem its count of what is left wrapped and it refused
nothing more (review /tmp/review-late/m6: two sessions of a 200 MB model under a 450 MiB bound let a 10 GB
buffer through). Plain weights are not held there, but a model's intermediate buffers are, twice while it
reloads; and `auto`, fixed when the first model loads, can be far too small on a box that was busy then.
An operator who knows the models sets bytes well above what their runs need.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

# Of the memory available when the process loads its first model: the rest is for what the bound does not
# cover (the interpreter, request and answer buffers, copies of outputs, weights loaded later, heap scratch
# of kernels) and for the rest of the box.
AVAILABLE_SHARE = 0.75
MIN_BOUND_BYTES = 64 << 20  # below it no model would run; a box this short is one to fix, not to bound
USE_ENV_ALLOCATORS = "session.use_env_allocators"
NO_PREPACKING = "session.disable_prepacking"
_V1_UNLIMITED = 1 << 62  # cgroup v1 says "no limit" with PAGE_COUNTER_MAX pages (about 2^63 bytes)

_lock = threading.Lock()
_bound: int | None = None  # max_mem of the arena this process registered; None before (or if it could not)
_registered = False


def total_memory_bytes(root: Path = Path("/")) -> int | None:
    """All of the memory this process may use: the machine's, or less where a memory cgroup of this
    process (or one above it) is limited: cgroup v2 memory.max, v1 memory.limit_in_bytes. None where
    nothing says. `root`: where /proc and /sys are (a test's fake tree)."""
    sizes = [limit for limit, _ in _cgroup_levels(root)]
    machine = _meminfo(root).get("MemTotal")
    if machine is None and root == Path("/"):
        try:
            machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            machine = None
    if machine is not None:
        sizes.append(machine)
    return min(sizes) if sizes else None


def available_memory_bytes(root: Path = Path("/")) -> int | None:
    """What more this process may take now without the kernel reclaiming or killing: the machine's
    MemAvailable, or less where a limited memory cgroup of this process (or one above) is nearer its limit
    (its limit less its usage, less the page cache it could drop first). None where nothing says."""
    room = [max(0, limit - used) for limit, used in _cgroup_levels(root) if used is not None]
    available = _meminfo(root).get("MemAvailable")
    if available is not None:
        room.append(available)
    return min(room) if room else None


def bound_host_memory(setting: int | str) -> int | None:
    """Bound what ORT's runs in this process may hold at once (models.run_memory_bytes): registers the
    process's one CPU arena with that max_mem on the first call (bytes; "auto": AVAILABLE_SHARE of the
    memory available now; "off": none). Returns the bound sessions opened from now on may use (that of
    the first call: ORT keeps one such arena for the process's life), None where there is none."""
    global _bound, _registered
    with _lock:
        if _registered:
            if setting != "off" and _bound is not None and isinstance(setting, int) and setting != _bound:
                log.warning(
                    "run memory bound stays %d bytes (set once per process; %d asked)", _bound, setting
                )
            return None if setting == "off" else _bound
        if setting == "off":
            return None
        _registered = True
        if isinstance(setting, int):
            bound = setting
        else:
            available = available_memory_bytes()
            if available is None:
                log.warning("no bound on the memory of model runs: the system says none is available")
                return None
            bound = max(MIN_BOUND_BYTES, int(available * AVAILABLE_SHARE))
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"max_mem": bound}))
        except Exception as exc:  # noqa: BLE001 - ORT raises many types; runs stay unbounded, as before
            log.warning("no bound on the memory of model runs: ORT refused a bounded arena: %s", exc)
            return None
        _bound = bound
        log.info("model runs may hold %d MiB of memory at once (models.run_memory_bytes)", bound >> 20)
        return bound


def run_memory_bound() -> int | None:
    """The bound of this process's shared CPU arena (bound_host_memory), None where there is none."""
    return _bound


def use_bounded_arena(options: ort.SessionOptions) -> None:
    """Let a session allocate its CPU tensors from the process's bounded arena (if there is one), with
    no weights prepacked: ORT reserves prepacked weights in that arena without a check, and once they
    pass the bound its count of what is left wraps and it refuses nothing (review /tmp/review-late/m6;
    unpacked, the bound held across 4 sessions of a 200 MB model, and surface_defect_224_u8 ran as
    fast: 144.7 against 140.8 rows/s; a MatMul-heavy fp32 model may lose more)."""
    if _bound is not None:
        options.add_session_config_entry(USE_ENV_ALLOCATORS, "1")
        options.add_session_config_entry(NO_PREPACKING, "1")


def _meminfo(root: Path) -> dict[str, int]:
    found = {}
    try:
        text = (root / "proc/meminfo").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if name in ("MemTotal", "MemAvailable") and fields and fields[0].isdigit():
            found[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return found


def _cgroup_levels(root: Path) -> list[tuple[int, int | None]]:
    """(limit, usage less inactive page cache) of every limited memory cgroup from this process's own up
    to the root of its hierarchy, v2 (unified) or v1 (the memory controller's)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    levels = []
    for line in lines:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            base, files = root / "sys/fs/cgroup", ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base = root / "sys/fs/cgroup/memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        parts = [part for part in path.strip().split("/") if part]
        # From the process's own cgroup up to the hierarchy's root; in a container whose cgroup path is the
        # host's but whose mount is its own cgroup, the walk ends at the mount, which holds the limit.
        for depth in range(len(parts), -1, -1):
            level = base.joinpath(*parts[:depth])
            limit = _read_int(level / files[0])
            if limit is None or limit >= _V1_UNLIMITED:
                continue
            used = _read_int(level / files[1])
            if used is not None:
                used = max(0, used - _stat(level / "memory.stat", files[2]))
            levels.append((limit, used))
    return levels


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _stat(path: Path, name: str) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return 0
