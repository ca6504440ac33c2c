"""Pool work in a child process (engine/replica.py): same answers, idle priority, restarts, fallback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import modelzoo
import numpy as np
import pytest
from tests_support import load_model

from appliance.engine import frames as wire
from appliance.engine.replica import ReplicaSpec
from appliance.errors import DeadlineExceeded, InferenceFailed
from appliance.scheduler.placement import PoolRules, Where
from appliance.scheduler.queues import Priority
from appliance.scheduler.runner import ModelScheduler, SchedulerConfig
from appliance.settings import Settings
from appliance.system import cpu

FAR_SLO = "slo_p99_ms = 60000\n"  # these tests are about where work runs, never about its deadline


def pool_scheduler(model, instances: int = 2, *, idle_priority: bool = False) -> ModelScheduler:
    """A scheduler whose pool work runs in a child process; at normal priority unless asked, since a
    child at idle priority gets no CPU at all while other work keeps the box's cores busy."""
    settings = Settings()
    replica = ReplicaSpec.of(
        model,
        models=settings.models,
        provider_options={},
        cache_dir=settings.system.cache_dir,
        idle_priority=idle_priority,
    )
    config = SchedulerConfig(instances=instances, pool=PoolRules(Where.PROCESS, replica))
    scheduler = ModelScheduler(model, config)
    scheduler.start()
    return scheduler


def rows(value: float, count: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.arange(count * 4, dtype=np.float32).reshape(count, 4) + value}


def test_pool_batches_run_in_a_child_and_answer_as_line_batches(tmp_path: Path) -> None:
    model = load_model(tmp_path, modelzoo.batchable(), FAR_SLO)

    async def scenario():
        scheduler = pool_scheduler(model)
        try:
            pool = await asyncio.gather(*(scheduler.infer(rows(v), priority=Priority.POOL) for v in range(8)))
            line = await asyncio.gather(*(scheduler.infer(rows(v)) for v in range(8)))
            pid = scheduler.replica.pid
            child = scheduler.replica._child.process
        finally:
            await scheduler.close()
        return pool, line, pid, child

    pool, line, pid, child = asyncio.run(scenario())
    for value, (from_pool, from_line) in enumerate(zip(pool, line, strict=True)):
        np.testing.assert_array_equal(from_pool["y"], rows(value)["x"] * 2 + 1)
        np.testing.assert_array_equal(from_pool["y"], from_line["y"])
        np.testing.assert_array_equal(from_pool["s"], from_line["s"])
    assert pid is not None and pid != os.getpid()
    assert child.returncode == 0  # it ended when the scheduler closed its sockets


def test_the_pool_child_is_at_idle_priority_and_first_for_the_oom_killer_from_its_start(
    tmp_path: Path,
) -> None:
    """Both are set by the parent as it starts the child, before the child has had any CPU (on a box
    whose cores are busy, a child at idle priority may get none for as long as that lasts)."""
    model = load_model(tmp_path, modelzoo.batchable(), FAR_SLO)

    async def scenario():
        scheduler = pool_scheduler(model, idle_priority=True)
        try:
            pid = scheduler.replica.pid
            assert pid is not None and pid != os.getpid()
            return os.sched_getscheduler(pid), int(Path(f"/proc/{pid}/oom_score_adj").read_text())
        finally:
            await scheduler.close()

    policy, oom_score_adj = asyncio.run(scenario())
    assert policy == os.SCHED_IDLE
    assert oom_score_adj == 500  # short of memory, the kernel ends pool work before the service


def test_a_pool_process_at_normal_priority_competes_as_the_service_does(tmp_path: Path) -> None:
    model = load_model(tmp_path, modelzoo.batchable(), FAR_SLO)

    async def scenario():
        scheduler = pool_scheduler(model, idle_priority=False)
        try:
            outputs = await scheduler.infer(rows(3), priority=Priority.POOL)
            pid = scheduler.replica.pid
            threads = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
            policies = {os.sched_getscheduler(t) for t in threads}
            nices = {os.getpriority(os.PRIO_PROCESS, t) for t in threads}
        finally:
            await scheduler.close()
        return outputs, policies, nices

    outputs, policies, nices = asyncio.run(scenario())
    np.testing.assert_array_equal(outputs["y"], rows(3)["x"] * 2 + 1)
    assert policies == {os.sched_getscheduler(0)}
    assert nices == {os.getpriority(os.PRIO_PROCESS, 0)}


