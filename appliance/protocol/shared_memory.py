"""Triton's shared-memory parameters of a tensor: where it lies in a registered region, checked, and
an output written there. The regions themselves are the data plane's (dataplane/regions.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from appliance import tensors
from appliance.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class RegionRef:
    """Where a tensor lies in a registered shared-memory region: its parameters.shared_memory_region,
    shared_memory_byte_size and shared_memory_offset (from the region's start)."""

    region: str
    byte_size: int
    offset: int = 0


class Regions(Protocol):
    """The registered shared-memory regions (dataplane/regions.py). Never a view of a client's object:
    one it shrinks would stop the service (SIGBUS) when a later read or write touched it."""

    def check(self, ref: RegionRef, *, writable: bool = False) -> None:
        """InvalidInput for an unknown region, bytes past its end or, with `writable`, a read-only one."""
        ...

    def read(self, ref: RegionRef) -> memoryview:
        """A private copy of the bytes `ref` names (InvalidInput as `check`, or the object shrank)."""
        ...

    def write(self, ref: RegionRef, data: bytes | memoryview) -> None:
        """Write `data` where `ref` names (InvalidInput as `check`, or the object shrank)."""
        ...


def region_ref(parameters: Mapping[str, Any], owner: str, regions: Regions | None) -> RegionRef | None:
    """A tensor's shared-memory parameters, checked; None when it names no region."""
    region = parameters.get("shared_memory_region")
    byte_size = parameters.get("shared_memory_byte_size")
    offset = parameters.get("shared_memory_offset", 0)
    if region is None:
        if byte_size is not None or "shared_memory_offset" in parameters:
            raise InvalidInput(f"{owner} has shared_memory_byte_size or _offset but no shared_memory_region")
        return None
    if regions is None:
        raise InvalidInput(f"{owner} names shared-memory region {region!r:.80}; this transport has none")
    if not isinstance(region, str):
        raise InvalidInput(f"{owner} shared_memory_region must be a string, got {region!r:.80}")
    if type(byte_size) is not int or byte_size < 0:
        raise InvalidInput(f"{owner} needs shared_memory_byte_size, a non-negative integer, with its region")
    if type(offset) is not int or offset < 0:
        raise InvalidInput(f"{owner} shared_memory_offset must be a non-negative integer, got {offset!r:.40}")
    return RegionRef(region, byte_size, offset)


def write_region(regions: Regions, ref: RegionRef, name: str, array: np.ndarray) -> dict[str, Any]:
    """Write an output where the client asked (one copy, from the runtime's buffer to the object, once,
    right after inference); the answer's parameters for it: the region and the bytes written."""
    blob = tensors.to_bytes(array)
    if len(blob) > ref.byte_size:
        raise InvalidInput(
            f"output {name!r} takes {len(blob)} bytes; its shared_memory_byte_size in region "
            f"{ref.region!r} is {ref.byte_size}"
        )
    regions.write(RegionRef(ref.region, len(blob), ref.offset), blob)
    return {"shared_memory_region": ref.region, "shared_memory_byte_size": len(blob)}
