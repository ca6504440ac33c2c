"""One admin socket per instance, and `appliance status|reload|drain|resume` against a running service."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import modelzoo
import numpy as np
import pytest
from subprocesses import environment

from appliance.protocol import codec
from appliance.system.admin import AdminError, admin_request, in_use_message


def small_repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="[batching]\nmax_batch_size = 8\n")
    return repo


def appliance(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m appliance ARGS` told the service's runtime dir (<tmp_path>/run) by its settings, as an
    operator's shell is by /etc/appliance/appliance.toml; `env` on top."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment(tmp_path, system__runtime_dir=str(tmp_path / "run")), **env},
    )


def infer(url: str) -> int:
    body = codec.encode_request({"x": np.ones((1, 4), np.float32)}, binary=False, binary_output=False)
    return httpx.post(f"{url}/v2/models/batchable/infer", content=body.body(), timeout=30.0).status_code


def test_a_second_instance_on_the_same_runtime_dir_fails_with_one_line(serve, tmp_path) -> None:
    repo = small_repository(tmp_path)
    with serve(repo) as first:
        path = first.service.settings.system.admin_socket_path
        assert path == tmp_path / "run" / "admin.sock"
        second = appliance(tmp_path, "serve", "--model-repository", str(repo), "--port", "0")
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines()[-1] == f"appliance: {in_use_message(path, os.getpid())}"
        assert "Traceback" not in second.stderr
        assert admin_request(path, "status")["pid"] == os.getpid()  # the first keeps its socket
        assert infer(first.url) == 200


def test_a_second_instance_in_process_is_refused_too(serve, tmp_path) -> None:
    repo = small_repository(tmp_path)
    with serve(repo) as first:
        path = first.service.settings.system.admin_socket_path
        with (
            pytest.raises(AdminError, match="is in use by another running appliance"),
            serve(repo),
        ):
            pass
        assert admin_request(path, "status")["state"] == "ready"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_the_service_refuses_a_runtime_dir_another_user_owns(serve, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, 4242, 4242)
    expected = f"admin socket folder {run_dir} is owned by uid 4242; expected uid {os.getuid()}"
    with pytest.raises(AdminError, match=expected), serve(small_repository(tmp_path)):
        pass
    assert list(run_dir.iterdir()) == []


def test_the_service_refuses_a_runtime_dir_others_may_write(serve, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    expected = f"admin socket folder {run_dir} has mode 0777, writable by group or others"
    with pytest.raises(AdminError, match=expected), serve(small_repository(tmp_path)):
        pass
    assert list(run_dir.iterdir()) == []


def test_an_empty_admin_socket_setting_serves_without_one(serve, tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, "appliance")
    with serve(small_repository(tmp_path), system={"admin_socket": ""}) as running:
        assert running.service.settings.system.admin_socket_path is None
        assert infer(running.url) == 200
        assert not (tmp_path / "run" / "admin.sock").exists()
        result = appliance(tmp_path, "status")
    assert "admin socket turned off (system.admin_socket is empty)" in caplog.text
    assert result.returncode == 3  # `appliance status` in the default place finds no instance
    assert f"nothing listens on {tmp_path / 'run' / 'admin.sock'}" in result.stderr


def test_the_operator_verbs_against_a_running_service(serve, tmp_path) -> None:
    with serve(small_repository(tmp_path)) as running:
        socket_path = tmp_path / "run" / "admin.sock"
        instance = f"appliance pid {os.getpid()} (no config file, http://127.0.0.1:{running.port})"

        status = appliance(tmp_path, "status")
        assert status.returncode == 0, status.stderr
        assert f"{instance} on admin socket {socket_path}" in status.stdout
        assert "state      ready" in status.stdout
        assert "batchable  READY  version 1 on cpu" in status.stdout
        document = json.loads(appliance(tmp_path, "status", "--json").stdout)
        assert document["pid"] == os.getpid() and document["models"]["batchable"]["state"] == "READY"

        for _ in range(2):  # idempotent
            drained = appliance(tmp_path, "drain", "--timeout-s", "5")
            assert drained.returncode == 0, drained.stderr
            assert drained.stdout.startswith("drained: no request in flight")
            assert instance in drained.stderr
        assert admin_request(socket_path, "status")["state"] == "draining"
        assert infer(running.url) == 503

        resumed = appliance(tmp_path, "resume")
        assert (resumed.returncode, resumed.stdout) == (0, "state: ready\n")
        assert infer(running.url) == 200

        reloaded = appliance(tmp_path, "reload")
        assert (reloaded.returncode, reloaded.stdout) == (0, "batchable  READY  version 1\n")
        # A new version on disk: `appliance reload` makes the running service serve it.
        modelzoo.write(tmp_path / "repo", "batchable", modelzoo.batchable(scale=10.0, offset=0.0), version=2)
        reloaded = appliance(tmp_path, "reload")
        assert (reloaded.returncode, reloaded.stdout) == (0, "batchable  READY  version 2\n")
        body = codec.encode_request({"x": np.ones((1, 4), np.float32)}, binary=False, binary_output=False)
        answer = httpx.post(
            f"{running.url}/v2/models/batchable/infer", content=body.body(), timeout=30
        ).json()
        assert (answer["model_version"], answer["outputs"][0]["data"]) == ("2", [10.0] * 4)
        modelzoo.write(tmp_path / "repo", "batchable", b"not a model", version=3)
        failed = appliance(tmp_path, "reload")  # the broken version 3 fails; version 2 keeps serving
        assert failed.returncode == 1 and failed.stdout.startswith("batchable  FAILED")
        assert infer(running.url) == 200

        refused = appliance(tmp_path, "drain", "--timeout-s", "nan")
        assert refused.returncode == 2
        assert refused.stderr.strip().splitlines()[-1] == (
            "appliance drain: error: argument --timeout-s: expected a number of seconds in (0, 86400], "
            "got 'nan'"
        )
        assert admin_request(socket_path, "status")["state"] == "ready"


@pytest.mark.skipif(os.path.isdir("/run/appliance"), reason="a provisioned box: /run/appliance comes first")
@pytest.mark.parametrize("verb", ["status", "reload", "drain", "resume"])
def test_the_verbs_never_take_the_admin_socket_from_the_callers_unit(serve, tmp_path, verb) -> None:
    """Run from another unit (a health check, an update agent) with nothing configured, a verb finds
    the service where it would be ($XDG_RUNTIME_DIR/appliance here, /run/appliance on a provisioned
    box): $RUNTIME_DIRECTORY is the caller's unit's folder, and a verb that took the socket from it
    would say "not running" of a service that serves."""
    runtime_dir = tmp_path / "xdg" / "appliance"
    with serve(small_repository(tmp_path), system={"runtime_dir": runtime_dir}):
        agent = tmp_path / "agent-run"
        agent.mkdir()
        env = {
            **environment(tmp_path),
            "RUNTIME_DIRECTORY": str(agent),
            "XDG_RUNTIME_DIR": str(runtime_dir.parent),
        }
        argv = [sys.executable, "-m", "appliance", verb]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        assert f"on admin socket {runtime_dir / 'admin.sock'}" in result.stdout + result.stderr


def test_status_of_no_service_says_where_it_looked(tmp_path) -> None:
    result = appliance(tmp_path, "status")
    assert result.returncode == 3
    assert result.stderr == f"appliance: not running (nothing listens on {tmp_path / 'run' / 'admin.sock'})\n"
    drained = appliance(tmp_path, "drain")
    assert drained.returncode == 2
    assert (
        drained.stderr.strip()
        == f"appliance: not running (nothing listens on {tmp_path / 'run' / 'admin.sock'})"
    )


@pytest.mark.parametrize(
    ("verb", "args", "expected"),
    [
        ("drain", {"timeout_s": math.nan}, "timeout_s must be a number of seconds in (0, 86400], got nan"),
        ("drain", {"timeout_s": math.inf}, "got inf"),
        ("drain", {"timeout_s": "nan"}, "got 'nan'"),
        ("drain", {"timeout_s": -1}, "got -1"),
        ("drain", {"timeout_s": True}, "got True"),
        ("drain", {"timeout_s": 1e9}, "got 1000000000.0"),
        ("drain", {"reason": 5}, "reason must be printable text of 1 to 200 characters, got 5"),
        ("drain", {"reason": "x\n"}, "reason must be printable text"),
        (
            "drain",
            {"timeout_s": 1, "bogus": 1},
            "drain has no argument 'bogus'; its arguments: reason, timeout_s",
        ),
        ("resume", {"now": True}, "resume has no argument 'now'; its arguments: none"),
        ("reload", {"model": "x"}, "reload has no argument 'model'"),
    ],
)
def test_admin_verbs_check_every_argument_before_changing_anything(server, verb, args, expected) -> None:
    path = server.service.settings.system.admin_socket_path
    if verb == "resume":
        admin_request(path, "drain", {"timeout_s": 5})
    before = admin_request(path, "status")["state"]
    with pytest.raises(AdminError) as caught:
        admin_request(path, verb, args)
    assert expected in str(caught.value)
    assert admin_request(path, "status")["state"] == before
    admin_request(path, "resume")


ESC = "\x1b"


@contextlib.contextmanager
def answering(path: Path, replies: dict[str, Any]) -> Iterator[None]:
    """A service of the service's user that answers each verb with `replies[verb]` as it likes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with connection, connection.makefile("rb") as stream:
                verb = json.loads(stream.readline())["verb"]
                connection.sendall(json.dumps({"ok": True, **replies[verb]}).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)


