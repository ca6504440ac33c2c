"""A request whose values ask ORT for an absurd size (ConstantOfShape of n = 2^61) is answered 413, and
the model serves every later request: ORT 1.32's memory arena keeps the size of such a failed request as
the size of its next region, and every later growth then overflows ("SafeInt Integer overflow": a 500 for
n = 3 until a reload). The engine resets the arena such a failure may have spoiled with a run that shrinks it,
and renews the session only where that cannot help, at most once a minute (engine/arena.py): absurd requests
cost the box about what they cost themselves. Real ORT sessions on model files written in tmp_path.

A session on the process's bounded arena (models.run_memory_bytes set: engine/memory.py) is never
spoiled so; these sessions have arenas of their own (run_memory_bytes "off"), as a device's arena does
(tests/integration/test_run_memory_bound.py has the bounded one). The last test serves the default."""

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
from tests_support import FakeClock, load_written

from appliance.dataplane.outcomes import outcome_of
from appliance.engine import arena
from appliance.engine.arena import RENEWAL_INTERVAL_S, Tries
from appliance.engine.model import LoadedModel
from appliance.errors import Overloaded, RequestTooLarge
from appliance.settings import ModelSettings

ABSURD = 2**61  # 2^63 bytes of FP32: the arena keeps 2^63 as its next region's size
DOUBLED = 2**61 + 1  # the arena overflows doubling its next region's size past 2^63: it keeps 2^63
OVER_MEMORY = 2**40  # 4 TB: the arena keeps it, and its next growth would reserve all of memory
LARGE = 3_000_000  # 12 MB: more than the arena holds after warm-up, so it must grow
OWN_ARENA = ModelSettings(run_memory_bytes="off")  # an arena a failure can spoil, as a device's


