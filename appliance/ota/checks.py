"""What `ota gate` and `ota verify` judge, as pure functions of status documents and measurements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from appliance.ota.golden import GoldenRun

READY = "READY"


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing verify noticed about a model (or "service"); failures fail the update."""

    subject: str
    message: str
    is_failure: bool = True


@dataclass(frozen=True, slots=True)
class OnDisk:
    """The version the repository would serve now, and its digest (model.onnx with its external data)."""

    version: str
    sha256: str


@dataclass(frozen=True, slots=True)
class Tolerance:
    growth_pct: float
    slack_ms: float


def busy_reasons(line: Mapping[str, Any], max_requests: int, max_ips: float) -> list[str]:
    """Why line traffic is too busy to start an update now; empty when it is quiet enough."""
    reasons = []
    queued = int(line.get("queue_depth", 0))
    served_ips = float(line.get("served_ips", 0.0))
    if queued > max_requests:
        reasons.append(f"{queued} line requests are queued (the gate allows {max_requests})")
    if served_ips > max_ips:
        reasons.append(f"line traffic runs at {served_ips:g} inferences/s (the gate allows {max_ips:g})")
    return reasons


def slower_provider(
    then: Mapping[str, Any], now: Mapping[str, Any], available: Mapping[str, bool]
) -> str | None:
    """Why the placement `now` is a silent fall-back from `then`, or None.

    A model falls back when it left the provider it ran on and that provider failed it (it is
    among the fallbacks now), vanished from the box, or more providers ahead of it failed than
    before (it sits later in the chain).
    """
    before, after = then.get("provider"), now.get("provider")
    if not before or before == after:
        return None
    failed = [f.get("provider") for f in now.get("fallbacks", [])]
    if before in failed:
        reason = next(f.get("reason", "") for f in now["fallbacks"] if f.get("provider") == before)
        return f"fell back from {before} to {after}: {before} failed it ({reason})"
    if available.get(before) is False:
        return f"fell back from {before} to {after}: {before} is no longer available on this box"
    if len(failed) > len(then.get("fallbacks", [])):
        return (
            f"fell back from {before} to {after}, later in the provider chain (skipped {', '.join(failed)})"
        )
    return None


def nodes_moved(then: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """Why more of the graph now runs outside the chosen EP than before (same model, same provider)."""
    ep, before, after = now.get("ep"), then.get("nodes") or {}, now.get("nodes") or {}
    if not ep or not before or not after or then.get("ep") != ep:
        return None
    outside_before = sum(count for name, count in before.items() if name != ep)
    outside_after = sum(count for name, count in after.items() if name != ep)
    if outside_after <= outside_before:
        return None
    return f"{outside_after} of its nodes now run outside {ep} (before the update: {outside_before})"


def slower_golden(then_ms: float, now_ms: float, tolerance: Tolerance) -> str | None:
    limit_ms = then_ms * (1 + tolerance.growth_pct / 100) + tolerance.slack_ms
    if now_ms <= limit_ms:
        return None
    return (
        f"golden samples take {now_ms:.3f} ms (median), above the {limit_ms:.3f} ms allowed: "
        f"{then_ms:.3f} ms before the update + {tolerance.growth_pct:g} % + {tolerance.slack_ms:g} ms"
    )


def judge(
    status: Mapping[str, Any],
    snapshot: Mapping[str, Any] | None,
    golden: Mapping[str, GoldenRun],
    on_disk: Mapping[str, OnDisk],
    tolerance: Tolerance,
) -> list[Finding]:
    """Every finding about the models the service serves now, compared with the snapshot if any."""
    before: Mapping[str, Any] = (snapshot or {}).get("models") or {}
    available = status.get("providers") or {}
    findings: list[Finding] = []
    for name, now in status.get("models", {}).items():
        findings += _judge_model(
            name, now, before.get(name), golden.get(name), on_disk.get(name), available, tolerance
        )
    for name, then in before.items():
        if name not in status.get("models", {}) and then.get("state") in (READY, None):
            findings.append(
                Finding(name, f"served before the update (version {then.get('version')}), gone now")
            )
    return findings


def _judge_model(
    name: str,
    now: Mapping[str, Any],
    then: Mapping[str, Any] | None,
    golden: GoldenRun | None,
    disk: OnDisk | None,
    available: Mapping[str, bool],
    tolerance: Tolerance,
) -> list[Finding]:
    if now.get("state") != READY:
        detail = f"{now.get('state')}: {now.get('reason') or 'no reason given'}"
        if then is not None and then.get("state") not in (READY, None):
            return [
                Finding(name, f"{detail} (it was {then['state']} before the update too)", is_failure=False)
            ]
        return [Finding(name, detail)]
    findings = []
    if disk is not None and disk.sha256 != now.get("sha256"):
        findings.append(
            Finding(
                name,
                f"serves version {now.get('version')} (sha256 {now.get('sha256')}) but the repository "
                f"holds version {disk.version} (sha256 {disk.sha256}); the service did not load the "
                "installed file",
            )
        )
    is_same_model = then is not None and then.get("sha256") == now.get("sha256")
    if then is not None and not is_same_model:
        findings.append(
            Finding(
                name,
                f"model changed: version {then.get('version')} (sha256 {then.get('sha256')}) -> "
                f"version {now.get('version')} (sha256 {now.get('sha256')})",
                is_failure=False,
            )
        )
    if then is not None and then.get("placement") and now.get("placement"):
        reason = slower_provider(then["placement"], now["placement"], available)
        if reason is None and is_same_model:
            reason = nodes_moved(then["placement"], now["placement"])
        if reason is not None:
            findings.append(Finding(name, reason))
    if golden is None:
        findings.append(Finding(name, "no samples.npz; outputs and latency not checked", is_failure=False))
        return findings
    findings += [Finding(name, problem) for problem in golden.problems]
    then_ms = then.get("golden_ms") if then is not None else None
    if golden.is_reproduced:
        baseline = f"{then_ms:.3f} ms before the update" if then_ms is not None else "no baseline"
        message = f"golden samples reproduce; {golden.median_ms:.3f} ms median ({baseline})"
        findings.append(Finding(name, message, is_failure=False))
    if golden.median_ms is not None and then_ms is not None:
        if is_same_model:
            reason = slower_golden(then_ms, golden.median_ms, tolerance)
            if reason is not None:
                findings.append(Finding(name, reason))
        else:
            findings.append(Finding(name, "latency not compared: the model changed", is_failure=False))
    return findings
