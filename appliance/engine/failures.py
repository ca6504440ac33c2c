"""What an ONNX Runtime run failure means for the request that met it: its fault (400, 413), the box's
state now (503, try again), or the model's (500). ORT reports most of them as FAIL, whoever is at fault,
so the text decides."""

from __future__ import annotations

import os
import re

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
# ORT's arenas (CPU and device) name the size they could not get. One larger than all of the machine's
# memory (a device's is not more) can never be had: the request, not the box's state, is at fault
# (attention over an open sequence of 400,000 tokens asks 640 GB): 413, do not try again.
_ALLOCATION_SIZE = re.compile(r"Failed to allocate memory for requested buffer of size (\d{1,30})")


def total_memory_bytes() -> int | None:
    """All of the machine's memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def translate(model: str, exc: Exception, *, has_open_shapes: bool = False) -> ApplianceError:
    """The error a run failure of `model` is answered with; `has_open_shapes`: the model leaves a
    dimension besides the batch's to the client (Signature.has_open_shapes)."""
    text = ort_reason(exc)
    if isinstance(exc, MemoryError) or any(marker in text for marker in _MEMORY_ERRORS):
        found = _ALLOCATION_SIZE.search(str(exc))  # the size may be past ort_reason's first line
        total = total_memory_bytes()
        if found is not None and total is not None and int(found.group(1)) > total:
            return RequestTooLarge(
                f"model {model!r} cannot run this request: it needs a buffer of {int(found.group(1))} "
                f"bytes, more than all of this machine's memory ({total} bytes); send a smaller request"
            )
        return Overloaded(f"model {model!r} could not get the memory to run this request now: {text}")
    if any(marker in text for marker in _INPUT_ERRORS) or type(exc).__name__ == "InvalidArgument":
        return InvalidInput(f"model {model!r} rejected the input: {text}")
    if has_open_shapes and any(marker in text for marker in _SHAPE_ERRORS):
        return InvalidInput(f"model {model!r} cannot compute with the input's sizes: {text}")
    return InferenceFailed(f"model {model!r} failed: {text}")
