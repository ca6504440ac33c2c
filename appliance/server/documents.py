"""JSON documents about models: OIP metadata, Triton-style config and statistics."""

from __future__ import annotations

from typing import Any

from appliance.scheduler.hub import ModelEntry
from appliance.scheduler.runner import ModelScheduler
from appliance.tensors import TensorSpec

PLATFORM = "onnxruntime_onnx"
_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def metadata(scheduler: ModelScheduler) -> dict[str, Any]:
    """GET /v2/models/{m}: the OIP model metadata response (-1 marks a dynamic dimension)."""
    model = scheduler.model
    return {
        "name": model.name,
        "versions": [str(v) for v in model.source.versions],
        "platform": PLATFORM,
        "inputs": [_tensor(spec) for spec in model.signature.inputs],
        "outputs": [_tensor(spec) for spec in model.signature.outputs],
        "parameters": {
            "provider": model.provider,
            "precision": model.precision,
            "description": model.source.manifest.description,
            "labels": model.source.manifest.labels,
            **model.source.manifest.parameters,
        },
    }


def _config_tensor(spec: TensorSpec, is_batched: bool) -> dict[str, Any]:
    dims = list(spec.shape[1:] if is_batched else spec.shape)
    return {"name": spec.name, "data_type": _TRITON_TYPES[spec.datatype], "dims": dims}


def config(scheduler: ModelScheduler) -> dict[str, Any]:
    """GET /v2/models/{m}/config: Triton's model configuration JSON, plus what we measured."""
    model = scheduler.model
    limits = model.limits
    document: dict[str, Any] = {
        "name": model.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"specific": {"versions": [int(model.version)]}},
        "max_batch_size": limits.max_batch_size,
        "input": [_config_tensor(s, limits.is_batched) for s in model.signature.inputs],
        "output": [_config_tensor(s, limits.is_batched) for s in model.signature.outputs],
        "instance_group": [
            {
                "count": scheduler.instances,
                "kind": "KIND_CPU" if model.placement.uses_host_cores else "KIND_GPU",
            }
        ],
        "parameters": {
            "provider": {"string_value": model.provider},
            "precision": {"string_value": model.precision},
            "sha256": {"string_value": model.digest},
        },
        "appliance": {
            **model.placement.record(),
            "precision": model.precision,
            "sha256": model.digest,
            "slo_p99_ms": model.slo_p99_ms,
            "threads_per_call": model.threads_per_call,
            "instances": scheduler.instances,
            "pool_threads": scheduler.pool_threads,
            "pool_process": scheduler.replica is not None,
            "load_s": round(model.load_s, 3),
        },
    }
    if limits.is_batched:
        document["dynamic_batching"] = {
            "preferred_batch_size": list(limits.preferred_batch_sizes),
            "max_queue_delay_microseconds": int(limits.max_queue_delay_ms * 1000),
        }
    return document


def statistics(entry: ModelEntry, refusals: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    """One model's entry in GET /v2/models/{m}/stats (Triton's shape, plus the latency profile and
    `refusals`: {priority class: {reason: count}} of every request refused or failed)."""
    scheduler = entry.scheduler
    refused = refusals or {}
    if scheduler is None:
        return {
            "name": entry.name,
            "version": "",
            "state": entry.state.value,
            "reason": entry.reason,
            "refusals": refused,
        }
    stats = scheduler.stats
    compute = stats.compute.as_triton()
    return {
        "name": entry.name,
        "version": scheduler.model.version,
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {
            "success": stats.success.as_triton(),
            "fail": stats.fail.as_triton(),
            "queue": stats.queue.as_triton(),
            "compute_input": {"count": compute["count"], "ns": 0},
            "compute_infer": compute,
            "compute_output": {"count": compute["count"], "ns": 0},
        },
        "batch_stats": [
            {
                "batch_size": rows,
                "compute_input": {"count": d.count, "ns": 0},
                "compute_infer": d.as_triton(),
                "compute_output": {"count": d.count, "ns": 0},
            }
            for rows, d in sorted(stats.by_batch.items())
        ],
        "failures": dict(stats.failures),
        "refusals": refused,
        "preemptions": stats.preemptions,
        "pool_process": _pool_process(scheduler),
        "latency_profile": {"provider": scheduler.model.provider, **scheduler.profile.as_dict()},
        "instances": [
            {
                "instances": t.instances,
                "threads_per_call": t.threads_per_call,
                "rows_per_s": round(t.rows_per_s, 1),
            }
            for t in entry.trials
        ],
    }


def _pool_process(scheduler: ModelScheduler) -> dict[str, Any] | None:
    """The model's pool process, where pool work runs in one (scheduler.pool_process)."""
    replica = scheduler.replica
    if replica is None:
        return None
    return {"pid": replica.pid, "restarts": replica.restarts, "failure": replica.failure}