def _filled(rank: int | str = 1) -> onnx.ModelProto:
    """n: INT64 [rank] -> y = ConstantOfShape(n), FP32 ones: the request's values are the output's shape.
    A `rank` named leaves it to the request (the arena's reset runs zeros of every open dimension 1)."""
    value = helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0])
    dims = [f"d{i}" for i in range(rank if isinstance(rank, int) else 1)]
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["n"], ["y"], value=value)],
        "filled",
        [helper.make_tensor_value_info("n", TensorProto.INT64, [rank])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _loaded(tmp_path: Path, rank: int | str = 1) -> LoadedModel:
    modelzoo.write(tmp_path / "repo", "filled", _filled(rank))
    model = load_written(tmp_path, "filled", OWN_ARENA)
    model.warm_up(1)
    model.arena.clock = FakeClock()  # a renewal a minute: the minute never passes unless a test says so
    return model


def _n(*values: int) -> dict[str, np.ndarray]:
    return {"n": np.array(values, np.int64)}


def _renewals(caplog: pytest.LogCaptureFixture) -> int:
    """Sessions opened again, as the engine logs each."""
    return sum("session was replaced" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("rank", [1, "k"], ids=["fixed", "open"])
def test_an_absurd_size_is_a_413_and_the_model_serves_every_later_request(tmp_path: Path, rank) -> None:
    model = _loaded(tmp_path, rank)
    with pytest.raises(RequestTooLarge, match="needs a buffer of 9223372036854775808 bytes"):
        model.run(_n(ABSURD))  # the first request to grow the arena: n = 3 needs it to grow too
    assert model.run(_n(3))["y"].shape == (3,)
    assert model.run(_n(LARGE))["y"].shape == (LARGE,)
    with pytest.raises(RequestTooLarge, match="does not fit in 64 bits"):
        model.run(_n(2**62))  # 2^64 bytes: ORT's storage size check
    assert model.run(_n(LARGE + 1))["y"].shape == (LARGE + 1,)
    assert model.arena.resets == 1 and model.arena.renewals == 0  # the storage check spoils nothing


def test_a_run_on_a_session_another_request_spoiled_runs_again_after_a_reset(tmp_path: Path) -> None:
    """A request running beside the absurd one may meet the spoiled arena before it is reset: its
    overflow is not its own, and it is answered from the same session once the arena is reset."""
    model = _loaded(tmp_path)
    spoiled = model.session
    with pytest.raises(Exception, match="Failed to allocate memory"):
        spoiled.run(None, _n(ABSURD))  # another request's failure, not yet seen by LoadedModel.run
    with pytest.raises(Exception, match="Integer overflow"):
        spoiled.run(None, _n(LARGE))  # what ORT does to every request that needs the arena to grow
    assert model.run(_n(LARGE))["y"].shape == (LARGE,)
    assert model.session is spoiled and (model.arena.resets, model.arena.renewals) == (1, 0)
    assert model.run(_n(LARGE + 1))["y"].shape == (LARGE + 1,)


def _filled_beside_a_conv() -> onnx.ModelProto:
    """`_filled`, with an image through a 3x3 Conv beside it: the reset's zeros (every open dimension 1)
    make the Conv fail ("Invalid input shape"), after the run began, so the arena still shrinks."""
    value = helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0])
    weights = onnx.numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["n"], ["y"], value=value),
            helper.make_node("Conv", ["image", "w"], ["z"], kernel_shape=[3, 3]),
        ],
        "filled_conv",
        [
            helper.make_tensor_value_info("n", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "h", "w"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k"]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1, "h2", "w2"]),
        ],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_a_reset_a_kernel_fails_on_still_mends_the_arena(tmp_path: Path, caplog) -> None:
    """Review finding: a reset run refused by a kernel (INVALID_ARGUMENT, but the run had begun) was
    taken for no reset, and every spoiled arena of such a model (a Conv over open sizes: most vision
    models) went the renewal's way, with 413s and 503s for ordinary requests meanwhile."""
    modelzoo.write(tmp_path / "repo", "filled_conv", _filled_beside_a_conv())
    model = load_written(tmp_path, "filled_conv", OWN_ARENA)
    model.arena.clock = FakeClock()

    def ordinary(n: int) -> dict[str, np.ndarray]:
        return {"n": np.array([n], np.int64), "image": np.zeros((1, 1, 8, 8), np.float32)}

    with pytest.raises(RequestTooLarge):
        model.run(ordinary(ABSURD))
    for i in range(3):  # another request's absurd run spoils the arena just before each ordinary one
        with pytest.raises(Exception, match=r"Failed to allocate memory|Integer overflow"):
            model.session.run(None, ordinary(ABSURD))
        assert model.run(ordinary(LARGE + i))["y"].shape == (LARGE + i,)
    assert model.arena.resets >= 2 and (model.arena.renewals, _renewals(caplog)) == (0, 0)


def test_many_absurd_requests_renew_no_session_and_every_ordinary_one_runs(tmp_path: Path, caplog) -> None:
    """What a client repeating absurd requests costs the box: one reset (a run of zeros) each, never a
    model load; the ordinary requests between them and after them all run."""
    model = _loaded(tmp_path)
    for i in range(60):
        with pytest.raises(RequestTooLarge):
            model.run(_n((ABSURD, OVER_MEMORY)[i % 2]))
        assert model.run(_n(LARGE + i))["y"].shape == (LARGE + i,)
    assert _renewals(caplog) == 0
    assert (model.arena.resets, model.arena.renewals) == (60, 0)
    for n in (3, LARGE, 30_000_000, 3):
        assert model.run(_n(n))["y"].shape == (n,)


def test_overflows_of_the_requests_own_renew_at_most_one_session_a_minute(tmp_path: Path, caplog) -> None:
    """An overflow may be the request's own or what an arena another request spoiled answers: the run
    goes again after a reset, and where it overflows again only a new session could tell. That costs a
    model load, so it happens once a minute at most, whatever a client sends."""
    model = _loaded(tmp_path)
    clock = model.arena.clock
    for i in range(40):
        with pytest.raises(RequestTooLarge):
            model.run(_n(DOUBLED))
        assert model.run(_n(LARGE + i))["y"].shape == (LARGE + i,)
    assert _renewals(caplog) == model.arena.renewals == 1
    clock.now += RENEWAL_INTERVAL_S
    for _ in range(40):
        with pytest.raises(RequestTooLarge):
            model.run(_n(DOUBLED))
    assert _renewals(caplog) == model.arena.renewals == 2
    for n in (3, LARGE, 30_000_000, 3):
        assert model.run(_n(n))["y"].shape == (n,)


def test_a_session_no_reset_can_mend_is_renewed_once_a_minute_and_meanwhile_is_a_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ORT has no arena of the session to shrink (a provider's own allocator), the session is
    renewed, at most once a minute; meanwhile a run that meets its spoiled arena is told to come back."""
    monkeypatch.setattr(arena, "shrink_lists", lambda session: ("gpu:0",))  # ORT: no arena there
    model = _loaded(tmp_path)
    clock = model.arena.clock
    first = model.session
    with pytest.raises(RequestTooLarge):
        model.run(_n(ABSURD))
    assert model.session is not first and model.arena.renewals == 1
    with pytest.raises(RequestTooLarge):
        model.run(_n(ABSURD))  # the new session spoiled too, a minute before the next renewal
    for i in range(20):
        with pytest.raises(Overloaded) as refused:
            model.run(_n((LARGE, ABSURD)[i % 2]))  # both meet the spoiled arena (its doubling overflows)
        assert outcome_of(refused.value).http_status == 503
        assert refused.value.retry_after_s == RENEWAL_INTERVAL_S
    assert model.run(_n(0))["y"].shape == (0,)  # runs that need no more memory still run
    assert model.arena.renewals == 1 and model.arena.resets == 0
    clock.now += RENEWAL_INTERVAL_S
    assert model.run(_n(LARGE))["y"].shape == (LARGE,)  # renewed, then run again on the new session
    assert model.arena.renewals == 2
    assert model.run(_n(30_000_000))["y"].shape == (30_000_000,)


def test_absurd_requests_beside_ordinary_ones_each_get_their_own_answer(tmp_path: Path, caplog) -> None:
    """Threads on one session: the absurd requests are 413s, no session is renewed more than the minute
    allows, and once they stop every size runs."""
    model = _loaded(tmp_path)
    answers: list[tuple[str, str]] = []

    def send(kind: str, sizes: list[int]) -> None:
        for n in sizes:
            try:
                shape = model.run(_n(n))["y"].shape
                answers.append((kind, "ok" if shape == (n,) else f"shape {shape}"))
            except Exception as exc:  # noqa: BLE001 - what each request got is the point
                answers.append((kind, type(exc).__name__))

    senders = [
        threading.Thread(target=send, args=("absurd", [(ABSURD, DOUBLED, OVER_MEMORY)[i % 3]] * 30))
        for i in range(3)
    ] + [threading.Thread(target=send, args=("ordinary", [LARGE + i] * 30)) for i in range(3)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(120)
    assert len(answers) == 180
    assert {answer for kind, answer in answers if kind == "absurd"} == {"RequestTooLarge"}
    # an ordinary run that met arenas spoiled again and again, a reset after each, may yet be a 413
    assert {answer for kind, answer in answers if kind == "ordinary"} <= {"ok", "RequestTooLarge"}
    assert _renewals(caplog) <= 1
    for n in (3, LARGE, 30_000_000, 3):
        assert model.run(_n(n))["y"].shape == (n,)


def test_an_overflow_in_several_dimensions_is_a_413_and_spoils_nothing(tmp_path: Path) -> None:
    modelzoo.write(tmp_path / "repo", "cube", _filled(rank=3))
    model = load_written(tmp_path, "cube", OWN_ARENA)
    for absurd in ((2**31, 2**31, 4), (2**63 - 1, 2**63 - 1, 1), (2**40, 2**40, 2**40)):
        with pytest.raises(RequestTooLarge, match="does not fit in 64 bits"):
            model.run(_n(*absurd))
        assert model.run(_n(LARGE, 1, 1))["y"].shape == (LARGE, 1, 1)


def test_the_solo_session_is_reset_too(tmp_path: Path) -> None:
    model = _loaded(tmp_path)
    model.open_solo(2)
    solo = model.solo
    assert solo is not None
    with pytest.raises(RequestTooLarge):
        model.run(_n(ABSURD), is_solo=True)
    assert model.solo is solo and model.arena.resets == 1 and model.arena.renewals == 0
    assert model.run(_n(LARGE), is_solo=True)["y"].shape == (LARGE,)
    assert model.run(_n(LARGE))["y"].shape == (LARGE,)  # the shared session was never spoiled


def test_a_closed_model_gets_no_new_session(tmp_path: Path) -> None:
    model = _loaded(tmp_path)
    spoiled = model.session
    with pytest.raises(Exception, match="Failed to allocate memory") as failed:
        spoiled.run(None, _n(ABSURD))
    model.close()
    assert model.arena.recover(model, spoiled, failed.value, solo=False, tries=Tries(failed=1)) is None
    assert model.placement.session is None and model.arena.renewals == 0


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
