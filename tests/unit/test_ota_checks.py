"""What `ota gate` and `ota verify` judge: busy lines, slower providers, moved nodes, latency, models."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.ota.checks import (
    Finding,
    OnDisk,
    Tolerance,
    busy_reasons,
    judge,
    nodes_moved,
    slower_golden,
    slower_provider,
)
from appliance.ota.golden import GoldenRun

TOLERANCE = Tolerance(growth_pct=50.0, slack_ms=1.0)


def placement(provider: str, *failed: str, ep: str = "CUDAExecutionProvider", **nodes: int) -> dict[str, Any]:
    return {
        "provider": provider,
        "ep": ep,
        "nodes": nodes,
        "fallbacks": [{"provider": p, "stage": "session", "reason": f"{p} said no"} for p in failed],
    }


def served(sha256: str = "a" * 64, version: str = "1", **extra: Any) -> dict[str, Any]:
    return {"state": "READY", "version": version, "sha256": sha256, "placement": placement("cpu"), **extra}


def failures(findings: list[Finding]) -> list[str]:
    return [f"{f.subject}: {f.message}" for f in findings if f.is_failure]


def notes(findings: list[Finding]) -> list[str]:
    return [f"{f.subject}: {f.message}" for f in findings if not f.is_failure]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ({"queue_depth": 0, "served_ips": 0.5}, []),
        ({"queue_depth": 3, "served_ips": 0.0}, ["3 line requests are queued (the gate allows 0)"]),
        (
            {"queue_depth": 0, "served_ips": 12.5},
            ["line traffic runs at 12.5 inferences/s (the gate allows 1)"],
        ),
    ],
)
def test_busy_reasons(line: dict[str, Any], expected: list[str]) -> None:
    assert busy_reasons(line, max_requests=0, max_ips=1.0) == expected


def test_a_provider_that_failed_the_model_is_a_fall_back() -> None:
    reason = slower_provider(placement("cuda"), placement("cpu", "cuda"), {"cuda": True, "cpu": True})
    assert reason == "fell back from cuda to cpu: cuda failed it (cuda said no)"


def test_a_provider_that_vanished_is_a_fall_back() -> None:
    reason = slower_provider(placement("cuda"), placement("cpu"), {"cuda": False, "cpu": True})
    assert reason == "fell back from cuda to cpu: cuda is no longer available on this box"


def test_a_provider_later_in_the_chain_is_a_fall_back() -> None:
    then, now = placement("openvino", "cuda"), placement("cpu", "tensorrt", "cuda")
    reason = slower_provider(then, now, {})
    assert reason == "fell back from openvino to cpu, later in the provider chain (skipped tensorrt, cuda)"


@pytest.mark.parametrize(
    ("then", "now", "available"),
    [
        (placement("cuda"), placement("cuda"), {"cuda": True}),  # unchanged
        (placement("cuda"), placement("tensorrt"), {"cuda": True}),  # a preference the admin changed
        (placement("cpu", "cuda"), placement("cuda"), {"cuda": True}),  # fixed by the update
    ],
    ids=["same", "chosen", "better"],
)
def test_other_provider_changes_are_not_fall_backs(then: dict, now: dict, available: dict) -> None:
    assert slower_provider(then, now, available) is None


def test_nodes_that_moved_off_the_accelerator() -> None:
    then = placement("cuda", CUDAExecutionProvider=40, CPUExecutionProvider=2)
    now = placement("cuda", CUDAExecutionProvider=30, CPUExecutionProvider=12)
    assert (
        nodes_moved(then, now)
        == "12 of its nodes now run outside CUDAExecutionProvider (before the update: 2)"
    )
    assert nodes_moved(now, then) is None
    assert nodes_moved(placement("cuda"), now) is None  # ORT could not tell before: no comparison


def test_latency_within_growth_and_slack_passes() -> None:
    assert slower_golden(10.0, 16.0, TOLERANCE) is None  # 10 * 1.5 + 1 = 16
    assert slower_golden(10.0, 16.5, TOLERANCE) == (
        "golden samples take 16.500 ms (median), above the 16.000 ms allowed: "
        "10.000 ms before the update + 50 % + 1 ms"
    )


def test_no_snapshot_judges_state_digests_and_samples_only() -> None:
    status = {
        "models": {
            "good": served(),
            "broken": {"state": "UNAVAILABLE", "reason": "corrupt"},
            "plain": served(),
        }
    }
    golden = {"good": GoldenRun("good", 1.25)}
    findings = judge(status, None, golden, {"good": OnDisk("1", "a" * 64)}, TOLERANCE)
    assert failures(findings) == ["broken: UNAVAILABLE: corrupt"]
    assert notes(findings) == [
        "good: golden samples reproduce; 1.250 ms median (no baseline)",
        "plain: no samples.npz; outputs and latency not checked",
    ]


def test_serving_a_file_other_than_the_installed_one_fails() -> None:
    status = {"models": {"m": served(sha256="a" * 64)}}
    findings = judge(status, None, {}, {"m": OnDisk("2", "b" * 64)}, TOLERANCE)
    assert failures(findings) == [
        f"m: serves version 1 (sha256 {'a' * 64}) but the repository holds version 2 (sha256 {'b' * 64}); "
        "the service did not load the installed file"
    ]


def test_against_a_snapshot() -> None:
    snapshot = {
        "models": {
            "same": served(golden_ms=2.0, placement=placement("cuda")),
            "changed": served(sha256="c" * 64, golden_ms=2.0),
            "slower": served(golden_ms=2.0),
            "gone": served(),
            "was_broken": {"state": "UNAVAILABLE", "reason": "needs a GPU"},
        }
    }
    status = {
        "providers": {"cuda": True},
        "models": {
            "same": served(placement=placement("cpu", "cuda")),
            "changed": served(sha256="d" * 64, version="2"),
            "slower": served(),
            "was_broken": {"state": "UNAVAILABLE", "reason": "needs a GPU"},
        },
    }
    golden = {
        "same": GoldenRun("same", 2.1),
        "changed": GoldenRun("changed", 40.0),
        "slower": GoldenRun("slower", 9.0, problems=("output 'y': 1 of 4 values differ",)),
    }
    findings = judge(status, snapshot, golden, {}, TOLERANCE)
    assert failures(findings) == [
        "same: fell back from cuda to cpu: cuda failed it (cuda said no)",
        "slower: output 'y': 1 of 4 values differ",
        "slower: golden samples take 9.000 ms (median), above the 4.000 ms allowed: "
        "2.000 ms before the update + 50 % + 1 ms",
        "gone: served before the update (version 1), gone now",
    ]
    assert f"changed: model changed: version 1 (sha256 {'c' * 64}) -> version 2 (sha256 {'d' * 64})" in notes(
        findings
    )
    assert "changed: latency not compared: the model changed" in notes(findings)
    assert "was_broken: UNAVAILABLE: needs a GPU (it was UNAVAILABLE before the update too)" in notes(
        findings
    )


def test_a_model_ready_before_and_unavailable_now_fails() -> None:
    snapshot = {"models": {"m": served()}}
    status = {"models": {"m": {"state": "UNAVAILABLE", "reason": "no provider could load it"}}}
    assert failures(judge(status, snapshot, {}, {}, TOLERANCE)) == [
        "m: UNAVAILABLE: no provider could load it"
    ]


def test_an_offline_snapshot_compares_digests_only() -> None:
    snapshot = {"models": {"m": {"state": None, "version": "1", "sha256": "a" * 64, "golden_ms": None}}}
    status = {"models": {"m": served()}}
    findings = judge(status, snapshot, {"m": GoldenRun("m", 3.0)}, {}, TOLERANCE)
    assert failures(findings) == []
