"""`appliance bench MODEL`: a curve against raw ORT and the offer; it will not run beside a live service."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import modelzoo
from subprocesses import appliance, environment


def _bench(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(tmp_path),
    )


def test_bench_measures_a_model_folder_a_file_and_a_repository_name(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="slo_p99_ms = 60000\n")
    for target in (str(repo / "batchable"), str(repo / "batchable" / "1" / "model.onnx")):
        result = _bench([target, "--duration-s", "0.2", "--clients", "1,2", "--json"], tmp_path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert [p["clients"] for p in report["curve"]] == [1, 2]
        assert all(p["answered"] > 0 for p in report["curve"])
        assert report["raw_ort"]["rows_per_s"] > 0 and report["offer"]["max_ips_at_slo"] > 0
    env_repo = ["--config", str(_config(tmp_path, repo))]
    text = _bench(["batchable", *env_repo, "--duration-s", "0.2", "--clients", "1"], tmp_path)
    assert text.returncode == 0, text.stderr
    assert re.search(r"capacity at the SLO \(60000 ms p99\): [\d.]+ inferences/s", text.stdout), text.stdout
    assert "100% done" in text.stderr  # the progress, one line per step off a terminal


def test_bench_refuses_to_run_beside_a_live_service_unless_forced(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    with appliance(["serve", "--model-repository", str(repo), "--port", "0"], tmp_path) as served:
        served.url()
        args = [str(repo / "batchable"), "--duration-s", "0.1", "--clients", "1"]
        refused = _bench(args, tmp_path)
        assert refused.returncode == 2
        assert "appliance is serving here" in refused.stderr and "--force" in refused.stderr
        forced = _bench(
            [str(repo / "batchable"), "--duration-s", "0.1", "--clients", "1", "--force"], tmp_path
        )
        assert forced.returncode == 0, forced.stderr


def test_bench_names_what_it_cannot_find(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    result = _bench(["nosuch", "--config", str(_config(tmp_path, repo))], tmp_path)
    assert result.returncode == 2
    assert "no model 'nosuch'" in result.stderr and "batchable" in result.stderr


def _config(tmp_path: Path, repo: Path) -> Path:
    config = tmp_path / "appliance.toml"
    config.write_text(f'[models]\nrepository = "{repo}"\n')
    return config
