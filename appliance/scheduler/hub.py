"""ModelHub: every model of the repository, its state, and atomic load/unload/reload."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from appliance.engine.bounds import request_bytes_limit
from appliance.engine.model import LoadedModel, return_freed_memory
from appliance.engine.replica import ReplicaSpec
from appliance.engine.repository import ModelSource, Repository
from appliance.errors import (
    ApplianceError,
    Draining,
    ModelLoadError,
    ModelLoading,
    ModelNotFound,
    ModelNotReady,
)
from appliance.providers.registry import Registry
from appliance.scheduler import instances as instance_choice
from appliance.scheduler.capacity import CpuBudget
from appliance.scheduler.loading import DeadlineLoads
from appliance.scheduler.placement import rules_for
from appliance.scheduler.runner import ModelScheduler, SchedulerConfig
from appliance.scheduler.view import ModelView, pool_where
from appliance.settings import Settings

log = logging.getLogger(__name__)
UNLOADED = "unloaded"  # the reason of a model unloaded on request (readiness skips it, as Triton's does)

_Loaded = tuple[LoadedModel, int, list[instance_choice.Trial]]


class State(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(slots=True)
class ModelEntry:
    name: str
    state: State
    reason: str = ""
    scheduler: ModelScheduler | None = None
    trials: list[instance_choice.Trial] = field(default_factory=list)

    @property
    def version(self) -> str:
        return self.scheduler.model.version if self.scheduler else ""

    @property
    def state_value(self) -> str:
        return self.state.value


class ModelHub:
    """Owns the schedulers. A reload builds and warms the new one first, then swaps, then drains the old."""

    def __init__(self, settings: Settings, registry: Registry, repository: Repository) -> None:
        self.settings = settings
        self.registry = registry
        self.repository = repository
        self.provider_configs = registry.configs(settings.providers)
        self._entries: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.is_draining = False
        self.is_loaded = False
        self.cores = settings.scheduler.cpu_threads or instance_choice.usable_cores()
        self.cpu_budget = CpuBudget(self.cores)
        # Versions swapped out or unloaded whose admitted requests are still being answered: until each is
        # closed, drain waits for it and the in-flight count includes it, so a drain that overlaps a reload
        # never reports drained (an OTA hook's cue to reboot) while the old version is still computing.
        self._retiring: set[ModelScheduler] = set()
        # models.load_timeout_s: ten minutes by default, since the TensorRT provider builds an engine on a
        # model's first load (minutes on a Jetson; seconds once it is in the engine cache).
        self.load_timeout_s = settings.models.load_timeout_s
        self.loads: DeadlineLoads[_Loaded] = DeadlineLoads(lambda loaded: loaded[0].close())

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(list(self._entries.values()))

    def child_pids(self) -> list[int]:
        """The pool processes running now: their CPU is this service's (the capacity budget)."""
        pids = []
        for entry in self:
            replica = entry.scheduler.replica if entry.scheduler is not None else None
            if replica is not None and (pid := replica.pid) is not None:
                pids.append(pid)
        return pids

    def is_served(self, name: str) -> bool:
        """Whether `name` is a model of this hub, in any state (metrics label only these by name)."""
        return name in self._entries

    def summary(self) -> str:
        """`2 model(s) ready, 1 unavailable (corrupt)`: systemd's STATUS= and the ready log line."""
        entries = list(self)
        ready = [e.name for e in entries if e.state is State.READY]
        failed = [e.name for e in entries if e.state is not State.READY]
        text = f"{len(ready)} model(s) ready"
        return text + (f", {len(failed)} unavailable ({', '.join(failed)})" if failed else "")

    def entry(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise ModelNotFound(
                f"unknown model {name!r}; serving: {', '.join(self._entries) or 'none'}"
            ) from None

    def scheduler(self, name: str, version: str | None = None) -> ModelScheduler:
        """The scheduler serving `name` (and `version`, if given); raises ModelNotFound/ModelNotReady."""
        entry = self.entry(name)
        retry_after_s = self.settings.server.retry_after_s
        if self.is_draining:
            raise Draining("the service is draining; not accepting requests", retry_after_s=retry_after_s)
        if entry.scheduler is None and entry.state is State.LOADING:
            raise ModelLoading(f"model {name!r} is LOADING; try again shortly", retry_after_s=retry_after_s)
        if entry.state is not State.READY or entry.scheduler is None:
            detail = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReady(f"model {name!r} is {entry.state.value}{detail}", retry_after_s=retry_after_s)
        if version is not None and version != entry.scheduler.model.version:
            serving = entry.scheduler.model.version
            raise ModelNotFound(f"model {name!r} version {version} is not served; serving version {serving}")
        return entry.scheduler

    async def load_all(self, before_each: Callable[[str], None] | None = None) -> None:
        """Load every model in the repository, one after another (warm-up measures; keep it quiet).

        Every model is listed as LOADING first, so a client asking for one that waits its turn gets
        503 with Retry-After, not a 404 it would take for good. Each load has `load_timeout_s`: one that
        hangs (a graph that loops, an optimiser that never ends) is UNAVAILABLE after it and the next
        model loads, so one bad model cannot keep the others LOADING nor the service from READY."""
        names = self.repository.names()
        for name in names:
            self._entries.setdefault(name, ModelEntry(name, State.LOADING))
        for name in names:
            if before_each is not None:
                before_each(name)
            await self.load(name)
        self.is_loaded = True

    async def load(self, name: str) -> ModelEntry:
        """Load or reload `name`; the old scheduler (if any) keeps serving until the new one is ready."""
        async with self._lock(name):
            old = self._entries.get(name)
            if old is None or old.scheduler is None:  # new, unloaded or failed: LOADING until it is known
                self._entries[name] = ModelEntry(name, State.LOADING)
            try:
                source = await asyncio.to_thread(self.repository.source, name)  # parses: off the loop
                kept = None if old is None or old.scheduler is None else (old.scheduler.instances, old.trials)
                model, count, trials = await self.loads.run(
                    name, lambda: self._load_model(source, kept), self.load_timeout_s
                )
            except ModelNotFound:
                if old is None or old.scheduler is None:
                    self._entries.pop(name, None)
                raise
            except Exception as exc:  # one model fails alone, whatever broke it (MemoryError too)
                failure = exc if isinstance(exc, ApplianceError) else ModelLoadError(_describe(name, exc))
                log.error("model %s unavailable: %s", name, failure)
                if old is not None and old.scheduler is not None:
                    raise failure from exc  # a failed reload leaves the serving version in place
                entry = ModelEntry(name, State.UNAVAILABLE, str(failure))
                self._entries[name] = entry
                return entry
            config = self._scheduler_config(model, count)
            scheduler = ModelScheduler(model, config, cpu_budget=self.cpu_budget)
            scheduler.start()
            entry = ModelEntry(name, State.READY, scheduler=scheduler, trials=trials)
            self._entries[name] = entry  # the swap: new requests go to the new scheduler from here
            self.cpu_budget.restart()
            solo = ""
            if model.solo is not None:
                solo = f", {model.solo_threads} threads for one alone (+{model.solo_bytes / 1e6:.0f} MB)"
            log.log(
                logging.WARNING if model.fallbacks else logging.INFO,
                "model %s version %s ready: runs on %s; %s, %d instance(s)%s, %s; loaded in %.2f s",
                name,
                model.version,
                model.placement.summary(),
                model.precision,
                scheduler.instances,
                solo,
                pool_where(ModelView.of(entry)),
                model.load_s,
            )
        if old is not None and old.scheduler is not None:
            await self._retire(old.scheduler)
            del old  # the last reference to its sessions: their memory is free to return
            await asyncio.to_thread(return_freed_memory)
        return entry

    async def unload(self, name: str) -> None:
        """Stop serving `name`; requests already admitted finish first. It stays listed as unloaded
        (UNLOADED) while its folder is in the repository; one deleted from disk is forgotten."""
        self.entry(name)  # ModelNotFound before anything is kept for the name
        async with self._lock(name):
            entry = self.entry(name)
            if await asyncio.to_thread(self.repository.has, name):
                self._entries[name] = ModelEntry(name, State.UNAVAILABLE, UNLOADED)
            else:
                self._entries.pop(name, None)
        if entry.scheduler is not None:
            await self._retire(entry.scheduler)
            del entry
            await asyncio.to_thread(return_freed_memory)

    def _lock(self, name: str) -> asyncio.Lock:
        """The load/unload lock of a model this hub serves or its repository holds; ModelNotFound for
        any other name, so that a client cannot make the hub keep something per name it invents."""
        if name not in self._entries and not self.repository.has(name):
            raise ModelNotFound(f"model {name!r} is not in repository {self.repository.root}")
        if len(self._locks) > 2 * len(self._entries) + 64:  # names that left the repository since
            self._locks = {n: lock for n, lock in self._locks.items() if n in self._entries or lock.locked()}
        return self._locks.setdefault(name, asyncio.Lock())

    async def _retire(self, scheduler: ModelScheduler) -> None:
        """Drain and close a scheduler no longer served; it counts as in flight until it is closed."""
        self._retiring.add(scheduler)  # before the first await: no drain can miss it
        try:
            drained = await scheduler.drain(self.settings.server.drain_timeout_s)
            if not drained:
                log.warning(
                    "model %s: %d requests still running at unload", scheduler.name, scheduler.inflight
                )
            await scheduler.close()
        finally:
            self._retiring.discard(scheduler)

    def _schedulers(self) -> list[ModelScheduler]:
        """Every scheduler with requests to answer: those serving and those being retired."""
        serving = [e.scheduler for e in self if e.scheduler is not None]
        return serving + [s for s in self._retiring if s not in serving]

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered, over every model, retiring versions included."""
        return sum(scheduler.inflight for scheduler in self._schedulers())

    def _load_model(
        self, source: ModelSource, serving: tuple[int, list[instance_choice.Trial]] | None = None
    ) -> _Loaded:
        """The new version's session and worker count. Where the count is measured (no `instances` set) and
        a version already serves, a reload keeps that version's count and trials: measuring runs batches
        back to back on every core for seconds, and the version still serving the line needs them."""
        cores = self.cores
        wanted = source.manifest.instances or self.settings.scheduler.instances

        def load(threads: int) -> LoadedModel:
            model = LoadedModel.load(
                source,
                registry=self.registry,
                settings=self.settings.models,
                provider_configs=self.provider_configs,
                cache_dir=self.settings.system.cache_dir,
                threads_per_call=threads,
                max_request_bytes=request_bytes_limit(self.settings.server),
            )
            model.warm_up(self.settings.models.warmup_runs)
            return model

        if wanted:
            model, count, trials = load(max(1, cores // wanted)), wanted, []
        elif serving is not None:
            count, trials = serving
            model = load(max(1, cores // count))
        else:
            model, count, trials = instance_choice.choose(load, cores)
        if self.settings.scheduler.solo_session and model.placement.uses_host_cores and count > 1:
            model.open_solo(cores)
        return model, count, trials

    def _scheduler_config(self, model: LoadedModel, instances: int) -> SchedulerConfig:
        scheduler, pool = self.settings.scheduler, self.settings.pool
        replica = None
        if self._uses_pool_process:
            replica = ReplicaSpec.of(
                model,
                models=self.settings.models,
                provider_options=self.settings.providers.get(model.provider, {}),
                cache_dir=self.settings.system.cache_dir,
                idle_priority=scheduler.pool_cpu_priority == "idle",
            )
        return SchedulerConfig(
            instances=instances,
            line_max_requests=scheduler.line_queue_max_requests,
            pool_max_requests=scheduler.pool_queue_max_requests,
            profile_window=scheduler.profile_window_batches,
            max_interference_ms=pool.max_interference_ms,
            pool=rules_for(
                model.placement.uses_host_cores, replica, idle_priority=scheduler.pool_cpu_priority == "idle"
            ),
        )

    @property
    def _uses_pool_process(self) -> bool:
        """A pool process per model only where pool jobs come in: it costs a second copy of the model."""
        pool = self.settings.pool
        return self.settings.scheduler.pool_process and pool.broker is not None and pool.accept_jobs

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting everywhere and wait for every admitted request to be answered, those of
        versions a reload or unload is retiring too."""
        self.is_draining = True
        results = await asyncio.gather(*(scheduler.drain(timeout_s) for scheduler in self._schedulers()))
        return all(results)

    def resume(self) -> None:
        self.is_draining = False
        for entry in self:
            if entry.scheduler is not None:
                entry.scheduler.resume()

    async def close(self) -> None:
        """Close every scheduler, retiring ones too (closing twice is harmless: _retire may be at it)."""
        for scheduler in self._schedulers():
            await scheduler.close()
        self._entries.clear()

    def observe_cpu(self, wall_s: float, own_cpu_s: float, loop_cpu_s: float, busy_cpu_s: float) -> None:
        """Feed the CPU budget with the process's, the event loop's and the box's CPU counters."""
        if not self.is_loaded:
            return  # loading and warm-up burn CPU without traffic: not what a request costs
        rows = sum(e.scheduler.stats.inference_count for e in self if e.scheduler is not None)
        self.cpu_budget.observe(wall_s, own_cpu_s, loop_cpu_s, busy_cpu_s, rows)

    def hung_workers(self) -> dict[str, list[int]]:
        hang_s = self.settings.system.watchdog_hang_s
        hung = {}
        for entry in self:
            if entry.scheduler is not None and (workers := entry.scheduler.hung_workers(hang_s)):
                hung[entry.name] = workers
        return hung


def _describe(name: str, exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return f"model {name!r} failed to load: out of memory (check its batching values in model.toml)"
    return f"model {name!r} failed to load: {type(exc).__name__}: {exc}"