def operator(tmp_path: Path, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**environment(tmp_path), "APPLIANCE_SYSTEM__ADMIN_SOCKET": str(path)}
    argv = [sys.executable, "-m", "appliance", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)


HOSTILE = {
    "status": {
        "state": "ready",
        "pid": 42,
        "version": f"1{ESC}[8m",
        "repository": f"/var/lib/appliance/models{ESC}]0;owned-title\x07",
        "line": {"queue_depth": 0, "served_ips": 0, "inflight": f"0\r{ESC}[2K"},
        "providers": {f"cpu{ESC}[1A": True},
        "models": {
            f"m\n  fake  READY  version 9 on TensorrtExecutionProvider{ESC}[8m": {
                "state": "FAILED",
                "reason": f"x{ESC}[2K\rall good",
            },
            "ok": {"state": "READY", "version": "2\n", "placement": {"provider": f"cuda{ESC}[0m"}},
        },
    },
    "reload": {"models": {"m\r": {"state": "FAILED", "reason": f"{ESC}[1A{ESC}[2K\rm  READY  version 3"}}},
    "drain": {"drained": False, "inflight": f"1\nappliance: drained{ESC}[2K"},
    "resume": {"state": f"ready\n{ESC}[31mforged"},
}


@pytest.mark.parametrize("verb", ["status", "reload", "drain", "resume"])
def test_what_a_service_answers_is_printed_escaped(tmp_path, verb) -> None:
    folder = tmp_path / "svc"
    folder.mkdir(mode=0o700)
    with answering(folder / "admin.sock", HOSTILE):
        result = operator(tmp_path, folder / "admin.sock", verb)
    assert "Traceback" not in result.stderr
    for stream in (result.stdout, result.stderr):
        assert ESC not in stream and "\r" not in stream and "\x07" not in stream
    lines = result.stdout.splitlines()
    if verb == "status":
        assert result.returncode == 0, result.stderr
        assert lines[1] == "state      ready (version 1\\x1b[8m, up None s)"
        assert lines[2] == "repository /var/lib/appliance/models\\x1b]0;owned-title\\x07"
        assert lines[-2].startswith(
            "  m\\n  fake  READY  version 9 on TensorrtExecutionProvider\\x1b[8m  FAILED: "
        )
        assert lines[-1].endswith(
            "READY  version 2\\n on cuda\\x1b[0m, SLO p99 None ms, None inferences/s, None queued"
        )
        assert len(lines) == 8  # instance, state, repository, line, providers, "models", two models
    elif verb == "reload":
        assert result.returncode == 1
        assert lines == ["m\\r  FAILED  \\x1b[1A\\x1b[2K\\rm  READY  version 3"]
    elif verb == "drain":
        assert result.returncode == 75
        assert len(lines) == 1 and lines[0].startswith("draining: 1\\nappliance: drained\\x1b[2K request(s)")
    else:
        assert (result.returncode, lines) == (0, ["state: ready\\n\\x1b[31mforged"])


