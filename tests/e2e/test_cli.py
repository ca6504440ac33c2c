"""The command line in a subprocess: models check, config errors (SIGTERM and SIGHUP: test_signals.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import modelzoo
from subprocesses import environment


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment(tmp_path), **env},
    )


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