def test_text_tensors_cross_to_the_pool_process(tmp_path: Path) -> None:
    model = load_model(tmp_path, modelzoo.strings(), FAR_SLO)

    async def scenario():
        scheduler = pool_scheduler(model, instances=1)
        try:
            text = np.array([b"bolt", "nut"], dtype=object)
            return await scheduler.infer({"text": text}, priority=Priority.POOL)
        finally:
            await scheduler.close()

    outputs = asyncio.run(scenario())
    assert [bytes(v) if isinstance(v, bytes) else v.encode() for v in outputs["echo"]] == [b"bolt", b"nut"]
    assert outputs["n"].tolist() == [2]


def test_a_killed_pool_process_is_replaced_and_every_job_gets_one_answer(tmp_path: Path) -> None:
    model = load_model(tmp_path, modelzoo.batchable(), FAR_SLO)

    async def scenario():
        scheduler = pool_scheduler(model, instances=1)
        try:
            await scheduler.infer(rows(0), priority=Priority.POOL)
            first = scheduler.replica._child.process
            first.kill()
            first.wait()
            after_idle_kill = await scheduler.infer(rows(1), priority=Priority.POOL)
            second = scheduler.replica._child.process
            second.send_signal(signal.SIGSTOP)  # holds the next batch; the kill then lands mid-run
            job = asyncio.create_task(scheduler.infer(rows(2), priority=Priority.POOL))
            while not scheduler.pool_workers[0].runs:
                await asyncio.sleep(0)
            second.kill()
            mid_run = await asyncio.gather(job, return_exceptions=True)
            last = await scheduler.infer(rows(3), priority=Priority.POOL)
            assert scheduler.replica.restarts == 2  # one per kill, whichever way the second one landed
            return first.pid, second.pid, scheduler.replica.pid, after_idle_kill, mid_run[0], last
        finally:
            await scheduler.close()

    first, second, third, after_idle_kill, mid_run, last = asyncio.run(scenario())
    np.testing.assert_array_equal(after_idle_kill["y"], rows(1)["x"] * 2 + 1)
    if isinstance(mid_run, Exception):  # the kill found the batch in the child
        assert isinstance(mid_run, InferenceFailed) and "pool process exited" in str(mid_run)
    else:  # the kill came before the worker looked: a fresh child ran it
        np.testing.assert_array_equal(mid_run["y"], rows(2)["x"] * 2 + 1)
    np.testing.assert_array_equal(last["y"], rows(3)["x"] * 2 + 1)
    assert len({first, second, third}) == 3


def test_a_hung_pool_process_is_killed_past_the_deadline_and_its_batch_answered(tmp_path: Path) -> None:
    """A child that stops answering (SIGSTOP stands in for a hang) must not keep its batch unanswered
    for ever, nor every later pool job: past the batch's deadline it is killed and started again."""
    model = load_model(tmp_path, modelzoo.batchable(), FAR_SLO)

    async def scenario():
        scheduler = pool_scheduler(model, instances=1)
        try:
            await scheduler.infer(rows(0), priority=Priority.POOL)
            hung = scheduler.replica._child.process
            hung.send_signal(signal.SIGSTOP)
            stuck = await asyncio.gather(
                scheduler.infer(rows(1), priority=Priority.POOL, timeout_s=0.2), return_exceptions=True
            )
            line = await scheduler.infer(rows(2))
            after = await scheduler.infer(rows(3), priority=Priority.POOL)
            assert await scheduler.drain(60.0) and scheduler.inflight == 0
            return hung, stuck[0], line, after, scheduler.replica
        finally:
            await scheduler.close()

    hung, stuck, line, after, replica = asyncio.run(scenario())
    assert isinstance(stuck, DeadlineExceeded) and "did not answer" in str(stuck), stuck
    assert hung.poll() is not None  # killed, not left stopped
    np.testing.assert_array_equal(line["y"], rows(2)["x"] * 2 + 1)
    np.testing.assert_array_equal(after["y"], rows(3)["x"] * 2 + 1)
    assert replica.restarts == 1


