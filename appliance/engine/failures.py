"""What an ONNX Runtime run failure means for the request that met it: its fault (400, 413), the box's
state now (503, try again), or the model's (500). ORT reports most of them as FAIL, whoever is at fault,
so the text decides."""

from __future__ import annotations

import re

from appliance.engine.memory import run_memory_bound, total_memory_bytes
from appliance.errors import ApplianceError, InferenceFailed, InvalidInput, Overloaded, RequestTooLarge
from appliance.providers.host import ort_reason

_INPUT_ERRORS = ("INVALID_ARGUMENT", "InvalidArgument", "invalid argument")
# ORT's kernels report a size they cannot compute with (MatMul's inner dimensions, a broadcast, a
# reshape) as FAIL, as they report the model's own faults: the request's where the client chose that size
# (an open dimension besides the batch's), else the model's (a 500). Indices out of bounds (Gather's) are
# INVALID_ARGUMENT already.
_SHAPE_ERRORS = (
    "dimension mismatch",
    "broadcast",
    "cannot be reshaped",
    "ncompatible dimensions",
    "invalid dimensions",
    "shape mismatch",
)
# Memory the run could not get (the CPU arena's bad_alloc, a device's allocator): the box's state now,
# not the request's fault nor the model's: 503, try again.
_MEMORY_ERRORS = ("bad_alloc", "Failed to allocate memory", "out of memory", "ALLOC_FAILED")
# ORT's arenas (CPU and device) name the size they could not get. One larger than all of the memory the
# service may use (the machine's, or its cgroup's limit: engine/memory.py; a device's is not more) can
# never be had: the request, not the box's state, is at fault
# (attention over an open sequence of 400,000 tokens asks 640 GB): 413, do not try again.
_ALLOCATION_SIZE = re.compile(r"Failed to allocate memory for requested buffer of size (\d{1,30})")
# A bounded arena (the process's CPU arena, engine/memory.py; a device's with a memory limit) refuses a
# buffer that does not fit under its bound before it asks the system for any memory, naming both sizes.
# Over the bound itself no run can ever hold it: 413. Under it, other runs hold the memory now, or the
# arena keeps free regions too small for it (a reset frees them and the run goes again: engine/arena.py):
# 503, try again.
_REFUSED = re.compile(r"Available memory of (\d{1,30}) is smaller than requested bytes of (\d{1,30})")
# A size past 64 bits: SafeInt's "Integer overflow" (a shape's element count, a byte count, the arena's next
# region) or the tensor storage check. Only the request's values make one (ConstantOfShape, Expand of a
# shape it sends: [2^31, 2^31, 4]): 413. ORT reports both as FAIL.
_SAFEINT_OVERFLOW = "Integer overflow"
_OVERFLOW_ERRORS = (_SAFEINT_OVERFLOW, "Calculation for Tensor storage size overflowed")
# Where the total is unknown, a buffer past this is still more than any box this serves on has.
_NO_BOX_HAS_BYTES = 1 << 48

# A session's memory arena can be spoiled by one such request (ORT 1.32's BFCArena, the CPU's and a
# device's alike): to cover a request it doubles the size of its next region, curr_region_allocation_bytes_
# (a SafeInt<size_t>), and keeps it when that allocation then fails. After a request of 2^63 bytes (2^61
# floats) it stays at 2^63, and every later growth of the arena overflows doubling it: every run that needs
# more memory than the arena holds free fails with "Integer overflow", n = 3 included on a session that had
# grown none yet, until the session is made again. After a failed request of more than the machine's
# memory but less, the next growth first asks for that size and backs off by 10% until malloc gives:
# about all of the machine's memory reserved for a 3 MB request. So the engine resets (or replaces) a
# session after either failure (engine/arena.py). A bounded arena (engine/memory.py: every CPU session's
# where models.run_memory_bytes is set) refuses such a buffer before it doubles anything: "Available
# memory of ... is smaller than requested bytes of ...", which spoils nothing.


def translate(model: str, exc: Exception, *, has_open_shapes: bool = False) -> ApplianceError:
    """The error a run failure of `model` is answered with; `has_open_shapes`: the model leaves a
    dimension besides the batch's to the client (Signature.has_open_shapes)."""
    text = ort_reason(exc)
    if any(marker in str(exc) for marker in _OVERFLOW_ERRORS):
        return RequestTooLarge(
            f"model {model!r} cannot run this request: a size computed from its values does not fit in "
            f"64 bits ({text}); send smaller values"
        )
    if (refused := _REFUSED.search(str(exc))) is not None:
        return _refusal(model, int(refused.group(2)), int(refused.group(1)))
    if isinstance(exc, MemoryError) or any(marker in text for marker in _MEMORY_ERRORS):
        found = _ALLOCATION_SIZE.search(str(exc))  # the size may be past ort_reason's first line
        total = total_memory_bytes()
        if found is not None and total is not None and int(found.group(1)) > total:
            return _never(model, int(found.group(1)), total)
        return Overloaded(f"model {model!r} could not get the memory to run this request now: {text}")
    if any(marker in text for marker in _INPUT_ERRORS) or type(exc).__name__ == "InvalidArgument":
        return InvalidInput(f"model {model!r} rejected the input: {text}")
    if has_open_shapes and any(marker in text for marker in _SHAPE_ERRORS):
        return InvalidInput(f"model {model!r} cannot compute with the input's sizes: {text}")
    return InferenceFailed(f"model {model!r} failed: {text}")


def _never(model: str, size: int, total: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"model {model!r} cannot run this request: it needs a buffer of {size} bytes, more than all of "
        f"this machine's memory ({total} bytes); send a smaller request"
    )


def _refusal(model: str, size: int, free: int) -> ApplianceError:
    """The answer to a buffer of `size` bytes that a bounded arena refused with `free` bytes left."""
    total = total_memory_bytes()
    if total is not None and size > total:
        return _never(model, size, total)
    bound = run_memory_bound()
    if bound is not None and size > bound:
        return RequestTooLarge(
            f"model {model!r} cannot run this request: it needs a buffer of {size} bytes, more than the "
            f"runs of this service may hold at once ({bound} bytes, models.run_memory_bytes); send a "
            "smaller request"
        )
    return Overloaded(
        f"model {model!r} could not get the memory to run this request now: it needs a buffer of {size} "
        f"bytes and other runs leave {free} bytes of what runs may hold; try again"
    )


def needs_room(exc: Exception) -> bool:
    """Whether a bounded arena refused a buffer that fits under its bound (its own, or where unknown that
    of a device): the memory other runs hold now, or free regions the arena keeps (a reset frees those)."""
    refused = _REFUSED.search(str(exc))
    if refused is None:
        return False
    bound = run_memory_bound()
    return bound is None or int(refused.group(2)) <= bound


def spoils_session(exc: Exception) -> bool:
    """Whether a run failure may have spoiled its session's memory arena (above): an overflow, or a
    buffer larger than all of the machine's memory asked of the arena."""
    if is_overflow(exc):
        return True
    found = _ALLOCATION_SIZE.search(str(exc))
    return found is not None and int(found.group(1)) > (total_memory_bytes() or _NO_BOX_HAS_BYTES)


def is_overflow(exc: Exception) -> bool:
    """SafeInt's overflow: a size the request made too large, or what a spoiled arena answers any run
    that needs it to grow (the one failure a run on a new session may not meet again)."""
    return _SAFEINT_OVERFLOW in str(exc)
