"""A model whose load hangs is UNAVAILABLE after models.load_timeout_s; the others load, serve and exit.

The hang is a real one where it matters (a 323-byte graph that loops 10^12 times, in a subprocess: its
thread spins until the process ends) and a held warm-up elsewhere, released by the test, so that what
the abandoned load finishes with can be seen discarded. Deadlines are short only for the model that
hangs (set per model from load_all's before_each); nothing here asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import modelzoo
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.engine.model import LoadedModel
from appliance.engine.repository import Repository
from appliance.errors import ModelLoadError
from appliance.providers.registry import Registry
from appliance.scheduler.hub import ModelHub, State
from appliance.scheduler.loading import stuck_loads

WAIT_S = 60.0  # how long a failing test waits for what a passing one gets at once


@dataclass
class Hang:
    """The warm-up of one model, held until `release` (or WAIT_S)."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    models: list[LoadedModel] = field(default_factory=list)


@contextmanager
def hung_warm_up(monkeypatch: pytest.MonkeyPatch, name: str) -> Iterator[Hang]:
    hang = Hang()
    original = LoadedModel.warm_up

    def warm_up(model: LoadedModel, runs: int) -> list[tuple[int, float]]:
        if model.name == name:
            hang.models.append(model)
            hang.entered.set()
            hang.release.wait(WAIT_S)
        return original(model, runs)

    monkeypatch.setattr(LoadedModel, "warm_up", warm_up)
    try:
        yield hang
    finally:
        hang.release.set()


async def loading_ends(hub: ModelHub, name: str) -> None:
    """Until the thread of the abandoned load of `name` has returned."""
    thread = hub.loads.abandoned[name]
    await asyncio.to_thread(thread.join, WAIT_S)
    assert not thread.is_alive()


def test_a_load_past_its_deadline_is_unavailable_and_the_next_model_loads(
    tmp_path: Path, settings_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "a_hang", modelzoo.batchable())
    modelzoo.write(repo, "b_good", modelzoo.batchable())
    hub = ModelHub(settings_factory(repo), Registry.discover(), Repository(repo))

    def deadline(name: str) -> None:
        hub.load_timeout_s = 0.1 if name == "a_hang" else WAIT_S

    async def scenario(hang: Hang) -> None:
        await asyncio.wait_for(hub.load_all(before_each=deadline), WAIT_S)
        assert await asyncio.to_thread(hang.entered.wait, WAIT_S)
        states = {entry.name: (entry.state, entry.reason) for entry in hub}
        assert states == {
            "a_hang": (State.UNAVAILABLE, "model 'a_hang' did not load in 0.1 s (models.load_timeout_s)"),
            "b_good": (State.READY, ""),
        }
        answer = await hub.scheduler("b_good").infer({"x": np.ones((2, 4), np.float32)})
        assert answer["y"].shape == (2, 4)
        assert stuck_loads() == ["a_hang"]
        hang.release.set()  # the load finishes after all: what it made is closed, never served
        await loading_ends(hub, "a_hang")
        (late,) = hang.models
        assert late.placement.session is None and late.solo is None
        assert hub.entry("a_hang").state is State.UNAVAILABLE and stuck_loads() == []
        await hub.close()

    with hung_warm_up(monkeypatch, "a_hang") as hang:
        asyncio.run(scenario(hang))


def test_a_reload_past_its_deadline_keeps_the_serving_version(
    tmp_path: Path, settings_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "m", modelzoo.batchable())
    hub = ModelHub(settings_factory(repo), Registry.discover(), Repository(repo))

    async def scenario() -> None:
        await hub.load_all()
        serving = hub.scheduler("m")
        with hung_warm_up(monkeypatch, "m") as hang:
            hub.load_timeout_s = 0.1
            with pytest.raises(
                ModelLoadError, match=r"^model 'm' did not load in 0.1 s \(models.load_timeout_s\)$"
            ):
                await asyncio.wait_for(hub.load("m"), WAIT_S)
            assert hub.scheduler("m") is serving and hub.entry("m").state is State.READY
            answer = await serving.infer({"x": np.ones((1, 4), np.float32)})
            assert answer["y"].tolist() == [[3.0] * 4]
            # One stuck thread per model at most: a thread cannot be stopped, so none is added beside it.
            with pytest.raises(
                ModelLoadError, match=r"its last load passed the 0.1 s deadline and is still running"
            ):
                await hub.load("m")
            assert hub.scheduler("m") is serving
            hang.release.set()
            await loading_ends(hub, "m")
            hub.load_timeout_s = WAIT_S
            entry = await hub.load("m")  # once the old thread has ended, a reload goes ahead
        assert entry.state is State.READY and hub.scheduler("m") is not serving
        assert len(hang.models) == 2 and hang.models[0].placement.session is None
        await hub.close()

    asyncio.run(scenario())


