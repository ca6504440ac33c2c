"""Signals to a real `appliance serve` while a request is surely mid-compute: SIGTERM drains it, or cuts
it short when drain_timeout_s runs out, and refuses what comes after; SIGHUP reloads the models.

The service runs through tests/held_serve.py: the real command line, with the worker's test seam
holding every batch of one model until the test lets it go, so "mid-compute" is a fact, not a hope.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import httpx
import modelzoo
import numpy as np
from subprocesses import HELD, Process, appliance, environment

from appliance.protocol import codec
from appliance.system.admin import admin_request

MANIFEST = "slo_p99_ms = 600000.0\ninstances = 1\n[batching]\nmax_batch_size = 1\n"
STOPPED = re.compile(r"stopped on SIGTERM: (.*) in [\d.]+ s$")


def _repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest=MANIFEST)  # y = 2x + 1
    return repo


def _serve(tmp_path: Path, **settings: str):  # type: ignore[no-untyped-def]
    args = ["serve", "--model-repository", str(_repository(tmp_path)), "--port", "0"]
    return appliance(args, tmp_path, environment(tmp_path, **settings), held="batchable")


def _post(url: str, value: float) -> tuple[threading.Thread, list[httpx.Response]]:
    return _post_to(url, "batchable", value)


def _state(process: Process) -> str:
    assert process.runtime_dir is not None
    return admin_request(process.runtime_dir / "admin.sock", "status")["state"]


def _wait_draining(process: Process) -> None:
    """SIGTERM was handled: the service has stopped admitting (it says so on its admin socket)."""
    deadline_s = time.monotonic() + 60
    while _state(process) != "draining":
        assert time.monotonic() < deadline_s, "the service never began to drain"
        time.sleep(0.01)


def _rest(process: Process) -> list[str]:
    """Every line until the process's output ends."""
    while (line := process.lines.get(timeout=60)) is not None:
        process.seen.append(line)
    return process.seen


def test_sigterm_finishes_the_requests_it_accepted_and_refuses_those_after_it(tmp_path: Path) -> None:
    with _serve(tmp_path) as process:
        url = process.url()
        first = _post(url, 1.0)
        process.wait_for(HELD)  # the first request is mid-compute
        second = _post(url, 2.0)
        process.wait_admitted("batchable", 2)  # queued behind it
        process.popen.send_signal(signal.SIGTERM)
        _wait_draining(process)
        after = httpx.post(
            f"{url}/v2/models/batchable/infer",
            content=codec.encode_request({"x": np.ones((1, 4), np.float32)}, binary=False).body(),
            timeout=60,
        )
        assert first[1] == [] and second[1] == []  # still held: the drain waits for them
        process.release()  # the first runs
        process.wait_for(HELD)
        process.release()  # the second runs
        for thread, _ in (first, second):
            thread.join(60)
        assert process.popen.wait(60) == 0
        lines = _rest(process)
    assert after.status_code == 503 and "draining" in after.json()["error"]
    assert int(after.headers["retry-after"]) >= 1 and after.headers["connection"] == "close"
    answers = [answers[0] for _, answers in (first, second)]
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json()["outputs"][0]["data"] for a in answers] == [[3.0] * 4, [5.0] * 4]
    [stop] = [m.group(1) for line in lines if (m := STOPPED.search(line.strip()))]
    assert stop == "2 request(s) drained"


def test_when_drain_timeout_s_runs_out_the_request_is_cut_short_with_a_503(tmp_path: Path) -> None:
    with _serve(tmp_path, server__drain_timeout_s="1.0") as process:
        url = process.url()
        held = _post(url, 1.0)
        process.wait_for(HELD)
        process.popen.send_signal(signal.SIGTERM)
        process.wait_for(re.compile(r"drain timed out after 1 s with 1 request\(s\) still running; stopping"))
        held[0].join(60)  # answered while its batch is still held: the drain is over
        assert [a.status_code for a in held[1]] == [503]
        process.release()  # let the worker go, so that the service can close it
        assert process.popen.wait(60) == 0
        lines = _rest(process)
    answer = held[1][0]
    assert answer.json()["error"] == (
        "the service is stopping and the request was not complete within 1 s (server.drain_timeout_s)"
    )
    assert int(answer.headers["retry-after"]) >= 1 and answer.headers["connection"] == "close"
    [stop] = [m.group(1) for line in lines if (m := STOPPED.search(line.strip()))]
    assert stop == "0 request(s) drained, 1 cut short"


