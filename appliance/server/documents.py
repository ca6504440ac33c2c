"""JSON documents about models: OIP metadata, Triton-style config and statistics."""

from __future__ import annotations

from typing import Any

from appliance.scheduler.hub import ModelEntry
from appliance.scheduler.view import ModelView

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


def metadata(view: ModelView) -> dict[str, Any]:
    """GET /v2/models/{m}: the OIP model metadata response (-1 marks a dynamic dimension)."""
    return {
        "name": view.name,
        "versions": list(view.versions),
        "platform": PLATFORM,
        "inputs": list(view.inputs),
        "outputs": list(view.outputs),
        "parameters": {
            "provider": view.provider,
            "precision": view.precision,
            "fallbacks": view.fallbacks,  # providers that did not take it: provider, stage, reason
            "description": view.description,
            "labels": list(view.labels),
            **view.parameters,
        },
    }


def _config_tensor(tensor: dict[str, Any], is_batched: bool) -> dict[str, Any]:
    shape = tensor["shape"]
    dims = list(shape[1:] if is_batched else shape)
    return {"name": tensor["name"], "data_type": _TRITON_TYPES[tensor["datatype"]], "dims": dims}


def config(view: ModelView) -> dict[str, Any]:
    """GET /v2/models/{m}/config: Triton's model configuration JSON, plus what we measured."""
    is_batched = view.max_batch_size > 0
    pool = view.pool
    document: dict[str, Any] = {
        "name": view.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"specific": {"versions": [int(view.version)]}},
        "max_batch_size": view.max_batch_size,
        "input": [_config_tensor(t, is_batched) for t in view.inputs],
        "output": [_config_tensor(t, is_batched) for t in view.outputs],
        "instance_group": [
            {"count": view.instances, "kind": "KIND_CPU" if view.uses_host_cores else "KIND_GPU"}
        ],
        "parameters": {
            "provider": {"string_value": view.provider},
            "precision": {"string_value": view.precision},
            "sha256": {"string_value": view.sha256},
        },
        "appliance": {
            **view.placement,
            "precision": view.precision,
            "sha256": view.sha256,
            "slo_p99_ms": view.slo_p99_ms,
            "threads_per_call": view.threads_per_call,
            "solo_session": view.solo,
            "instances": view.instances,
            "pool_threads": pool.threads if pool else 0,
            "pool_process": pool is not None and pool.process is not None,
            "load_s": round(view.load_s, 3),
        },
    }
    if is_batched:
        document["dynamic_batching"] = {
            "preferred_batch_size": list(view.preferred_batch_sizes),
            "max_queue_delay_microseconds": int(view.max_queue_delay_ms * 1000),
        }
    return document


def statistics(entry: ModelEntry, refusals: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    """One model's entry in GET /v2/models/{m}/stats (Triton's shape, plus the latency profile and
    `refusals`: {priority class: {reason: count}} of every request refused or failed)."""
    scheduler = entry.scheduler
    view = ModelView.of(entry)
    refused = refusals or {}
    if scheduler is None:
        return {
            "name": view.name,
            "version": "",
            "state": view.state,
            "reason": view.reason,
            "refusals": refused,
        }
    stats = scheduler.stats
    compute = stats.compute.as_triton()
    return {
        "name": view.name,
        "version": view.version,
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
        "pool_process": view.pool.process if view.pool else None,
        "latency_profile": {"provider": view.provider, **scheduler.profile.as_dict()},
        "instances": [
            {
                "instances": t.instances,
                "threads_per_call": t.threads_per_call,
                "rows_per_s": round(t.rows_per_s, 1),
            }
            for t in entry.trials
        ],
    }
