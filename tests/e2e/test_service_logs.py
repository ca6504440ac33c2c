"""What `appliance serve` says, as a service: levels, JSON lines, one stop line, no duplicates."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import modelzoo
import numpy as np
import pytest
from subprocesses import Process, appliance, environment

from appliance.protocol import codec

STOPPED = re.compile(r"stopped on SIGTERM: (\d+) request\(s\) drained in [\d.]+ s")


def _repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    modelzoo.write(repo, "fixed", modelzoo.fixed_batch())
    return repo


def _stop(process: Process) -> list[str]:
    """SIGTERM, wait for the exit, return every line the process wrote."""
    process.popen.send_signal(signal.SIGTERM)
    assert process.popen.wait(60) == 0
    while (line := process.lines.get(timeout=30)) is not None:
        process.seen.append(line)
    return process.seen


def _infer(url: str) -> None:
    body = codec.encode_request({"x": np.ones((1, 4), np.float32)}, binary=False, binary_output=False)
    assert httpx.post(f"{url}/v2/models/batchable/infer", content=body.body(), timeout=60).status_code == 200


def test_json_lines_one_placement_per_model_and_one_stop_line(tmp_path: Path) -> None:
    args = ["serve", "--model-repository", str(_repository(tmp_path)), "--port", "0", "--log-format", "json"]
    with appliance(args, tmp_path) as process:
        _infer(process.url())
        lines = _stop(process)
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= record.keys() for record in records)
    messages = [record["message"] for record in records]
    ready = [m for m in messages if m.startswith("model batchable version 1 ready: runs on cpu")]
    assert len(ready) == 1, messages  # the instance trials open the model twice; one line says so
    assert not [m for m, n in Counter(messages).items() if n > 1], "a line was written twice"
    stops = [m for m in messages if STOPPED.fullmatch(m)]
    assert len(stops) == 1 and messages[-1] == stops[0]


def test_log_level_flag(tmp_path: Path) -> None:
    repo = _repository(tmp_path)
    modelzoo.write(repo, "corrupt", b"junk")
    args = ["serve", "--model-repository", str(repo), "--port", "0", "--log-level", "warning"]
    with appliance(args, tmp_path) as process:
        process.wait_for(re.compile(r"ERROR appliance.scheduler.hub: model corrupt unavailable"))
        lines = _stop(process)
    text = "".join(lines)
    assert " INFO " not in text and "ready on" not in text and "stopped on" not in text, text


def test_the_access_log_is_one_line_per_request(tmp_path: Path) -> None:
    args = ["serve", "--model-repository", str(_repository(tmp_path)), "--port", "0"]
    with appliance(args, tmp_path, environment(tmp_path, server__access_log="true")) as process:
        _infer(process.url())
        lines = _stop(process)
    access = [line for line in lines if "POST /v2/models/batchable/infer" in line]
    assert len(access) == 1 and " 200" in access[0], lines


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "appliance", "serve", "--model-repository", str(_repository(tmp_path)),
             "--port", str(port)],
            capture_output=True, text=True, timeout=120, env=environment(tmp_path),
        )  # fmt: skip
    # The README's line, word for word, on the port that was taken; and the exit status it gives.
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    promised = re.search(r"`(appliance: cannot listen on 127\.0\.0\.1:8000: [^`]+)` \(exit (\d+)\)", readme)
    assert promised is not None, "README no longer shows the port-in-use line"
    assert result.returncode == int(promised.group(2)) == 1
    assert result.stderr.strip().splitlines() == [promised.group(1).replace(":8000:", f":{port}:")]
    assert result.stderr.strip() == (
        f"appliance: cannot listen on 127.0.0.1:{port}: address already in use (server.host, server.port)"
    )


@pytest.mark.parametrize("flag", ["--help"])
def test_serve_help_gives_defaults_and_the_environment_convention(tmp_path: Path, flag: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", flag], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for expected in ("default 127.0.0.1", "default 8000", "the bundled models", "APPLIANCE_SERVER__PORT=9000",
                     "--log-level", "--log-format"):  # fmt: skip
        assert expected in text, expected