def test_a_load_that_fails_in_time_is_that_failure_alone(
    tmp_path: Path, settings_factory, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "corrupt", b"not a model")
    hub = ModelHub(settings_factory(repo), Registry.discover(), Repository(repo))
    asyncio.run(hub.load_all())
    entry = hub.entry("corrupt")
    assert entry.state is State.UNAVAILABLE and "INVALID_PROTOBUF" in entry.reason
    assert "abandoned" not in caplog.text and "did not load" not in caplog.text
    assert "corrupt" not in hub.loads.abandoned and stuck_loads() == []


def spinning() -> onnx.ModelProto:
    """323 bytes: y = x, and a Loop of 10^12 iterations beside it that every run goes through."""
    scalar = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            scalar("i", TensorProto.INT64, []),
            scalar("c_in", TensorProto.BOOL, []),
            scalar("v_in", TensorProto.FLOAT, []),
        ],
        [scalar("c_out", TensorProto.BOOL, []), scalar("v_out", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    constants = [
        numpy_helper.from_array(np.array(10**12, np.int64), "count"),
        numpy_helper.from_array(np.array(True), "always"),
        numpy_helper.from_array(np.array(0.0, np.float32), "start"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["count", "always", "start"], ["v"], body=body),
            helper.make_node("Identity", ["x"], ["y"]),
        ],
        "spinning",
        [scalar("x", TensorProto.FLOAT, ["N", 4])],
        [scalar("y", TensorProto.FLOAT, ["N", 4]), scalar("v", TensorProto.FLOAT, [])],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


SERVE_AND_EXIT = """
import asyncio, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from services import make_settings
from appliance.engine.repository import Repository
from appliance.providers.registry import Registry
from appliance.scheduler.hub import ModelHub
from appliance.scheduler.loading import exit_if_loads_stuck

repo, tmp = Path({repo!r}), Path({tmp!r})
hub = ModelHub(make_settings(tmp, repo), Registry.discover(), Repository(repo))

def deadline(name):
    hub.load_timeout_s = 1.0 if name == "a_spin" else 600.0

async def main():
    await hub.load_all(before_each=deadline)
    print(", ".join(f"{{e.name}}={{e.state.value}}" for e in hub), flush=True)
    await hub.close()

asyncio.run(main())
if {explicit!r}:
    exit_if_loads_stuck(0)  # what the service does once it has stopped
"""


@pytest.mark.parametrize(("explicit", "status"), [(True, 0), (False, 1)])
def test_a_load_that_never_ends_holds_neither_the_other_models_nor_the_exit(
    tmp_path: Path, explicit: bool, status: int
) -> None:
    """The loop runs inside ONNX Runtime, where no thread can be stopped. Before the deadline every
    later model stayed LOADING for good; a thread of the default executor would then have held
    asyncio.run's exit, and a daemon thread dies with the process's teardown (SIGABRT) unless the
    process ends without one: explicitly with the service's status, else from an exit hook with 1."""
    repo = tmp_path / "repo"
    modelzoo.write(repo, "a_spin", spinning())
    modelzoo.write(repo, "b_good", modelzoo.batchable())
    tests = str(Path(__file__).parents[1])
    script = SERVE_AND_EXIT.format(tests=tests, repo=str(repo), tmp=str(tmp_path), explicit=explicit)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT_S * 2, check=False
    )
    assert done.returncode == status, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["a_spin=UNAVAILABLE, b_good=READY"]
    assert "model a_spin did not load in 1 s (models.load_timeout_s)" in done.stderr
    assert "exiting with the load of ['a_spin'] still stuck: skipping ONNX Runtime's teardown" in done.stderr
    assert "terminate called" not in done.stderr