def test_a_pool_process_hung_while_loading_fails_batches_then_is_given_up(tmp_path, monkeypatch) -> None:
    """A child that never says it is ready (stopped before it could load) must not hold a pool batch
    past its deadline, and is given up once loading has taken longer than the limit."""
    from appliance.engine import replica as replicas

    model = load_model(tmp_path, modelzoo.batchable(), FAR_SLO)

    async def scenario():
        scheduler = pool_scheduler(model, instances=1)
        hung = scheduler.replica._child.process
        hung.send_signal(signal.SIGSTOP)  # at once: the interpreter has not even imported numpy yet
        try:
            loading = await asyncio.gather(
                scheduler.infer(rows(1), priority=Priority.POOL, timeout_s=0.2), return_exceptions=True
            )
            line = await scheduler.infer(rows(2))
            monkeypatch.setattr(replicas, "LOAD_LIMIT_S", 0.0)
            given_up = await asyncio.gather(
                scheduler.infer(rows(3), priority=Priority.POOL, timeout_s=0.2), return_exceptions=True
            )
            after = await scheduler.infer(rows(4), priority=Priority.POOL)
            assert await scheduler.drain(60.0) and scheduler.inflight == 0
            return hung, loading[0], line, given_up[0], after, scheduler.replica
        finally:
            await scheduler.close()

    hung, loading, line, given_up, after, replica = asyncio.run(scenario())
    assert isinstance(loading, DeadlineExceeded) and "still loading" in str(loading), loading
    np.testing.assert_array_equal(line["y"], rows(2)["x"] * 2 + 1)
    assert not isinstance(given_up, DeadlineExceeded) or "still loading" not in str(given_up), given_up
    np.testing.assert_array_equal(after["y"], rows(4)["x"] * 2 + 1)  # in-process now
    assert replica.failure is not None and "not ready" in replica.failure
    assert hung.poll() is not None  # killed, not left stopped
    assert replica.pid is None


def test_a_child_that_cannot_open_the_model_leaves_pool_work_in_process(tmp_path: Path) -> None:
    model = load_model(tmp_path, modelzoo.batchable(), FAR_SLO)
    model.source.path.write_bytes(modelzoo.batchable().SerializeToString() + b"\x00")  # not what was served

    async def scenario():
        scheduler = pool_scheduler(model, instances=1)
        try:
            outputs = await scheduler.infer(rows(5), priority=Priority.POOL)
            again = await scheduler.infer(rows(6), priority=Priority.POOL)
            return outputs, again, scheduler.replica.failure, scheduler.replica.pid
        finally:
            await scheduler.close()

    outputs, again, failure, pid = asyncio.run(scenario())
    np.testing.assert_array_equal(outputs["y"], rows(5)["x"] * 2 + 1)
    np.testing.assert_array_equal(again["y"], rows(6)["x"] * 2 + 1)
    assert failure is not None and "changed since the service loaded it" in failure
    assert pid is None


@pytest.mark.parametrize(
    "arrays",
    [
        [np.zeros((0, 4), np.float32)],
        [np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]],  # non-native order, not contiguous
        [np.array(7.5), np.array([[b"a", b""]], dtype=object), np.ones((2, 3), np.float16)],
    ],
)
def test_frames_carry_tensors_as_they_are(arrays) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        wire.send_message(ours, {"inputs": ["a", "b", "c"][: len(arrays)]}, arrays)
        header, received = wire.receive_message(theirs)
    assert header == {"inputs": ["a", "b", "c"][: len(arrays)]}
    for sent, got in zip(arrays, received, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        np.testing.assert_array_equal(got, sent)


def test_a_closed_socket_reads_as_end_of_stream() -> None:
    ours, theirs = socket.socketpair()
    with theirs:
        ours.sendall(b"\x10\x00")  # half a length
        ours.close()
        with pytest.raises(EOFError):
            wire.receive_message(theirs)


def test_the_cpu_budget_counts_the_pool_processes() -> None:
    # Compare samples of one kind only: a test run has other children (brokers) that a scan finds too.
    before = cpu.sample().own_cpu_s
    before_named = cpu.sample([]).own_cpu_s
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    script = burn + "print('burnt', flush=True)\ninput()\n"
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "burnt\n"
        alive = cpu.sample().own_cpu_s
        named = cpu.sample([child.pid]).own_cpu_s  # as the service asks: its pool processes by pid
        unnamed = cpu.sample([]).own_cpu_s
    finally:
        child.communicate("\n")
    reaped = cpu.sample().own_cpu_s
    assert alive - before >= 0.3  # a running child counts when found...
    assert named - before_named >= 0.3 > unnamed - before_named  # ...or named, and only then
    assert reaped >= alive  # ...and still counts once it has ended
    assert cpu.sample([child.pid]).own_cpu_s >= named  # its pid gone: counted once, as reaped
