"""A pool job cannot make the node parse or write more than a little JSON, whatever it declares.

A JSON parse holds the GIL, so while one runs the event loop that serves the line waits, on a worker
thread as on the loop. Regression: a 7.8 MB JSON job (26 rows, refused anyway by the pool row limit)
was parsed whole before admission looked at its rows, and held the loop 120-160 ms each time.

The node here serves `wide` (x: FP32 [N, 16384]; s = the sum of each row, y = each row three times)
with a pool row limit of 1 row (pool.max_interference_ms tiny: one row is always allowed), and
`echo` (text: BYTES [N] -> echo, the same), whose body the model's shape cannot bound.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import modelzoo
import numpy as np
import onnx
import orjson
import pytest
from onnx import TensorProto, helper, numpy_helper
from pool_brokers import Broker
from pool_recorder import WAIT_S, Names, Received, Recorder, ask, pool_section, validate

from appliance import tensors
from appliance.dataplane.budget import WorkBudget
from appliance.dataplane.plane import JSON_BYTES_PER_CHARACTER, MAX_JSON_OUTPUT_TEXT_BYTES, Bounds
from appliance.pool import routes
from appliance.pool.routes import SCAN_BYTES
from appliance.pool.wire import MAX_JSON_BYTES, MAX_JSON_OUTPUT_ELEMENTS
from appliance.protocol import codec, nonfinite

WIDTH = 16384  # one row: 64 KiB as binary FP32, more as JSON unless its numbers are one digit
BATCHING = "[batching]\nmax_batch_size = 8\n"


def wide() -> onnx.ModelProto:
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
            helper.make_node("Concat", ["x", "x", "x"], ["y"], axis=1),
        ],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3 * WIDTH]),
        ],
        [axes],
    )
    return checked(graph)


def echo() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["N"])],
    )
    return checked(graph)


def checked(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "wide", wide(), manifest=BATCHING)
    modelzoo.write(repo, "echo", echo(), manifest=BATCHING)
    return repo


@dataclass
class Decoding:
    """What the node parsed as request JSON (sizes, and on which thread) and which inputs' data it
    decoded, from spies on the codec's loader and tensor decoders. The test's own thread (reading
    answers) is not the node's, and is left out."""

    parsed: list[int] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)
    decoded: list[str] = field(default_factory=list)


@pytest.fixture
def decoding(monkeypatch: pytest.MonkeyPatch) -> Iterator[Decoding]:
    seen = Decoding()
    loads, from_buffer, from_json_data = nonfinite.loads, tensors.from_buffer, codec.from_json_data
    test_thread = threading.current_thread()

    def spy_loads(text: Any, *args: Any) -> Any:
        if threading.current_thread() is not test_thread:
            seen.parsed.append(len(text))
            seen.threads.append(threading.current_thread().name)
        return loads(text, *args)

    def spy_from_buffer(data: Any, datatype: str, shape: list[int]) -> Any:
        if threading.current_thread() is not test_thread:
            seen.decoded.append(f"binary {list(shape)}")
        return from_buffer(data, datatype, shape)

    def spy_from_json_data(name: str, data: Any, datatype: str, shape: list[int]) -> Any:
        if threading.current_thread() is not test_thread:
            seen.decoded.append(f"json {list(shape)}")
        return from_json_data(name, data, datatype, shape)

    monkeypatch.setattr(nonfinite, "loads", spy_loads)
    monkeypatch.setattr(tensors, "from_buffer", spy_from_buffer)
    monkeypatch.setattr(codec, "from_json_data", spy_from_json_data)
    yield seen


def json_job(rows: int, number: bytes, *, outputs: list[str] | None = None) -> bytes:
    """A JSON job for `wide` whose every value is `number`, written as it is (b"1": 2 bytes a value)."""
    head = {"id": "j", "parameters": {"timeout": 30_000_000}}
    if outputs is not None:
        head["outputs"] = [{"name": name} for name in outputs]
    data = b",".join([number] * (rows * WIDTH))
    entry = b'{"name":"x","datatype":"FP32","shape":[%d,%d],"data":[%s]}' % (rows, WIDTH, data)
    return orjson.dumps(head)[:-1] + b',"inputs":[' + entry + b"]}"


def binary_job(
    x: np.ndarray, *, name: str = "x", outputs: list[str] | None = None, binary_output: bool = True
) -> tuple[bytes, dict[str, str]]:
    """A job with x as binary tensor data, and the user property that says where its JSON ends."""
    encoded = codec.encode_request(
        {name: x}, outputs=outputs, binary_output=binary_output, parameters={"timeout": 30_000_000}
    )
    return encoded.body(), {codec.HEADER_LENGTH: str(encoded.header_length)}


