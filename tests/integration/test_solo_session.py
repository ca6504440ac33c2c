"""A request alone runs on every core the model may use; one among others runs on its worker's share."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import modelzoo
import numpy as np
import pytest

from appliance.protocol import codec


def _post(url: str, value: float) -> httpx.Response:
    body = codec.encode_request({"x": np.full((1, 4), value, np.float32)}, binary=False, binary_output=False)
    return httpx.post(f"{url}/v2/models/batchable/infer", content=body.body(), timeout=60)


def test_alone_on_every_core_among_others_on_its_share(serve, tmp_path: Path, batches) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="slo_p99_ms = 60000\n")
    with serve(repo, scheduler={"instances": 2}) as running:
        cores = running.service.hub.cores
        if cores < 2:
            pytest.skip("one core: two workers cannot split it, and no second session is opened")
        solo = httpx.get(f"{running.url}/v2/models/batchable/config").json()["appliance"]["solo_session"]
        assert solo["threads"] == cores and solo["memory_mb"] >= 0
        assert _post(running.url, 1.0).status_code == 200
        [alone] = batches.wait_for(lambda b: b.marks == (1.0,))
        assert alone.is_solo
        with batches.holding(lambda b: b.marks == (2.0,)):
            first = threading.Thread(target=_post, args=(running.url, 2.0))
            first.start()
            batches.wait_held()  # the first request is running on one worker...
            assert _post(running.url, 3.0).status_code == 200  # ...so this one is not alone
        first.join(60)
        [held] = batches.wait_for(lambda b: b.marks == (2.0,))
        [among] = batches.wait_for(lambda b: b.marks == (3.0,))
        assert held.is_solo and not among.is_solo


def test_no_second_session_where_one_worker_has_every_core(serve, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    for settings in ({"instances": 1}, {"instances": 2, "solo_session": False}):
        with serve(repo, scheduler=settings) as running:
            config = httpx.get(f"{running.url}/v2/models/batchable/config").json()
            assert config["appliance"]["solo_session"] is None
            assert running.service.hub.scheduler("batchable").model.solo is None
