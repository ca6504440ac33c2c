"""A request whose values ask ORT for an absurd size (ConstantOfShape of n = 2^61) is answered 413, and
the model serves every later request: ORT 1.32's memory arena keeps the size of such a failed request as
the size of its next region, and every later growth then overflows ("SafeInt Integer overflow": a 500 for
n = 3 until a reload). The engine replaces the session such a failure may have spoiled
(engine/failures.py, LoadedModel.run). Real ORT sessions on model files written in tmp_path."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import modelzoo
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tests_support import load_written

from appliance.engine.model import LoadedModel
from appliance.errors import RequestTooLarge

ABSURD = 2**61  # 2^63 bytes of FP32: the arena keeps 2^63 as its next region's size
LARGE = 3_000_000  # 12 MB: more than the arena holds after warm-up, so it must grow


def _filled(rank: int = 1) -> onnx.ModelProto:
    """n: INT64 [rank] -> y = ConstantOfShape(n), FP32 ones: the request's values are the output's shape."""
    value = helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["n"], ["y"], value=value)],
        "filled",
        [helper.make_tensor_value_info("n", TensorProto.INT64, [rank])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(rank)])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _loaded(tmp_path: Path) -> LoadedModel:
    modelzoo.write(tmp_path / "repo", "filled", _filled())
    model = load_written(tmp_path, "filled")
    model.warm_up(1)
    return model


def _n(*values: int) -> dict[str, np.ndarray]:
    return {"n": np.array(values, np.int64)}


def test_an_absurd_size_is_a_413_and_the_model_serves_every_later_request(tmp_path: Path) -> None:
    model = _loaded(tmp_path)
    with pytest.raises(RequestTooLarge, match="needs a buffer of 9223372036854775808 bytes"):
        model.run(_n(ABSURD))  # the first request to grow the arena: n = 3 needs it to grow too
    assert model.run(_n(3))["y"].shape == (3,)
    assert model.run(_n(LARGE))["y"].shape == (LARGE,)
    with pytest.raises(RequestTooLarge, match="does not fit in 64 bits"):
        model.run(_n(2**62))  # 2^64 bytes: ORT's storage size check
    assert model.run(_n(LARGE + 1))["y"].shape == (LARGE + 1,)


def test_a_run_on_a_session_another_request_spoiled_runs_again_on_a_new_one(tmp_path: Path) -> None:
    """A request running beside the absurd one may meet the spoiled arena before the session is
    replaced: its overflow is not its own, and it is answered from a new session."""
    model = _loaded(tmp_path)
    spoiled = model.session
    with pytest.raises(Exception, match="Failed to allocate memory"):
        spoiled.run(None, _n(ABSURD))  # another request's failure, not yet seen by LoadedModel.run
    with pytest.raises(Exception, match="Integer overflow"):
        spoiled.run(None, _n(LARGE))  # what ORT does to every request that needs the arena to grow
    assert model.run(_n(LARGE))["y"].shape == (LARGE,)
    assert model.session is not spoiled
    assert model.run(_n(LARGE + 1))["y"].shape == (LARGE + 1,)


def test_an_overflow_in_several_dimensions_is_a_413_and_spoils_nothing(tmp_path: Path) -> None:
    modelzoo.write(tmp_path / "repo", "cube", _filled(rank=3))
    model = load_written(tmp_path, "cube")
    for absurd in ((2**31, 2**31, 4), (2**63 - 1, 2**63 - 1, 1), (2**40, 2**40, 2**40)):
        with pytest.raises(RequestTooLarge, match="does not fit in 64 bits"):
            model.run(_n(*absurd))
        assert model.run(_n(LARGE, 1, 1))["y"].shape == (LARGE, 1, 1)


def test_the_solo_session_is_replaced_too(tmp_path: Path) -> None:
    model = _loaded(tmp_path)
    model.open_solo(2)
    solo = model.solo
    assert solo is not None
    with pytest.raises(RequestTooLarge):
        model.run(_n(ABSURD), is_solo=True)
    assert model.solo is not None and model.solo is not solo and model.solo_threads == 2
    assert model.run(_n(LARGE), is_solo=True)["y"].shape == (LARGE,)
    assert model.run(_n(LARGE))["y"].shape == (LARGE,)  # the shared session was never spoiled


def test_a_closed_model_gets_no_new_session(tmp_path: Path) -> None:
    model = _loaded(tmp_path)
    spoiled = model.session
    model.close()
    assert model._renew(spoiled, solo=False) is None
    assert model.placement.session is None


def _infer(url: str, model: str, values: list[int]) -> httpx.Response:
    body = {
        "inputs": [{"name": "n", "shape": [len(values)], "datatype": "INT64", "data": values}],
        "parameters": {"binary_data_output": True},  # megabytes of ones: not as JSON text
    }
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=60)


def _shape(answer: httpx.Response) -> list[int]:
    header = answer.content[: int(answer.headers["inference-header-content-length"])]
    return json.loads(header)["outputs"][0]["shape"]


def test_over_http_the_absurd_request_is_a_413_and_every_other_one_is_answered(serve, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    patient = "slo_p99_ms = 600000\n"  # no request expires in the queue behind the others
    modelzoo.write(repo, "filled", _filled(), manifest=patient)
    modelzoo.write(repo, "cube", _filled(rank=3), manifest=patient)
    with serve(repo, scheduler={"instances": 2}) as running:
        first = _infer(running.url, "filled", [ABSURD])  # before any request grew the arena
        assert first.status_code == 413, first.text
        assert "needs a buffer of 9223372036854775808 bytes" in first.json()["error"]
        for n in (3, LARGE, 3):
            answer = _infer(running.url, "filled", [n])
            assert answer.status_code == 200, answer.text
            assert _shape(answer) == [n]
        cube = _infer(running.url, "cube", [2**31, 2**31, 4])
        assert cube.status_code == 413 and "does not fit in 64 bits" in cube.json()["error"], cube.text

        # Absurd requests among ordinary ones, all at once: each gets one answer, its own.
        asked = [ABSURD if i % 4 == 0 else LARGE + i for i in range(24)]
        answers: list[httpx.Response | None] = [None] * len(asked)

        def send(index: int) -> None:
            answers[index] = _infer(running.url, "filled", [asked[index]])

        senders = [threading.Thread(target=send, args=(i,)) for i in range(len(asked))]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(120)
        for n, answer in zip(asked, answers, strict=True):
            assert answer is not None
            if n == ABSURD:
                assert answer.status_code == 413, answer.text
            else:
                assert answer.status_code == 200, answer.text
                assert _shape(answer) == [n]
