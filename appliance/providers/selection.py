"""Open an ORT session on the first provider of a chain that takes the model, recording fallbacks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort
from pydantic import BaseModel

from appliance.errors import ModelLoadError
from appliance.providers.base import CPU_EP, Provider, SessionContext, uses_host_cores
from appliance.providers.host import ort_reason
from appliance.providers.registry import Registry

log = logging.getLogger(__name__)

RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"  # nodes per EP, where ORT has it (1.32 does)
DISABLE_CPU_FALLBACK = "session.disable_cpu_ep_fallback"
# Errors about the model file itself: every provider would fail the same way, so stop at the first.
MODEL_ERRORS = ("NO_SUCHFILE", "INVALID_PROTOBUF")
Stage = Literal["unavailable", "options", "session", "not_registered", "no_nodes", "verify"]


@dataclass(frozen=True, slots=True)
class Fallback:
    """A provider that did not take the model, why, and at which step (see `Stage`)."""

    provider: str
    reason: str
    stage: Stage = "session"


@dataclass(slots=True)
class Placement:
    """A session, the provider that actually took the model, and how its nodes were split."""

    session: ort.InferenceSession
    provider: str
    fallbacks: list[Fallback]
    ep_name: str = ""
    nodes: dict[str, int] = field(default_factory=dict)  # EP -> nodes it runs; {} when ORT cannot tell
    uses_host_cores: bool = False  # the provider computes on the host's CPU cores (providers/base.py)

    def record(self) -> dict[str, Any]:
        """JSON-ready: what model metadata, /capacity and the pool report show."""
        return {
            "provider": self.provider,
            "ep": self.ep_name,
            "nodes": dict(self.nodes),
            "fallbacks": [
                {"provider": f.provider, "stage": f.stage, "reason": f.reason} for f in self.fallbacks
            ],
        }

    def summary(self) -> str:
        """One log line: `cuda (CUDAExecutionProvider: 41 nodes, CPUExecutionProvider: 3); skipped ...`."""
        split = ", ".join(f"{ep}: {count} nodes" for ep, count in self.nodes.items())
        text = f"{self.provider} ({split or self.ep_name})"
        if self.fallbacks:
            text += "; skipped " + "; ".join(f"{f.provider} ({f.stage}): {f.reason}" for f in self.fallbacks)
        return text


def open_session(
    model: Path | bytes,
    *,
    chain: Sequence[str],
    registry: Registry,
    configs: Mapping[str, BaseModel],
    context: SessionContext,
    session_options: Callable[[], ort.SessionOptions] | None = None,
    verify: Callable[[ort.InferenceSession], None] | None = None,
) -> Placement:
    """Try each provider in `chain`; raise ModelLoadError listing every reason if none takes it.

    `context.cache_dir` is the cache root; each provider gets `<root>/<provider key>`.
    `session_options` makes a fresh SessionOptions per attempt (threads, optimisation level).
    `verify`, if given, runs on each new session (the engine's warm-up); if it raises, that provider
    is recorded as failed and the chain moves on, so an EP that builds lazily still falls back.
    """
    fallbacks: list[Fallback] = []
    for position, name in enumerate(chain):
        is_last = position == len(chain) - 1
        outcome = _attempt(name, is_last, model, registry, configs, context, session_options)
        if isinstance(outcome, Placement) and verify is not None:
            try:
                verify(outcome.session)
            except Exception as exc:  # noqa: BLE001 - any failure of a trial run disqualifies the EP
                outcome = Fallback(name, ort_reason(exc), "verify")
        if isinstance(outcome, Fallback):
            # DEBUG: a model is opened several times while its instances are measured; the hub logs
            # the placement, skipped providers included, once it is ready.
            log.debug(
                "model %s: %s skipped (%s): %s", context.model_name, name, outcome.stage, outcome.reason
            )
            fallbacks.append(outcome)
            if outcome.stage == "session" and outcome.reason.startswith(MODEL_ERRORS):
                break
            continue
        outcome.fallbacks = fallbacks
        log.debug("model %s runs on %s", context.model_name, outcome.summary())
        return outcome
    reasons = "; ".join(f"{f.provider}: {f.reason}" for f in fallbacks) or "the provider chain is empty"
    raise ModelLoadError(f"model {context.model_name!r}: no provider could load it: {reasons}")


def _attempt(
    name: str,
    is_last: bool,
    model: Path | bytes,
    registry: Registry,
    configs: Mapping[str, BaseModel],
    context: SessionContext,
    session_options: Callable[[], ort.SessionOptions] | None,
) -> Placement | Fallback:
    probe = registry.probe(name)
    if not probe.available:
        return Fallback(name, probe.reason, "unavailable")
    provider = registry.get(name)
    config = configs[name] if name in configs else provider.config_model.model_validate({})
    context = replace(context, cache_dir=context.cache_dir / name)
    try:
        options = provider.ort_options(config, context)
        is_plugin_library = provider.library_path() is not None
    except Exception as exc:  # noqa: BLE001 - e.g. a configured device that is not there
        return Fallback(name, ort_reason(exc), "options")
    if not is_plugin_library and provider.ep_name not in ort.get_available_providers():
        return Fallback(name, _not_in_ort(provider.ep_name), "unavailable")
    try:
        session = _create(model, provider, config, options, context, session_options, is_plugin_library)
    except Exception as exc:  # noqa: BLE001 - ORT raises many pybind types; all mean "did not take it"
        return Fallback(name, ort_reason(exc), "session")
    registered = session.get_providers()
    if provider.ep_name not in registered:
        reason = f"ONNX Runtime did not register {provider.ep_name}; the session has {registered}"
        return Fallback(name, reason, "not_registered")
    nodes = _assignment(session)
    took = nodes.get(provider.ep_name, 0)
    if nodes and provider.ep_name != CPU_EP and took == 0 and not is_last:
        others = ", ".join(ep for ep in nodes if ep != provider.ep_name)
        reason = f"{provider.ep_name} took none of the model's {sum(nodes.values())} nodes (all on {others})"
        return Fallback(name, reason, "no_nodes")
    return Placement(session, name, [], provider.ep_name, nodes, uses_host_cores(provider))


def _create(
    model: Path | bytes,
    provider: Provider,
    config: BaseModel,
    options: dict[str, str],
    context: SessionContext,
    session_options: Callable[[], ort.SessionOptions] | None,
    is_plugin_library: bool,
) -> ort.InferenceSession:
    so = session_options() if session_options is not None else ort.SessionOptions()
    session_config = getattr(provider, "session_config", None)
    for key, value in (session_config(config, context) if session_config else {}).items():
        so.add_session_config_entry(key, value)
    if hasattr(ort.InferenceSession, "get_provider_graph_assignment_info"):
        so.add_session_config_entry(RECORD_ASSIGNMENT, "1")
    allow_cpu = bool(getattr(config, "allow_cpu_fallback", True))
    if provider.ep_name != CPU_EP and not allow_cpu:
        so.add_session_config_entry(DISABLE_CPU_FALLBACK, "1")
    source = str(model) if isinstance(model, Path) else model
    if is_plugin_library:  # plugin EPs are reached through their devices, not by name
        devices = [d for d in ort.get_ep_devices() if d.ep_name == provider.ep_name]
        so.add_provider_for_devices(devices, options)
        return ort.InferenceSession(source, sess_options=so, enable_fallback=0)
    extra_eps = getattr(provider, "extra_eps", None)
    extras = extra_eps(config, context) if extra_eps else []
    available = set(ort.get_available_providers())
    providers = [(provider.ep_name, options), *((ep, opts) for ep, opts in extras if ep in available)]
    if provider.ep_name != CPU_EP and allow_cpu:
        providers.append((CPU_EP, {}))  # the nodes the EP cannot take (an op or a precision it lacks)
    # enable_fallback=0: ORT's own retry-on-CPU would hide the failure this chain exists to record.
    return ort.InferenceSession(source, sess_options=so, providers=providers, enable_fallback=0)


def _assignment(session: ort.InferenceSession) -> dict[str, int]:
    """Nodes per EP after partitioning, where this ORT records it."""
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # noqa: BLE001 - older ORT, or recording off: say nothing rather than guess
        return {}
    nodes: dict[str, int] = {}
    for subgraph in subgraphs:
        nodes[subgraph.ep_name] = nodes.get(subgraph.ep_name, 0) + len(subgraph.get_nodes())
    return nodes


def _not_in_ort(ep_name: str) -> str:
    offered = ", ".join(sorted(ort.get_available_providers()))
    return f"ONNX Runtime {ort.__version__} has no {ep_name}; it has {offered}"
