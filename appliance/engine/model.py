"""LoadedModel: an ORT session on the provider that took it, its signature, warm-up and `run`."""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from appliance.engine.arena import ArenaKeeper, Tries
from appliance.engine.bounds import (
    Deadline,
    RunTooLong,
    cut_batches,
    first_run_limit_s,
    host_eps,
    powers,
    request_bytes_limit,
    row_bytes,
    warmup_limit_s,
)
from appliance.engine.failures import translate
from appliance.engine.manifest import Batching, InputOverride
from appliance.engine.memory import bound_host_memory, use_bounded_arena
from appliance.engine.modelfiles import ModelFiles, read_model
from appliance.engine.repository import ModelSource
from appliance.engine.signature import Signature, example_feed, read_signature
from appliance.errors import (
    InferenceFailed,
    InvalidInput,
    ModelLoadError,
    Overloaded,
)
from appliance.providers.base import SessionContext
from appliance.providers.host import ort_reason
from appliance.providers.registry import Registry
from appliance.providers.selection import Fallback, Placement, open_session
from appliance.settings import ModelSettings, ServerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """How rows may be batched for one model (max_batch_size 0: one request at a time)."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_ms: float

    @property
    def is_batched(self) -> bool:
        return self.max_batch_size > 0


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run. `run` may be called from several threads at once (ORT allows it)."""

    source: ModelSource
    placement: Placement  # the session and the provider that took it, with every fallback
    signature: Signature
    digest: str
    precision: str
    limits: BatchLimits
    slo_p99_ms: float
    threads_per_call: int
    load_s: float
    warmup: list[tuple[int, float]] = field(default_factory=list)  # (rows, seconds)
    # A second session on every core the model may use, for a request that runs alone (open_solo):
    # DESIGN's one session per model splits the cores between K calls, which leaves a lone request
    # on cores / K threads. None where K is 1 or the provider has no host cores to give.
    solo: ort.InferenceSession | None = None
    solo_threads: int = 0
    solo_bytes: int = 0  # what the second session cost, as the process's RSS grew when it opened
    max_request_bytes: int = 0  # the largest request the data plane accepts: no batch holds more
    run_limit_s: float = 60.0  # a warm-up run past it is stopped (engine/bounds.py)
    build_limit_s: float = 600.0  # a device provider's first run of a size, past it (models.load_timeout_s)
    # Opens the model again as `load` opened it (files, digest, provider, options): a session that a run
    # failure spoiled, and a reset did not mend, is replaced (engine/arena.py). None: it is kept.
    reopen: Callable[[], ort.InferenceSession] | None = field(default=None, repr=False)
    arena: ArenaKeeper = field(default_factory=ArenaKeeper, repr=False)  # resets, renewals (arena.py)
    bounded: bool = False  # its sessions' CPU memory comes from the process's bounded arena (memory.py)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def version(self) -> str:
        return str(self.source.version)

    @property
    def session(self) -> ort.InferenceSession:
        return self.placement.session

    def close(self) -> None:
        """Free both sessions now, after the scheduler's last batch, rather than whenever the cyclic
        garbage collector next finds this model: ORT's memory and threads go with them."""
        with self.arena.lock:  # a session renewed now would outlive the model
            self.solo = None
            self.placement.session = None  # type: ignore[assignment]  # nothing runs a closed model
            self.arena.forget()

    @property
    def provider(self) -> str:
        return self.placement.provider

    @property
    def fallbacks(self) -> list[Fallback]:
        return self.placement.fallbacks

    @classmethod
    def load(
        cls,
        source: ModelSource,
        *,
        registry: Registry,
        settings: ModelSettings,
        provider_configs: Mapping[str, object],
        cache_dir: Path,
        threads_per_call: int,
        providers: Sequence[str] | None = None,
        max_request_bytes: int | None = None,
        expected_digest: str | None = None,
        run_limit_s: float | None = None,
    ) -> LoadedModel:
        """Verify, open and inspect a model; ModelLoadError with ORT's reason if it cannot serve.

        `providers` pins the chain (a replica reopens the model on the provider that took it).
        `max_request_bytes`: the largest request the data plane accepts (request_bytes_limit; unset:
        that of the default server settings). `expected_digest`: the digest the model must still have
        (a replica's). `run_limit_s`: the deadline of each warm-up run (unset: engine/bounds.py).
        """
        started = time.perf_counter()
        manifest = source.manifest
        try:
            files = read_model(source.path)
        except ModelLoadError as exc:
            raise ModelLoadError(f"model {source.name!r}: {exc}") from None
        digest = file_digest(files)
        if expected_digest and expected_digest != digest:
            raise ModelLoadError(
                f"{source.path} changed since the service loaded it (sha256 {digest} of "
                f"{files.described}, served {expected_digest})"
            )
        if manifest.sha256 and manifest.sha256 != digest:
            raise ModelLoadError(
                f"model {source.name!r}: {files.described} has sha256 {digest}; model.toml expects "
                f"{manifest.sha256}"
            )
        slo_p99_ms = manifest.slo_p99_ms or settings.default_slo_p99_ms
        limit_s = run_limit_s or warmup_limit_s(slo_p99_ms, settings.load_timeout_s)
        build_s = max(limit_s, settings.load_timeout_s)
        bound = request_bytes_limit(ServerSettings()) if max_request_bytes is None else max_request_bytes
        chain = registry.chain(list(providers) if providers else manifest.providers or settings.providers)
        bounded = bound_host_memory(settings.run_memory_bytes) is not None
        try:
            placement = open_session(
                files.model,
                chain=chain,
                registry=registry,
                configs=provider_configs,  # type: ignore[arg-type]
                context=SessionContext(source.name, digest, cache_dir),
                session_options=lambda: files.add_to(session_options(threads_per_call, bounded=bounded)),
                verify=_first_run(manifest.inputs, bound, (limit_s, build_s), host_eps(registry, chain)),
            )
        except ModelLoadError as exc:
            raise ModelLoadError(f"model {source.name!r} failed to load: {exc}") from exc
        signature = read_signature(placement.session, manifest.inputs)

        def reopen() -> ort.InferenceSession:
            again = read_model(source.path)
            if file_digest(again) != digest:
                raise ModelLoadError(f"{source.path} changed since it was loaded ({again.digest})")
            return open_session(
                again.model,
                chain=[placement.provider],
                registry=registry,
                configs=provider_configs,  # type: ignore[arg-type]
                context=SessionContext(source.name, digest, cache_dir),
                session_options=lambda: again.add_to(session_options(threads_per_call, bounded=bounded)),
            ).session

        limits = cut_batches(source.name, signature, _limits(signature, manifest.batching, settings), bound)
        return cls(
            source=source,
            placement=placement,
            signature=signature,
            digest=digest,
            precision=manifest.precision or files.precision,
            limits=limits,
            slo_p99_ms=slo_p99_ms,
            threads_per_call=threads_per_call,
            load_s=time.perf_counter() - started,
            max_request_bytes=bound,
            run_limit_s=limit_s,
            build_limit_s=build_s,
            reopen=reopen,
            bounded=bounded,
        )

    def open_solo(self, threads: int) -> None:
        """Open the second session, on `threads` threads, and record what it cost in memory; a
        failure leaves the model without one (a lone request then runs as any other)."""
        before = _rss_bytes()
        try:
            solo = self.new_solo_session(threads)
        except Exception as exc:  # noqa: BLE001 - an optimisation: without it the model serves as before
            log.warning(
                "model %s: no %d-thread session for requests alone: %s", self.name, threads, ort_reason(exc)
            )
            return
        self.solo, self.solo_threads = solo, threads
        self.solo_bytes = max(0, _rss_bytes() - before)

    def new_solo_session(self, threads: int) -> ort.InferenceSession:
        """A solo session on `threads` threads, after its first run (open_solo; arena.py renews one)."""
        files = read_model(self.source.path)  # read again, never mapped: the same digest or none
        if file_digest(files) != self.digest:
            raise ModelLoadError(f"{self.source.path} changed since it was loaded ({files.digest})")
        # It runs only while nothing else does, so its threads may spin between operators: the
        # lone request's latency, not the shared cores, is what it is for. Without spinning the
        # 224 model took 3.3 ms here against raw ORT's 2.8 (its default spins).
        options = files.add_to(session_options(threads, spinning=True, bounded=self.bounded))
        solo = ort.InferenceSession(files.model, options, providers=self.session.get_providers())
        del files  # ORT has copied what it needs
        feed = self.example_inputs(1)
        if feed is not None:
            with Deadline(self._limit_s(first=True), 1) as deadline:  # first run allocates
                solo.run(None, feed, deadline.options)
        return solo

    def run(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        control: RunControl | None = None,
        *,
        is_solo: bool = False,
    ) -> dict[str, np.ndarray]:
        """Run the session; InvalidInput when ORT rejects the values, InferenceFailed otherwise.

        Releases the GIL while ORT computes, so several threads may call it at once. A failure that may
        have spoiled the session's memory arena (engine/failures.py) resets it, or renews the session
        where that cannot help (engine/arena.py); a run that met an overflow runs again after that: it may
        have met the arena another request spoiled.
        """
        names = list(outputs) if outputs is not None else self.signature.output_names
        feed = {name: _ort_value(name, array) for name, array in inputs.items()}
        solo = is_solo and self.solo is not None
        session = self.solo if solo else self.session
        tries = Tries()
        while True:
            try:
                results = session.run(names, feed, control.options if control else None)
                break
            except Exception as exc:
                again = self.arena.recover(self, session, exc, solo=solo, tries=tries)
                if control is not None and control.is_terminated:
                    raise Terminated(f"model {self.name!r}: run stopped to make way for line work") from exc
                if isinstance(again, Overloaded):
                    raise again from exc
                if again is None:
                    raise translate(self.name, exc, has_open_shapes=self.signature.has_open_shapes) from exc
                session, solo = again, again is self.solo
        return dict(zip(names, results, strict=True))

    def warm_up(self, runs: int) -> list[tuple[int, float]]:
        """Run every preferred batch size `runs` times; check batched outputs keep their rows.

        Returns (rows, seconds) observations that seed the latency profile. A model whose
        outputs do not follow the batch dimension is downgraded to one request at a time. Each run
        has a deadline (`run_limit_s`): past it at the first size the model cannot serve
        (ModelLoadError); at a larger size, batches stop short of it.
        """
        sizes = self.limits.preferred_batch_sizes if self.limits.is_batched else (1,)
        observations: list[tuple[int, float]] = []
        for rows in sizes:
            feed = self.example_inputs(rows)
            if feed is None:
                log.warning("model %s: warm-up skipped; set input shapes in model.toml", self.name)
                return observations
            try:
                with Deadline(self._limit_s(first=True), rows) as deadline:  # first run allocates; not timed
                    results = self.session.run(None, feed, deadline.options)
                if self.limits.is_batched and rows > 1 and not _rows_follow(results, rows):
                    log.warning(
                        "model %s: outputs do not follow the batch dimension; not batching", self.name
                    )
                    self.limits = BatchLimits(0, (), 0.0)
                    return self.warm_up(runs)
                for _ in range(runs):
                    with Deadline(self.run_limit_s, rows) as deadline:
                        started = time.perf_counter()
                        self.session.run(None, feed, deadline.options)
                        observations.append((rows, time.perf_counter() - started))
            except RunTooLong as exc:
                if rows == sizes[0]:
                    raise ModelLoadError(f"model {self.name!r} cannot serve: {exc}") from None
                smaller = tuple(size for size in sizes if size < rows)
                log.warning("model %s: %s; batches stop at %d rows", self.name, exc, smaller[-1])
                self.limits = BatchLimits(smaller[-1], smaller, self.limits.max_queue_delay_ms)
                break
            except ModelLoadError:  # the downgraded warm-up's own
                raise
            except Exception as exc:  # noqa: BLE001 - ORT raises many types; the model serves what it can
                log.warning("model %s: warm-up with %d rows failed: %s", self.name, rows, ort_reason(exc))
                return observations
        self.warmup = observations
        return observations

    def _limit_s(self, *, first: bool) -> float:
        builds = first and not self.placement.uses_host_cores
        return first_run_limit_s(self.run_limit_s, self.build_limit_s, builds=builds)

    def example_inputs(self, rows: int) -> dict[str, np.ndarray] | None:
        """Zero inputs of `rows` rows; None when a non-batch dim is dynamic (size unknown)."""
        return example_feed(self.signature, rows if self.limits.is_batched else None)