@pytest.mark.parametrize(
    ("verb", "replies", "expected"),
    [
        ("status", {"line": []}, "status reply's 'line' is an array, expected a JSON object"),
        ("status", {"providers": "cpu"}, "status reply's 'providers' is a string, expected a JSON object"),
        ("status", {"models": ["m"]}, "status reply's 'models' is an array, expected a JSON object"),
        ("status", {"models": {"m": "x"}}, "status reply's model m is a string, expected a JSON object"),
        ("status", {"models": {"m\n": 1}}, "status reply's model m\\n is a number, expected a JSON object"),
        (
            "status",
            {"models": {"m": {"state": "READY", "placement": [1]}}},
            "status reply's model m: 'placement' is an array, expected a JSON object",
        ),
        ("reload", {"models": ["m"]}, "reload reply's 'models' is an array, expected a JSON object"),
        ("reload", {"models": {"m": None}}, "reload reply's model m is null, expected a JSON object"),
    ],
)
def test_a_reply_of_the_wrong_shape_fails_in_one_line(tmp_path, verb, replies, expected) -> None:
    folder = tmp_path / "svc"
    folder.mkdir(mode=0o700)
    answers = {"status": {"state": "ready", "pid": 42}, "reload": {"models": {}}}
    answers[verb] = {**answers[verb], **replies}
    with answering(folder / "admin.sock", answers):
        result = operator(tmp_path, folder / "admin.sock", verb)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"appliance: the service's answer makes no sense: {expected}"
    assert "Traceback" not in result.stderr and result.stdout == ""
