"""A large JSON answer is written off the event loop that serves the line, and comes back whole: the
same bytes as one orjson call over each tensor, and shared-memory outputs written beside it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import modelzoo
import numpy as np
import orjson
import pytest
from services import RunningService
from shm_objects import shm_object

from appliance.dataplane import plane
from appliance.protocol import codec
from appliance.protocol.tensor_data import SLICE_ELEMENTS

WIDTH = 3 * SLICE_ELEMENTS + 5  # of any_width's one row: y = 2x has this many elements, past both bounds


@pytest.fixture
def running(serve: Callable[..., Any], tmp_path: Path) -> Iterator[RunningService]:
    repository = tmp_path / "repo"
    modelzoo.write(repository, "any_width", modelzoo.any_width())
    with serve(repository) as service:
        yield service


@pytest.fixture
def encoders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread of each JSON answer's write, in order."""
    threads: list[int] = []
    write = codec.encode_response

    def recorded(**kwargs: Any) -> codec.EncodedResponse:
        threads.append(threading.get_ident())
        return write(**kwargs)

    monkeypatch.setattr(plane.JsonFraming, "encode", staticmethod(recorded))
    return threads


async def _thread() -> int:
    return threading.get_ident()


def post(http: httpx.Client, header: dict[str, Any], blob: bytes) -> httpx.Response:
    head = orjson.dumps(header)
    return http.post(
        "/v2/models/any_width/infer", content=head + blob, headers={codec.HEADER_LENGTH: str(len(head))}
    )


def binary_x(x: np.ndarray) -> dict[str, Any]:
    return {
        "name": "x",
        "datatype": "FP32",
        "shape": list(x.shape),
        "parameters": {"binary_data_size": x.nbytes},
    }


def test_a_large_json_answer_is_written_on_a_worker_thread(
    running: RunningService, encoders: list[int]
) -> None:
    """y (past ENCODE_ON_THREAD_ELEMENTS, as JSON) is written on a worker thread, its text what one
    orjson call writes; s goes into a shared-memory region from that thread. A small answer is written
    on the loop, as before."""
    loop_thread = running.call(_thread)
    x = np.random.default_rng(3).standard_normal((1, WIDTH)).astype(np.float32)
    with shm_object(64) as sums, httpx.Client(base_url=running.url, timeout=60.0) as http:
        region = {"key": sums.key, "offset": 0, "byte_size": 64}
        assert http.post("/v2/systemsharedmemory/region/sums/register", json=region).status_code == 200
        header = {
            "inputs": [binary_x(x)],
            "outputs": [
                {"name": "y"},
                {"name": "s", "parameters": {"shared_memory_region": "sums", "shared_memory_byte_size": 4}},
            ],
        }
        response = post(http, header, x.tobytes())
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == codec.JSON_TYPE
        y, s = orjson.loads(response.content)["outputs"]
        assert (y["name"], y["shape"], s["name"], "data" in s) == ("y", [1, WIDTH], "s", False)
        # 2x is exact in FP32: the answer holds the very text one orjson call writes for it
        whole = orjson.dumps((x * 2).reshape(-1), option=orjson.OPT_SERIALIZE_NUMPY)
        assert b'"data":' + whole in response.content
        np.testing.assert_allclose(np.frombuffer(sums.read(4), np.float32), x.sum(), rtol=1e-4)

        small = post(http, {"inputs": [binary_x(x[:, :4])], "outputs": [{"name": "y"}]}, x[:, :4].tobytes())
        assert small.status_code == 200, small.text
        data = orjson.loads(small.content)["outputs"][0]["data"]
        np.testing.assert_array_equal(np.asarray(data, np.float32), x[0, :4] * 2)
    assert len(encoders) == 2
    assert encoders[0] != loop_thread  # the large answer: a worker thread
    assert encoders[1] == loop_thread  # the small one: inline


def test_binary_and_shared_memory_outputs_do_not_count_as_json(
    running: RunningService, encoders: list[int]
) -> None:
    """The same large y asked as binary data is written inline: only JSON text goes to a thread."""
    loop_thread = running.call(_thread)
    x = np.ones((1, WIDTH), np.float32)
    with httpx.Client(base_url=running.url, timeout=60.0) as http:
        header = {"inputs": [binary_x(x)], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
        response = post(http, header, x.tobytes())
    assert response.status_code == 200, response.text
    length = int(response.headers[codec.HEADER_LENGTH])
    np.testing.assert_array_equal(codec.decode_response(response.content, length)["y"], x * 2)
    assert encoders == [loop_thread]
