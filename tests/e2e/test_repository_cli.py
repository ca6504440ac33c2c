"""`appliance serve` on a repository path that is not there: one line and a non-zero exit, not "no models"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from subprocesses import environment


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_serve_refuses_a_missing_repository_with_one_line(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "nowhere"
    args = ["serve", "--port", "0"]
    env = environment(tmp_path)
    if how == "flag":
        args += ["--model-repository", str(missing)]
    else:
        env["APPLIANCE_MODELS__REPOSITORY"] = str(missing)
    result = subprocess.run(
        [sys.executable, "-m", "appliance", *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 2
    assert result.stderr == f"appliance: model repository {missing} does not exist\n"
    assert result.stdout == ""