def file_digest(files: ModelFiles) -> str:
    """The sha256 a model is served under: model.onnx's and its external data's (engine/modelfiles.py).
    A seam: the platform tests' dishonest node replaces it (tests/integration/platform/dishonest)."""
    return files.digest


def _first_run(
    overrides: Mapping[str, InputOverride],
    max_bytes: int,
    limits_s: tuple[float, float],
    host_eps: frozenset[str],
) -> Callable[[ort.InferenceSession], None]:
    """One run right after session creation: some EPs (TensorRT, CUDA out of memory) fail only then.

    A provider that fails it falls back to the next. A rejection of the zero inputs themselves
    (INVALID_ARGUMENT, e.g. a shape input of 0) says nothing about the provider and is ignored.
    Inputs larger than any request are not made (the load then says why the model cannot serve); the
    run is stopped past its deadline (a device provider's first run may build its engine).
    """

    def verify(session: ort.InferenceSession) -> None:
        signature = read_signature(session, overrides)
        rows = 1 if signature.is_batchable else None
        size = row_bytes(signature, rows is not None)
        if size is not None and size > max_bytes:
            return
        feed = example_feed(signature, rows)
        if feed is None:
            return
        builds = session.get_providers()[0] not in host_eps
        try:
            with Deadline(first_run_limit_s(*limits_s, builds=builds), 1) as deadline:
                session.run(None, feed, deadline.options)
        except RunTooLong:
            raise
        except Exception as exc:
            if "INVALID_ARGUMENT" not in str(exc):
                raise

    return verify