def test_sighup_reloads_the_models_and_the_request_in_flight_finishes_on_the_old_one(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with _serve(tmp_path) as process:
        url = process.url()
        old = _post(url, 1.0)
        process.wait_for(HELD)  # on version 1
        modelzoo.write(repo, "batchable", modelzoo.batchable(scale=10.0, offset=0.0), version=2)
        process.popen.send_signal(signal.SIGHUP)
        process.wait_for(re.compile(r"model batchable version 2 ready"))
        new = _post(url, 1.0)  # to version 2, waiting behind the held batch of version 1
        process.wait_admitted("batchable", 1)  # version 2's scheduler has it
        process.release()  # version 1's batch
        process.wait_for(HELD)  # version 2's
        process.release()
        for thread, _ in (old, new):
            thread.join(60)
        process.popen.send_signal(signal.SIGTERM)
        assert process.popen.wait(60) == 0
    assert (old[1][0].json()["model_version"], old[1][0].json()["outputs"][0]["data"]) == ("1", [3.0] * 4)
    assert (new[1][0].json()["model_version"], new[1][0].json()["outputs"][0]["data"]) == ("2", [10.0] * 4)


def test_sigterm_runs_at_once_a_batch_that_waits_for_more_rows(tmp_path: Path) -> None:
    """A drain sends no more rows: a partial batch waiting up to max_queue_delay_ms runs at once.

    A partial batch waits only for company that is likely (a lone client's request never waits), so
    three requests come while an opener's batch is held: they wait in the queue for more rows, for
    ten minutes, once the opener is let go."""
    repo = tmp_path / "repo"
    modelzoo.write(
        repo,
        "slow_to_fill",
        modelzoo.batchable(),
        manifest="slo_p99_ms = 600000\ninstances = 1\n[batching]\nmax_batch_size = 64\n"
        "max_queue_delay_ms = 600000\n",
    )
    args = ["serve", "--model-repository", str(repo), "--port", "0"]
    with appliance(args, tmp_path, environment(tmp_path), held="slow_to_fill") as process:
        url = process.url()
        senders = [_post_to(url, "slow_to_fill", 100.0)]
        process.wait_for(HELD)  # the opener
        senders += [_post_to(url, "slow_to_fill", float(i)) for i in range(3)]
        process.wait_admitted("slow_to_fill", 4)
        process.release()  # the opener is answered; the three wait in the queue for a fuller batch
        _wait_queued(process, "slow_to_fill", 3)
        process.popen.send_signal(signal.SIGTERM)
        process.wait_for(HELD)  # the three, as one batch, at once
        process.release()
        for thread, _ in senders:
            thread.join(60)
        assert process.popen.wait(60) == 0
    answers = [answer for _, answers in senders for answer in answers]
    assert [a.status_code for a in answers] == [200] * 4
    sums = sorted(a.json()["outputs"][1]["data"][0] for a in answers)
    assert sums == [0.0, 4.0, 8.0, 400.0]


def _post_to(url: str, model: str, value: float) -> tuple[threading.Thread, list[httpx.Response]]:
    body = codec.encode_request({"x": np.full((1, 4), value, np.float32)}, binary=False, binary_output=False)
    answers: list[httpx.Response] = []

    def send() -> None:
        answers.append(httpx.post(f"{url}/v2/models/{model}/infer", content=body.body(), timeout=120))

    thread = threading.Thread(target=send)
    thread.start()
    return thread, answers


def _wait_queued(process: Process, model: str, count: int) -> None:
    """Until `count` requests to `model` are in flight and all of them still in its queue (no batch)."""
    assert process.runtime_dir is not None
    deadline_s = time.monotonic() + 60
    while True:
        status = admin_request(process.runtime_dir / "admin.sock", "status")["models"][model]
        if status["inflight"] == count and status["line_queue_depth"] == count:
            return
        assert time.monotonic() < deadline_s, f"never {count} waiting in the queue: {status}"
        time.sleep(0.01)
