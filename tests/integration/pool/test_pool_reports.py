"""A node against a real broker: birth, state and capacity, each payload checked against its schema."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import modelzoo
import pytest
from pool_brokers import Broker
from pool_recorder import Names, pool_section


@pytest.fixture
def pool_repository(pool_repository: Path) -> Path:
    """The shared repository plus a model that cannot load."""
    modelzoo.write(pool_repository, "corrupt", b"not an onnx file")
    return pool_repository


@pytest.mark.asyncio
async def test_birth_state_and_capacity(
    serve: Callable[..., Any], pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    recorder = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names)) as running:
        birth = await recorder.node("birth")
        session = birth["session"]
        assert birth["seq"] == 0 and birth["node"] == names.node and birth["site"] == names.site
        ready = birth["models"]["batchable"]
        model = running.service.hub.scheduler("batchable").model
        assert (ready["sha256"], ready["provider"], ready["precision"]) == (model.digest, "cpu", "fp32")
        assert ready["profile"]["observations"] > 0
        assert birth["models"]["corrupt"]["state"] == "UNAVAILABLE"
        assert birth["hardware"]["cores_usable"] >= 1 and birth["runtime"]["onnxruntime"]

        state = await recorder.node("state")
        assert (state["state"], state["session"]) == ("online", session)
        first = await recorder.node("capacity")
        second = await recorder.node("capacity", lambda d: d["seq"] > first["seq"])  # the periodic one
        for report in (first, second):
            assert report["session"] == session and report["valid_for_s"] == 2  # 3 x 0.5 s, rounded up
            assert report["models"]["batchable"]["spare_ips_at_slo"] > 0
        capacity_message = await recorder.expect(lambda m: m.kind == "capacity")
        if broker.is_v5:
            assert 1 <= capacity_message.expiry_s <= 2  # MQTT 5 message expiry = valid_for_s
        seqs = [m.document["seq"] for m in recorder.messages if m.kind in ("birth", "state", "capacity")]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


@pytest.mark.asyncio
async def test_a_reload_that_changes_what_is_served_is_born_again(
    serve: Callable[..., Any], pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    """Regression: the birth (the platform's list of models and their files, by which it routes and checks
    signatures) went out at connect only, so after a reload it named the old file and not a new model."""
    recorder = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names)) as running:
        birth = await recorder.node("birth")
        old = birth["models"]["batchable"]
        manifest = "[batching]\nmax_batch_size = 8\n"
        modelzoo.write(
            pool_repository, "batchable", modelzoo.batchable(scale=3.0), version=2, manifest=manifest
        )
        modelzoo.write(pool_repository, "newmodel", modelzoo.batchable(), manifest=manifest)
        running.call(lambda: running.service.control.reload({}), 120)
        # a birth goes out at each change of what is served, so one may list newmodel still LOADING or the
        # old batchable: wait for the one that lists both as the reload left them
        again = await recorder.node(
            "birth",
            lambda d: (
                d["seq"] > birth["seq"]
                and d["models"].get("newmodel", {}).get("state") == "READY"
                and d["models"]["batchable"].get("version") == "2"
            ),
        )
        served = running.service.hub.scheduler("batchable").model
        assert again["session"] == birth["session"]
        assert (again["models"]["batchable"]["version"], again["models"]["batchable"]["sha256"]) == (
            "2",
            served.digest,
        )
        assert served.digest != old["sha256"]
        await recorder.node("capacity", lambda d: d["seq"] > again["seq"] and "newmodel" in d["models"])


@pytest.mark.asyncio
async def test_retained_state_and_birth_reach_late_subscribers(
    serve: Callable[..., Any], pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    early = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names)):
        await early.node("capacity")
        late = await recorder_factory(broker, names)
        for kind in ("birth", "state", "capacity"):
            message = await late.expect(lambda m, kind=kind: m.kind == kind)
            assert message.retain, kind
        assert (await late.node("birth"))["session"] == (await late.node("state"))["session"]


@pytest.mark.asyncio
async def test_graceful_stop_publishes_draining_then_offline(
    serve: Callable[..., Any], pool_repository: Path, broker: Broker, names: Names, recorder_factory: Any
) -> None:
    recorder = await recorder_factory(broker, names)
    with serve(pool_repository, pool=pool_section(broker, names)):
        birth = await recorder.node("birth")
        mark = len(recorder.messages)
    draining = await recorder.node("state", lambda d: d["state"] == "draining", since=mark)
    offline = await recorder.node("state", lambda d: d["state"] == "offline", since=mark)
    assert draining["session"] == offline["session"] == birth["session"]
    assert draining["seq"] < offline["seq"] and "by_will" not in offline
    assert draining["reason"] == "stopping" and offline["reason"] == "stopped"
    late = await recorder_factory(broker, names)
    retained = await late.node("state")
    assert retained["state"] == "offline"