class Terminated(InferenceFailed):
    """A run was stopped on purpose by RunControl.terminate (preemption); its work may be retried."""


class RunControl:
    """Lets another thread stop a run in progress (ORT checks RunOptions.terminate between nodes)."""

    def __init__(self) -> None:
        self.options = ort.RunOptions()
        self.is_terminated = False

    def terminate(self) -> None:
        self.is_terminated = True
        self.options.terminate = True


def _rss_bytes() -> int:
    """This process's resident memory now (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def session_options(
    threads_per_call: int, *, spinning: bool = False, bounded: bool = False
) -> ort.SessionOptions:
    """`bounded`: CPU memory from the process's bounded arena (engine/memory.py), where it has one."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads_per_call
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning pool threads burn the cores the event loop and the other workers need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 4  # failures reach the caller with ORT's reason; no stderr noise
    if bounded:
        use_bounded_arena(options)
    return options


def _limits(signature: Signature, batching: Batching, settings: ModelSettings) -> BatchLimits:
    if not signature.is_batchable:
        return BatchLimits(0, (), 0.0)
    max_rows = (
        batching.max_batch_size if batching.max_batch_size is not None else settings.default_max_batch_size
    )
    if max_rows == 0:
        return BatchLimits(0, (), 0.0)
    preferred = tuple(size for size in batching.preferred_batch_sizes if size <= max_rows)
    delay = batching.max_queue_delay_ms
    default_delay = settings.default_max_queue_delay_ms
    return BatchLimits(max_rows, preferred or powers(max_rows), default_delay if delay is None else delay)


def _rows_follow(results: Sequence[np.ndarray], rows: int) -> bool:
    return all(array.ndim >= 1 and array.shape[0] == rows for array in results)


def _ort_value(name: str, array: np.ndarray) -> np.ndarray:
    """ONNX string tensors hold text: BYTES elements must be UTF-8."""
    if array.dtype != object:
        return array
    try:
        return np.vectorize(_decode, otypes=[object])(array) if array.size else array
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"input {name!r} holds bytes that are not UTF-8 text: {exc.reason}") from None


def _decode(item: bytes | str) -> str:
    return item.decode() if isinstance(item, bytes) else item


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    A retired model's sessions are freed, but glibc keeps what they held: each reload of the 128x128
    model grew the service by 4-8 MB, for good (30 reloads in a soak: +11% RSS). Trimmed after each
    retirement, it levels off after about 15 reloads.
    """
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return
    trim(0)
