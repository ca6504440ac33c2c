"""One view of a model, taken from its hub entry: what every report about it says, said once.

The admin socket's status (control.py), the pool's birth message (pool/messages.py), the capacity
report (scheduler/report.py), the HTTP metadata, config and statistics (server/documents.py) and
`appliance models check` (cli.py) only format a ModelView; none of them reads the scheduler or the
model for facts of its own, so they cannot disagree (they did: "instances" was 2K in some).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from appliance.engine.model import LoadedModel
from appliance.scheduler.placement import Where
from appliance.scheduler.queues import Priority
from appliance.scheduler.runner import ModelScheduler
from appliance.tensors import TensorSpec


class Entry(Protocol):
    """A hub entry (scheduler/hub.py ModelEntry), as far as a view needs it."""

    name: str
    reason: str
    scheduler: ModelScheduler | None

    @property
    def state_value(self) -> str: ...


def tensor(spec: TensorSpec) -> dict[str, Any]:
    """An input or output as the OIP metadata and the pool's birth describe it (-1: dynamic)."""
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


@dataclass(frozen=True, slots=True)
class PoolView:
    """Where the model's pool work runs (scheduler/placement.py) and its pool process, if any."""

    where: str
    threads: int  # pool threads of its own; 0 when pool work shares the line workers
    process: dict[str, Any] | None = None  # pid, restarts, why given up (or None: no pool process)


@dataclass(frozen=True, slots=True)
class ModelView:
    """Everything static or slow-changing about one model; `is_ready` tells whether the rest is set."""

    name: str
    state: str
    reason: str = ""
    version: str = ""
    versions: tuple[str, ...] = ()
    sha256: str = ""
    precision: str = ""
    provider: str = ""
    uses_host_cores: bool = False
    placement: dict[str, Any] = field(default_factory=dict)  # provider, EP, nodes, fallbacks
    slo_p99_ms: float = 0.0
    max_batch_size: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_ms: float = 0.0
    instances: int = 0  # K: the threads that run line work on one session (scheduler.instances)
    threads_per_call: int = 0
    solo: dict[str, Any] | None = None  # the all-cores session of a request alone: threads, memory
    pool: PoolView | None = None
    inputs: tuple[dict[str, Any], ...] = ()
    outputs: tuple[dict[str, Any], ...] = ()
    description: str = ""
    labels: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    samples: str | None = None  # the golden samples' path, for people to read
    load_s: float = 0.0

    @property
    def is_ready(self) -> bool:
        return self.state == "READY"

    @property
    def fallbacks(self) -> list[dict[str, Any]]:
        return list(self.placement.get("fallbacks", []))

    @classmethod
    def of(cls, entry: Entry) -> ModelView:
        """The view of a hub entry: the loaded model's facts when it serves, its state and reason else."""
        scheduler = entry.scheduler
        if scheduler is None:
            return cls(entry.name, entry.state_value, entry.reason)
        replica = scheduler.replica
        process = None
        if replica is not None:
            process = {"pid": replica.pid, "restarts": replica.restarts, "failure": replica.failure}
        pool = PoolView(scheduler.pool_rules.where.value, scheduler.pool_threads, process)
        return cls.of_model(
            scheduler.model,
            state=entry.state_value,
            reason=entry.reason,
            instances=scheduler.instances,
            pool=pool,
        )

    @classmethod
    def of_model(
        cls,
        model: LoadedModel,
        *,
        state: str = "READY",
        reason: str = "",
        instances: int = 0,
        pool: PoolView | None = None,
    ) -> ModelView:
        """The view of a loaded model (with no scheduler, as `appliance models check` has it)."""
        manifest = model.source.manifest
        limits = model.limits
        return cls(
            name=model.name,
            state=state,
            reason=reason,
            version=model.version,
            versions=tuple(str(v) for v in model.source.versions),
            sha256=model.digest,
            precision=model.precision,
            provider=model.provider,
            uses_host_cores=model.placement.uses_host_cores,
            placement=model.placement.record(),
            slo_p99_ms=model.slo_p99_ms,
            max_batch_size=limits.max_batch_size,
            preferred_batch_sizes=tuple(limits.preferred_batch_sizes),
            max_queue_delay_ms=limits.max_queue_delay_ms,
            instances=instances,
            threads_per_call=model.threads_per_call,
            solo=(
                {"threads": model.solo_threads, "memory_mb": round(model.solo_bytes / 1e6, 1)}
                if model.solo is not None
                else None
            ),
            pool=pool,
            inputs=tuple(tensor(spec) for spec in model.signature.inputs),
            outputs=tuple(tensor(spec) for spec in model.signature.outputs),
            description=manifest.description,
            labels=tuple(manifest.labels),
            parameters=dict(manifest.parameters),
            samples=str(model.source.samples_path) if model.source.samples_path.is_file() else None,
            load_s=model.load_s,
        )


def pool_where(view: ModelView) -> str:
    """How the model's pool work runs, in words (the service's log line)."""
    if view.pool is None:
        return "no pool work"
    if view.pool.where == Where.PROCESS:
        return "pool work in an idle-priority process"
    if view.pool.where == Where.THREADS:
        return f"{view.pool.threads} pool thread(s)"
    return "pool work on the same workers"


def line_load(entry: Entry) -> tuple[int, float]:
    """Line requests queued now, and line inferences/s served over the last window."""
    scheduler = entry.scheduler
    if scheduler is None:
        return 0, 0.0
    return len(scheduler.queues.line), scheduler.served[Priority.LINE].rate(scheduler.clock())
