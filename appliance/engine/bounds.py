"""What loading a model may cost: the bytes a warm-up feed may hold and how long a warm-up run may take.

Memory: the data plane refuses any request larger than request_bytes_limit (an HTTP or gRPC body, or
the shared memory a request may point at), so no batch needs to hold more. Warm-up and the first run
never build a feed past it: a model whose one row (one request, unbatched) is larger cannot serve and
is UNAVAILABLE; a batched one has its max_batch_size cut to the rows that fit (model._fit).

Time: warm-up and first runs are stopped (RunOptions.terminate) past a deadline, so that a graph that
never ends (a Loop of 10^12 turns) makes its model UNAVAILABLE, and its loading thread ends, instead of
running for ever (the hub gives up waiting after models.load_timeout_s, but cannot stop the thread).
A batch that takes ten times the model's objective cannot serve the line; a minute at least leaves room
for a busy box and the allocations of a first run. A device provider may build its engine for a shape
on the first run that sees it (TensorRT with dynamic shapes: minutes on a small board): its first run of
each size gets the whole models.load_timeout_s. No run gets more than that.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Sequence
from typing import Any, TypeVar

import onnxruntime as ort

from appliance.engine.signature import Signature
from appliance.errors import ApplianceError, ModelLoadError
from appliance.providers.base import uses_host_cores
from appliance.providers.registry import Registry
from appliance.settings import ServerSettings
from appliance.tensors import DYNAMIC

log = logging.getLogger(__name__)
Limits = TypeVar("Limits", bound=Any)  # model.BatchLimits (a frozen dataclass)

RUN_LIMIT_MIN_S = 60.0
RUN_LIMIT_SLO_FACTOR = 10.0
BYTES_ELEMENT_WIRE_BYTES = 4  # a BYTES element takes at least its 4-byte length on the wire


class RunTooLong(ModelLoadError):
    """A warm-up or first run did not finish by its deadline and was stopped."""


def warmup_limit_s(slo_p99_ms: float, load_timeout_s: float) -> float:
    """The deadline of a warm-up run of a model with this objective (module header)."""
    return min(load_timeout_s, max(RUN_LIMIT_MIN_S, RUN_LIMIT_SLO_FACTOR * slo_p99_ms / 1000))


def first_run_limit_s(limit_s: float, load_timeout_s: float, *, builds: bool) -> float:
    """The deadline of a first run of a size: the whole load's where the provider may build an engine."""
    return max(limit_s, load_timeout_s) if builds else limit_s


class Deadline:
    """RunOptions that stop the runs made with them (RunOptions.terminate, checked between nodes) once
    `limit_s` has passed since entering; a run so stopped leaves the block as RunTooLong."""

    def __init__(self, limit_s: float, rows: int) -> None:
        self.options = ort.RunOptions()
        self.limit_s = limit_s
        self.rows = rows
        self._stopped = threading.Event()
        self._timer = threading.Timer(limit_s, self._stop)
        self._timer.daemon = True

    def _stop(self) -> None:
        self._stopped.set()
        self.options.terminate = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._timer.cancel()
        if isinstance(exc, Exception) and self._stopped.is_set():
            raise RunTooLong(
                f"a run of {self.rows} row(s) did not finish in {self.limit_s:.0f} s and was stopped"
            ) from None


def host_eps(registry: Registry, chain: Sequence[str]) -> frozenset[str]:
    """The ORT names of the providers in `chain` that compute on the host's cores (no engine builds)."""
    names = set()
    for name in chain:
        try:
            provider = registry.get(name)
        except ApplianceError:
            continue
        if uses_host_cores(provider):
            names.add(provider.ep_name)
    return frozenset(names)


def request_bytes_limit(server: ServerSettings) -> int:
    """The largest request the data plane accepts: an HTTP or gRPC body, or the shared memory a
    request may point at where shared memory is on."""
    shm = server.max_shm_bytes if server.max_shm_regions > 0 else 0
    return max(server.max_body_bytes, shm)


def row_bytes(signature: Signature, is_batched: bool) -> int | None:
    """Bytes of one row of every input (of the whole feed when not batched); None if a size is unknown."""
    total = 0
    for spec in signature.inputs:
        dims = spec.shape[1:] if is_batched else spec.shape
        if DYNAMIC in dims:
            return None
        each = BYTES_ELEMENT_WIRE_BYTES if spec.datatype == "BYTES" else spec.dtype.itemsize
        total += math.prod(dims) * each
    return total


def rows_that_fit(
    name: str, signature: Signature, is_batched: bool, max_bytes: int
) -> tuple[int, int] | None:
    """(rows of a batch that fit in `max_bytes`, bytes per row), None if a size is unknown;
    ModelLoadError when not even one row (the one request, unbatched) could be sent."""
    size = row_bytes(signature, is_batched)
    if size is None:
        return None
    if size > max_bytes:
        what = "one row of its inputs" if is_batched else "its inputs"
        raise ModelLoadError(
            f"model {name!r} cannot serve: {what} take {size} bytes; the largest request the service "
            f"accepts has {max_bytes} (server.max_body_bytes, server.max_shm_bytes)"
        )
    return (max_bytes // size if size else 2**62), size


def cut_batches(name: str, signature: Signature, limits: Limits, max_bytes: int) -> Limits:
    """`limits` (model.BatchLimits) cut so that no batch holds more than the largest request."""
    fit = rows_that_fit(name, signature, limits.is_batched, max_bytes)
    if fit is None or not limits.is_batched or fit[0] >= limits.max_batch_size:
        return limits
    rows, size = fit
    log.warning(
        "model %s: max_batch_size %d cut to %d: a batch holds no more than the largest request the "
        "service accepts (%d bytes; %d per row)",
        name,
        limits.max_batch_size,
        rows,
        max_bytes,
        size,
    )
    preferred = tuple(s for s in limits.preferred_batch_sizes if s <= rows) or powers(rows)
    return dataclasses.replace(limits, max_batch_size=rows, preferred_batch_sizes=preferred)


def powers(max_rows: int) -> tuple[int, ...]:
    """1, every power of two up to `max_rows`, and `max_rows`: the sizes warmed up by default."""
    return tuple(sorted({1, *(2**k for k in range(max_rows.bit_length()) if 2**k <= max_rows), max_rows}))
