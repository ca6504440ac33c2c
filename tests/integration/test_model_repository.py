"""A Triton-layout repository served for real: config.pbtxt, a bare model.onnx, and models that fail alone."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import modelzoo
import numpy as np
import pytest

TRITON_CONFIG = """
name: "triton"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "x", data_type: TYPE_FP32, dims: [ 4 ] } ]
dynamic_batching {
  preferred_batch_size: [ 2, 4 ]
  max_queue_delay_microseconds: 500
}
instance_group [ { count: 1, kind: KIND_CPU } ]
"""


def triton_repository(repo: Path) -> Path:
    modelzoo.write(repo, "triton", modelzoo.batchable())
    (repo / "triton" / "config.pbtxt").write_text(TRITON_CONFIG)

    (repo / "bare").mkdir(parents=True)
    (repo / "bare" / "model.onnx").write_bytes(modelzoo.batchable().SerializeToString())

    modelzoo.write(repo, "both", modelzoo.batchable(), manifest="[batching]\nmax_batch_size = 2\n")
    (repo / "both" / "config.pbtxt").write_text("max_batch_size: 4\n")

    modelzoo.write(repo, "huge", modelzoo.batchable(), manifest="[batching]\nmax_batch_size = 1e12\n")
    modelzoo.write(repo, "broken", modelzoo.batchable())
    (repo / "broken" / "config.pbtxt").write_text(
        'name: "broken"\ndynamic_batching {\n  max_queue_delay 100\n}\n'
    )
    return repo


def infer(client: httpx.Client, model: str, rows: int) -> httpx.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 4], "data": [1.0] * (rows * 4)}]}
    return client.post(f"/v2/models/{model}/infer", json=body)


def test_a_triton_layout_repository_serves_and_bad_models_fail_alone(
    serve: Callable[..., Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = triton_repository(tmp_path / "repo")
    with (
        caplog.at_level(logging.WARNING, logger="appliance"),
        serve(repo) as running,
        httpx.Client(base_url=running.url, timeout=30.0) as client,
    ):
        config = client.get("/v2/models/triton/config").json()
        assert config["max_batch_size"] == 4
        assert config["dynamic_batching"] == {
            "preferred_batch_size": [2, 4],
            "max_queue_delay_microseconds": 500,
        }
        assert config["instance_group"][0]["count"] == 1
        response = infer(client, "triton", 4)
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(response.json()["outputs"][0]["data"], [3.0] * 16)
        too_many = infer(client, "triton", 5)
        assert too_many.status_code == 400 and "4" in too_many.json()["error"]

        bare = infer(client, "bare", 1)
        assert bare.status_code == 200 and bare.json()["model_version"] == "1"
        assert client.get("/v2/models/bare").json()["versions"] == ["1"]

        assert client.get("/v2/models/both/config").json()["max_batch_size"] == 2  # model.toml wins

        index = {m["name"]: m for m in client.post("/v2/repository/index").json()}
        assert {name: m["state"] for name, m in index.items()} == {
            "bare": "READY",
            "both": "READY",
            "broken": "UNAVAILABLE",
            "huge": "UNAVAILABLE",
            "triton": "READY",
        }
        assert (
            "'batching.max_batch_size': Input should be less than or equal to 4096" in index["huge"]["reason"]
        )
        broken_config = repo / "broken" / "config.pbtxt"
        assert index["broken"]["reason"] == (
            f"{broken_config}, line 3: expected ':' or '{{' after field 'max_queue_delay', got '100'"
        )
        refused = infer(client, "huge", 1)
        assert refused.status_code == 503
        assert "huge" in refused.json()["error"] and "4096" in refused.json()["error"]

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # Each said once, though the index route reads every model again.
    assert sum("model triton:" in w and "fields not honoured: input (line 5:" in w for w in warnings) == 1
    assert sum("model bare:" in w and "serving it as version 1" in w for w in warnings) == 1
    assert sum("model both: model.toml and" in w and "config.pbtxt is ignored" in w for w in warnings) == 1