def outputs_of(answer: Received) -> dict[str, np.ndarray]:
    length = answer.user.get(codec.HEADER_LENGTH)
    return codec.decode_response(answer.payload, int(length) if length else None)


def refusal(answer: Received, status: int, *texts: str) -> str:
    document = answer.document
    validate("job_response", document)
    assert document["status"] == status, document
    for text in texts:
        assert text in document["error"], (text, document["error"])
    return document["error"]


async def line_serves_wide(url: str) -> None:
    """The line (HTTP) is bounded by the model alone: 8 rows in JSON, answered in JSON, every output."""
    x = np.ones((8, WIDTH), np.float32)
    body = codec.encode_request({"x": x}, binary=False, binary_output=False).body()
    assert len(body) > 4 * MAX_JSON_BYTES
    async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as http:
        response = await http.post("/v2/models/wide/infer", content=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs["s"] == [float(WIDTH)] * 8 and len(outputs["y"]) == 8 * 3 * WIDTH


def node(serve: Callable[..., Any], repository: Path, broker: Broker, names: Names) -> Any:
    pool = pool_section(broker, names, max_interference_ms=0.001)  # the pool row limit is 1 row
    return serve(repository, pool=pool)


def assert_one_row_limit(running: Any) -> None:
    for model in ("wide", "echo"):
        batcher = running.service.hub.scheduler(model).batcher
        assert batcher.profile.is_seeded and batcher.pool_row_limit() == 1


@pytest.mark.asyncio
async def test_a_job_over_the_pool_row_limit_is_refused_before_it_is_parsed(
    serve: Callable[..., Any],
    repository: Path,
    broker: Broker,
    names: Names,
    recorder_factory: Any,
    decoding: Decoding,
) -> None:
    if not broker.is_v5:
        pytest.skip("binary tensors need MQTT 5 user properties")
    recorder = await recorder_factory(broker, names)
    with node(serve, repository, broker, names) as running:
        await recorder.node("birth")
        assert_one_row_limit(running)
        # 3 rows as JSON: far over the JSON a job may carry; 3 rows as binary: over what 1 row needs.
        big_json = json_job(3, b"0")
        answer = await ask(recorder, names, "infer/wide", big_json)
        refusal(answer, 413, f"at most {MAX_JSON_BYTES} bytes of JSON", "send tensor data as binary")
        body, user = binary_job(np.zeros((3, WIDTH), np.float32), outputs=["s"])
        answer = await ask(recorder, names, "infer/wide", body, user=user)
        refusal(answer, 503, "at most 1 rows")  # another node may take 3 rows: the platform moves it
        assert answer.document["retry_after_s"] == 60.0
        assert decoding.parsed == [] and decoding.decoded == []  # neither job's JSON was parsed
        # A model of strings (echo): its body is bounded by server.max_body_bytes only, and the rows it
        # declares are refused before its data is decoded (its JSON header alone is parsed).
        body, user = binary_job(np.array([b"a", b"b", b"c"], dtype=object), name="text")
        answer = await ask(recorder, names, "infer/echo", body, user=user)
        refusal(answer, 503, "pool work of 3 rows", "at most 1 rows")
        assert decoding.parsed == [int(user[codec.HEADER_LENGTH])] and decoding.decoded == []
        # One row is within the limit: served, after the same checks.
        body, user = binary_job(np.array([b"abc"], dtype=object), name="text")
        answer = await ask(recorder, names, "infer/echo", body, user=user)
        assert outputs_of(answer)["echo"].tolist() == [b"abc"]
        assert decoding.decoded == ["binary [1]"]
        scheduler = running.service.hub.scheduler("wide")
        assert scheduler.stats.requests[("pool", "success")] == 0
        await line_serves_wide(running.url)


@pytest.mark.asyncio
async def test_a_large_json_job_is_told_to_send_binary_which_is_served(
    serve: Callable[..., Any],
    repository: Path,
    broker: Broker,
    names: Names,
    recorder_factory: Any,
    decoding: Decoding,
) -> None:
    recorder = await recorder_factory(broker, names)
    with node(serve, repository, broker, names) as running:
        await recorder.node("birth")
        assert_one_row_limit(running)
        # One row of 0.25 as JSON is 80 KiB: over the JSON a job may carry, within what a row needs.
        large = json_job(1, b"0.25", outputs=["s"])
        assert MAX_JSON_BYTES < len(large) < 2 * MAX_JSON_BYTES
        answer = await ask(recorder, names, "infer/wide", large)
        error = refusal(answer, 413, f"at most {MAX_JSON_BYTES} bytes of JSON", "send tensor data as binary")
        if recorder.is_v5:  # on 3.1.1 the job carries reply_to and corr_id as well
            assert f"request JSON of {len(large)} bytes is too large" in error
        assert ("needs MQTT 5" in error) is (not recorder.is_v5)
        assert decoding.parsed == [] and decoding.decoded == []
        event = await recorder.node("evt", lambda d: d["event"] == "job_refused")
        assert event["status"] == 413 and event["model"] == "wide"
        # The same row within the bound (one digit a value: 32 KiB of JSON) is served, decoded off
        # the event loop.
        small = json_job(1, b"1", outputs=["s"])
        assert len(small) < MAX_JSON_BYTES
        answer = await ask(recorder, names, "infer/wide", small)
        np.testing.assert_array_equal(outputs_of(answer)["s"], [[float(WIDTH)]])
        assert decoding.decoded == [f"json [1, {WIDTH}]"]
        assert decoding.threads[-1] != "service"  # the thread the service's event loop runs in
        if recorder.is_v5:
            body, user = binary_job(np.full((1, WIDTH), 0.25, np.float32), outputs=["s"])
            answer = await ask(recorder, names, "infer/wide", body, user=user)
            np.testing.assert_array_equal(outputs_of(answer)["s"], [[0.25 * WIDTH]])
            assert decoding.decoded[-1] == f"binary [1, {WIDTH}]"
        scheduler = running.service.hub.scheduler("wide")
        assert scheduler.stats.requests[("pool", "success")] == (2 if recorder.is_v5 else 1)
        await line_serves_wide(running.url)


@pytest.mark.asyncio
async def test_an_answer_is_written_as_json_only_while_small_and_each_output_once(
    serve: Callable[..., Any], repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    if not broker.is_v5:
        pytest.skip("binary tensors need MQTT 5 user properties")
    recorder = await recorder_factory(broker, names)
    with node(serve, repository, broker, names) as running:
        await recorder.node("birth")
        x = np.ones((1, WIDTH), np.float32)
        assert 3 * WIDTH > MAX_JSON_OUTPUT_ELEMENTS
        body, user = binary_job(x, binary_output=False)  # y: 49152 values as JSON text
        answer = await ask(recorder, names, "infer/wide", body, user=user)
        refusal(
            answer, 413, f"{3 * WIDTH + 1} tensor elements as JSON", f"at most {MAX_JSON_OUTPUT_ELEMENTS}"
        )
        body, user = binary_job(x, binary_output=True)
        outputs = outputs_of(await ask(recorder, names, "infer/wide", body, user=user))
        np.testing.assert_array_equal(outputs["y"], np.ones((1, 3 * WIDTH), np.float32))
        # A job naming an output many times would be answered with as many copies of it.
        body, user = binary_job(x, outputs=["y", "s", "y"])
        answer = await ask(recorder, names, "infer/wide", body, user=user)
        refusal(answer, 400, "output 'y' is requested twice")
        await line_serves_wide(running.url)


@pytest.mark.asyncio
async def test_text_answered_as_json_is_bounded_by_its_bytes_not_its_elements(
    serve: Callable[..., Any],
    repository: Path,
    broker: Broker,
    names: Names,
    recorder_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One BYTES element is one element: 15 MiB of control characters in it were written as 90 MiB of
    JSON escapes on the event loop (1.5 s). Text answered as JSON is bounded by its bytes, at the
    escape's 6 bytes a character, and refused before any of it is written."""
    if not broker.is_v5:
        pytest.skip("binary tensors need MQTT 5 user properties")
    written: list[int] = []
    json_data = codec.json_data
    test_thread = threading.current_thread()

    def spy_json_data(array: np.ndarray) -> Any:
        if threading.current_thread() is not test_thread:
            written.append(array.size)
        return json_data(array)

    monkeypatch.setattr(codec, "json_data", spy_json_data)
    most = MAX_JSON_OUTPUT_TEXT_BYTES // JSON_BYTES_PER_CHARACTER  # characters: each may be an escape
    recorder = await recorder_factory(broker, names)
    with node(serve, repository, broker, names) as running:
        await recorder.node("birth")
        over = np.array([b"\x01" * (most + 1)], dtype=object)
        body, user = binary_job(over, name="text", binary_output=False)
        answer = await ask(recorder, names, "infer/echo", body, user=user)
        refusal(
            answer,
            413,
            f"the answer would carry {most + 1} bytes of text as JSON",
            f"at most {MAX_JSON_OUTPUT_TEXT_BYTES} bytes of text outputs as JSON",
            "ask for binary outputs, parameters.binary_data_output true",
        )
        assert written == []  # refused before the answer was written
        body, user = binary_job(over, name="text", binary_output=True)
        answer = await ask(recorder, names, "infer/echo", body, user=user)
        assert outputs_of(answer)["echo"].tolist() == over.tolist()
        at_most = np.array([b"\x01" * most], dtype=object)
        body, user = binary_job(at_most, name="text", binary_output=False)
        answer = await ask(recorder, names, "infer/echo", body, user=user)
        assert answer.document["outputs"][0]["data"] == ["\x01" * most]
        assert len(answer.payload) > MAX_JSON_OUTPUT_TEXT_BYTES - 1024  # escapes: 6 bytes a character
        assert written == [1]
        await line_serves_wide(running.url)


@pytest.mark.asyncio
async def test_decoding_beyond_the_nodes_budget_is_refused_until_it_refills(
    serve: Callable[..., Any],
    repository: Path,
    broker: Broker,
    names: Names,
    recorder_factory: Any,
    decoding: Decoding,
) -> None:
    """All senders together: past the CPU the node gives to decoding pool jobs, a job is refused (503,
    moved on by the platform) before anything of it is parsed. The budget's clock is the test's."""
    recorder: Recorder = await recorder_factory(broker, names)
    with node(serve, repository, broker, names) as running:
        await recorder.node("birth")
        intake = running.service.pool.jobs
        now = [0.0]
        budget = WorkBudget(0.05, 1e-9, what="decoding pool jobs", clock=lambda: now[0])
        intake.bounds = Bounds(intake.bounds.max_json_bytes, intake.bounds.max_json_output_elements, budget)
        small = json_job(1, b"1", outputs=["s"])
        answer = await ask(recorder, names, "infer/wide", small)  # within the budget; it overdraws it
        assert "outputs" in answer.document
        overdrawn_s = -budget.balance_s()
        assert overdrawn_s > 0 and budget.spent_s > 0
        parsed = len(decoding.parsed)
        for sender in ("a", "b"):  # whoever sends it
            answer = await ask(recorder, names, "infer/wide", small, sender=sender)
            refusal(answer, 503, "spent its CPU time for decoding pool jobs")
            assert answer.document["retry_after_s"] == pytest.approx(overdrawn_s / 0.05, abs=0.002)
        assert len(decoding.parsed) == parsed and budget.refused == 2
        now[0] += overdrawn_s / 0.05 + 1.0  # refilled (to its burst): the next job starts
        answer = await ask(recorder, names, "infer/wide", small)
        np.testing.assert_array_equal(outputs_of(answer)["s"], [[float(WIDTH)]])
        await line_serves_wide(running.url)


class Searches:
    """A spy in place of one of routes' compiled patterns: how many bytes each search looked at."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.spans: list[int] = []

    def search(self, text: bytes, pos: int = 0, endpos: int = sys.maxsize) -> re.Match[bytes] | None:
        self.spans.append(min(endpos, len(text)) - pos)
        return self.pattern.search(text, pos, endpos)


@pytest.mark.asyncio
async def test_a_large_job_over_mqtt_3_is_answered_after_scanning_its_ends_only(
    serve: Callable[..., Any],
    repository: Path,
    broker: Broker,
    names: Names,
    recorder_factory: Any,
    decoding: Decoding,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MQTT 3.1.1 carries the reply topic in the JSON body. In a body too large to parse for it, only
    its first and last 64 KiB are scanned, not all of it: that too held the event loop (80 ms for a
    16 MiB body of escaped quotes)."""
    searches = Searches(routes._REPLY_TO)
    monkeypatch.setattr(routes, "_REPLY_TO", searches)
    recorder = await recorder_factory(broker, names, is_v5=False)
    with serve(repository, pool=pool_section(broker, names, mqtt_version="3.1.1")) as running:
        await recorder.node("birth")
        big = json_job(8, b"0.25", outputs=["s"])  # 8 rows: as many as the model takes, 640 KiB
        assert len(big) > 8 * SCAN_BYTES
        answer = await ask(recorder, names, "infer/wide", big)  # reply_to and corr_id go last
        refusal(answer, 413, "send tensor data as binary, which needs MQTT 5")
        assert searches.spans and max(searches.spans) <= SCAN_BYTES
        assert decoding.parsed == []
        await line_serves_wide(running.url)
