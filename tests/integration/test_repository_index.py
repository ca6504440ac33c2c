"""POST /v2/repository/index: read off the event loop, and every bad model on disk is a reason, not a 500."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import modelzoo

from appliance.engine.repository import Repository

WAIT_S = 60.0


def test_the_index_reads_the_repository_off_the_event_loop(serve, tmp_path: Path) -> None:
    """Reading every model's config took 1.4 s per MiB of config.pbtxt on the event loop, and all line
    traffic waited. Here the read is held until the test has seen the server answer meanwhile."""
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    with serve(repo) as running, httpx.Client(base_url=running.url, timeout=WAIT_S) as client:
        repository: Repository = running.service.hub.repository
        reading, release = threading.Event(), threading.Event()
        original = repository.index

        def held_index() -> object:
            reading.set()
            release.wait(WAIT_S)
            return original()

        repository.index = held_index  # type: ignore[method-assign]
        answers: list[httpx.Response] = []
        caller = threading.Thread(target=lambda: answers.append(client.post("/v2/repository/index")))
        caller.start()
        try:
            assert reading.wait(WAIT_S), "the index never read the repository"
            live = httpx.get(f"{running.url}/v2/health/live", timeout=10.0)  # a bound only if it fails
            assert live.status_code == 200
        finally:
            release.set()
            caller.join(WAIT_S)
        assert answers[0].status_code == 200
        assert answers[0].json() == [{"name": "batchable", "version": "1", "state": "READY", "reason": ""}]


def test_every_bad_model_on_disk_is_listed_with_its_reason(serve, tmp_path: Path) -> None:
    """A 5000-digit integer in config.pbtxt or model.toml made the index a 500 (int() refuses more than
    4300 digits); a version folder `007` made the model fail for a file `7/model.onnx` it never had."""
    repo = tmp_path / "repo"
    modelzoo.write(repo, "good", modelzoo.batchable())
    modelzoo.write(repo, "pbtxt", modelzoo.batchable())
    (repo / "pbtxt" / "config.pbtxt").write_text("max_batch_size: " + "9" * 5000 + "\n")
    modelzoo.write(repo, "toml", modelzoo.batchable(), manifest="version = " + "9" * 5000 + "\n")
    padded = repo / "padded" / "007"
    padded.mkdir(parents=True)
    (padded / "model.onnx").write_bytes(modelzoo.batchable().SerializeToString())
    with serve(repo) as running, httpx.Client(base_url=running.url, timeout=WAIT_S) as client:
        response = client.post("/v2/repository/index")
        assert response.status_code == 200
        index = {model["name"]: model for model in response.json()}
        assert index["good"]["state"] == "READY"
        assert client.get("/v2/models/good/ready").status_code == 200
        for name in ("pbtxt", "toml", "padded"):
            assert index[name]["state"] == "UNAVAILABLE", index[name]
        assert (
            "line 1: max_batch_size: integer 99999999999999999999... (5000 characters) is out of range"
            in (index["pbtxt"]["reason"])
        )
        assert (
            "line 1: version = 99999999999999999999...: an integer of 5000 digits" in index["toml"]["reason"]
        )
        assert "(ignored: 007: not a version number as written)" in index["padded"]["reason"]
        assert "7/model.onnx" not in index["padded"]["reason"]
