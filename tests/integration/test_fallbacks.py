"""A provider that refuses a model is skipped, and the fallback shows everywhere the README says: the
log line, the model's metadata and config, /capacity and /metrics.

The refusing provider is the test plugin `fake` (tests/fixtures/fake_provider): ONNX Runtime's CPU EP
asked for a session configuration it must refuse, so the refusal and its reason are ONNX Runtime's own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import modelzoo
import pytest

REASON = "INVALID_ARGUMENT : Conflicting session configuration"
FALLBACK = {"provider": "fake", "stage": "session"}


@pytest.fixture
def fell_back(serve, tmp_path, caplog) -> Iterator[tuple[Any, httpx.Client]]:
    caplog.set_level(logging.INFO, "appliance")
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    with (
        serve(
            repo, models={"providers": ["fake", "cpu"]}, providers={"fake": {"fail_session": True}}
        ) as running,
        httpx.Client(base_url=running.url, timeout=60.0) as client,
    ):
        yield running, client


def _is_the_fallback(record: dict[str, Any]) -> bool:
    return {k: record[k] for k in ("provider", "stage")} == FALLBACK and record["reason"].startswith(REASON)


def test_the_fallback_is_in_the_log_config_capacity_and_metrics(fell_back, caplog) -> None:
    _, client = fell_back
    records = caplog.get_records("setup")  # the service started in the fixture
    [line] = [r for r in records if r.getMessage().startswith("model batchable version 1 ready")]
    assert line.levelno == logging.WARNING  # a fallback is worth a warning
    assert (
        f"runs on cpu (CPUExecutionProvider: 3 nodes); skipped fake (session): {REASON}" in line.getMessage()
    )

    config = client.get("/v2/models/batchable/config").json()["appliance"]
    assert (config["provider"], config["ep"], config["nodes"]) == (
        "cpu",
        "CPUExecutionProvider",
        {"CPUExecutionProvider": 3},
    )
    [fallback] = config["fallbacks"]
    assert _is_the_fallback(fallback)

    capacity = client.get("/capacity").json()["models"]["batchable"]
    assert capacity["provider"] == "cpu"
    [fallback] = capacity["fallbacks"]
    assert _is_the_fallback(fallback)

    metrics = [
        line
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("appliance_provider_fallbacks{")
    ]
    assert len(metrics) == 1 and metrics[0].endswith(" 1.0")
    assert (
        'model="batchable"' in metrics[0]
        and 'provider="fake"' in metrics[0]
        and 'stage="session"' in metrics[0]
    )
    assert f'reason="{REASON}' in metrics[0]


def test_the_fallback_is_in_the_model_metadata(fell_back) -> None:
    _, client = fell_back
    parameters = client.get("/v2/models/batchable").json()["parameters"]
    assert parameters["provider"] == "cpu"
    [fallback] = parameters["fallbacks"]
    assert _is_the_fallback(fallback)


def test_a_model_that_no_provider_takes_is_unavailable_with_every_reason(serve, tmp_path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    modelzoo.write(repo, "own_order", modelzoo.batchable(), manifest='providers = ["fake"]\n')
    with (
        serve(
            repo, server={"strict_readiness": False}, providers={"fake": {"fail_session": True}}
        ) as running,
        httpx.Client(base_url=running.url, timeout=60.0) as client,
    ):
        index = {m["name"]: m for m in client.post("/v2/repository/index").json()}
        ready = client.get("/v2/models/own_order/ready")
        served = client.get("/v2/models/batchable/ready")
    assert index["own_order"]["state"] == "UNAVAILABLE"
    assert f"no provider could load it: fake: {REASON}" in index["own_order"]["reason"]
    assert ready.status_code == 503 and REASON in ready.json()["error"]
    assert served.status_code == 200  # the other models keep serving
