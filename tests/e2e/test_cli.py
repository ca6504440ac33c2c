"""The command line in a subprocess: serve, SIGTERM drain, models check, config errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import modelzoo
import numpy as np
from subprocesses import appliance, environment

from appliance.protocol import codec


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment(tmp_path), **env},
    )


def test_sigterm_finishes_accepted_requests_then_exits_zero(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(
        repo,
        "slow_to_fill",
        modelzoo.batchable(),
        manifest="slo_p99_ms = 60000\n[batching]\nmax_batch_size = 64\nmax_queue_delay_ms = 60000\n",
    )
    with appliance(["serve", "--model-repository", str(repo), "--port", "0"], tmp_path) as process:
        url = process.url()
        results: list[httpx.Response] = []

        def send(index: int) -> None:
            body = codec.encode_request(
                {"x": np.full((1, 4), index, np.float32)}, binary=False, binary_output=False
            )
            results.append(httpx.post(f"{url}/v2/models/slow_to_fill/infer", content=body.body(), timeout=60))

        senders = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for sender in senders:
            sender.start()
        with httpx.Client(base_url=url) as client:
            while (
                'appliance_queue_depth{model="slow_to_fill",priority="line"} 3'
                not in client.get("/metrics").text
            ):
                pass  # the three requests are admitted and waiting for a fuller batch
        process.popen.send_signal(signal.SIGTERM)
        for sender in senders:
            sender.join(60)
        assert process.popen.wait(60) == 0
    assert sorted(r.status_code for r in results) == [200, 200, 200]
    sums = sorted(r.json()["outputs"][1]["data"][0] for r in results)
    assert sums == [0.0, 4.0, 8.0]


def test_serve_refuses_a_bad_setting_with_one_line(tmp_path: Path) -> None:
    result = _run(["serve", "--port", "0"], tmp_path, APPLIANCE_SERVER__PROT="1")
    assert result.returncode == 2
    assert result.stderr.strip() == "appliance: unknown setting 'server.prot' (from APPLIANCE_SERVER__PROT)"
    config = tmp_path / "appliance.toml"
    config.write_text("[models]\nrepositry = '/x'\n")
    result = _run(["serve", "--config", str(config)], tmp_path)
    assert result.returncode == 2
    assert f"unknown setting 'models.repositry' (from {config})" in result.stderr


def test_models_check_prints_signatures_and_reasons(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    modelzoo.write(repo, "corrupt", b"junk")
    result = _run(["models", "check", str(repo)], tmp_path)
    assert result.returncode == 1
    assert "batchable v1: READY on cpu (fp32, max_batch_size 8)" in result.stdout
    assert "input  x: FP32 [-1, 4]" in result.stdout
    assert "corrupt: UNAVAILABLE:" in result.stdout and "INVALID_PROTOBUF" in result.stdout
    report = json.loads(_run(["models", "check", "--json", str(repo)], tmp_path).stdout)
    assert {item["name"]: item["state"] for item in report} == {
        "batchable": "READY",
        "corrupt": "UNAVAILABLE",
    }


def test_config_schema_describes_every_field(tmp_path: Path) -> None:
    result = _run(["config-schema"], tmp_path)
    schema = json.loads(result.stdout)
    definitions = schema["$defs"]
    for definition in definitions.values():
        for name, field in definition.get("properties", {}).items():
            assert field.get("description"), f"{definition['title']}.{name} has no description"


def test_the_venv_make_run_uses_lists_no_test_plugins(tmp_path: Path) -> None:
    """`make test` installs the test extras only: the 'fake' and 'broken' providers are found by the
    test process from tests/fixtures, never by `appliance` itself."""
    result = _run(["providers", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    names = {provider["name"] for provider in json.loads(result.stdout)["providers"]}
    assert "cpu" in names and not names & {"fake", "broken"}
