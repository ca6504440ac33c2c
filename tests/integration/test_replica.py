"""Pool work in a child process (engine/replica.py): same answers, idle priority, restarts, fallback."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import modelzoo
import numpy as np
import onnx
import pytest
from external_weights import external_model, set_weights
from tests_support import load_model

from appliance import errors
from appliance.engine import frames as wire
from appliance.engine.replica import Replica, ReplicaSpec, error_header, raised_error
from appliance.errors import DeadlineExceeded, DeadlineUnmet, InferenceFailed
from appliance.scheduler.placement import PoolRules, Where
from appliance.scheduler.queues import Priority
from appliance.scheduler.runner import ModelScheduler, SchedulerConfig
from appliance.settings import ModelSettings, Settings
from appliance.system import cpu

FAR_SLO = "slo_p99_ms = 60000\n"  # these tests are about where work runs, never about its deadline
WAIT_S = 60.0  # how long a failing test waits for what a passing one gets at once


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


async def stop(child: subprocess.Popen[bytes]) -> None:
    """SIGSTOP the pool process and return once the kernel says it has stopped: every thread of it.

    kill() only marks a stop pending; each thread stops when it next passes through the kernel. On a
    busy box the child's channel thread, woken by a batch, can be scheduled before the thread the
    signal went to and answer that batch after kill() has returned. The parent is told once the whole
    group has stopped (waitid WSTOPPED); WNOWAIT leaves that report, and any exit, to the Popen.
    """
    child.send_signal(signal.SIGSTOP)
    options = os.WSTOPPED | os.WEXITED | os.WNOWAIT
    info = await asyncio.wait_for(asyncio.to_thread(os.waitid, os.P_PID, child.pid, options), WAIT_S)
    assert info is not None and info.si_code == os.CLD_STOPPED, f"{child.pid} did not stop: {info}"


def was_not_run(outcome: object) -> bool:
    """Refused or expired before a worker ran it: it never reached the pool process."""
    return isinstance(outcome, DeadlineUnmet) or (
        isinstance(outcome, DeadlineExceeded) and "it was not run" in str(outcome)
    )


async def short_pool_batch(scheduler: ModelScheduler, value: float, timeout_s: float = 0.2) -> object:
    """The outcome (outputs or error) of the first pool batch with a `timeout_s` deadline that a worker
    ran. On a busy box the event loop and the pool worker can take longer than that deadline to
    get to a request, which then expires unrun, never reaching the pool process: it is sent again.
    WAIT_S only bounds a run in which none ever gets there."""
    deadline_s = time.monotonic() + WAIT_S
    while True:
        [outcome] = await asyncio.gather(
            scheduler.infer(rows(value), priority=Priority.POOL, timeout_s=timeout_s), return_exceptions=True
        )
        if not was_not_run(outcome):
            return outcome
        assert time.monotonic() < deadline_s, f"no pool batch was run in {WAIT_S} s; the last: {outcome}"


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


def test_a_pool_batch_in_the_child_that_line_work_ran_beside_stays_out_of_the_profile(
    tmp_path: Path, batches
) -> None:
    """The child times its run by the wall clock: a line batch during its life stretches it as it does
    a pool thread's (scheduler/activity.py), even one that ended before the pool batch was answered."""
    model = load_model(tmp_path, modelzoo.batchable(), FAR_SLO)

    async def scenario() -> tuple[list[int], list[int]]:
        scheduler = pool_scheduler(model, instances=1)
        seen: list[int] = []  # the rows of each batch the profile is told of
        observe = scheduler.profile.observe

        def noting(count: int, seconds: float, now_s: float = 0.0) -> None:
            seen.append(count)
            observe(count, seconds, now_s)

        scheduler.profile.observe = noting
        try:
            await scheduler.infer(rows(0, 3), priority=Priority.POOL)  # alone: observed as any batch
            alone, seen[:] = list(seen), []
            with batches.holding(lambda batch: batch.in_pool_process):
                pool = asyncio.create_task(scheduler.infer(rows(1, 3), priority=Priority.POOL))
                await batches.held_async()
                await scheduler.infer(rows(2, 1))  # a line batch starts and ends during the pool batch
            await pool
            return alone, seen
        finally:
            await scheduler.close()

    alone, beside = asyncio.run(scenario())
    assert alone == [3]
    assert beside == [1]  # the line batch; never the 3-row pool batch it stretched


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


def sized() -> onnx.ModelProto:
    """y: as many zeros as n says; the buffer ORT allocates for it is the request's to choose."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("ConstantOfShape", ["n"], ["y"])],
        "sized",
        [onnx.helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["K"])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def virtual_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize for {pid}")


def test_memory_failures_in_the_pool_process_are_answered_as_in_process(tmp_path: Path) -> None:
    """A run that could not get its memory is a 503 with Retry-After (Overloaded) in-process, and a
    request that needs more than all of the machine's memory a 413 (RequestTooLarge): from the pool
    process too, not a 500 (InferenceFailed) the platform would take as the node's failure."""
    model = load_model(tmp_path, sized(), FAR_SLO)

    async def scenario():
        scheduler = pool_scheduler(model, instances=1)
        try:
            empty = await scheduler.infer({"n": np.array([0], np.int64)}, priority=Priority.POOL)
            child = scheduler.replica._child.process
            [never] = await asyncio.gather(  # 4 PiB of FP32 zeros (2^63 bytes would break ORT's arena)
                scheduler.infer({"n": np.array([2**50], np.int64)}, priority=Priority.POOL),
                return_exceptions=True,
            )
            # The child may take 256 MiB more address space: 1 GiB it cannot get now.
            limit = virtual_bytes(child.pid) + (256 << 20)
            resource.prlimit(child.pid, resource.RLIMIT_AS, (limit, limit))
            [short] = await asyncio.gather(
                scheduler.infer({"n": np.array([1 << 28], np.int64)}, priority=Priority.POOL),
                return_exceptions=True,
            )
            again = await scheduler.infer({"n": np.array([3], np.int64)}, priority=Priority.POOL)
            return empty, never, short, again, child, scheduler.replica
        finally:
            await scheduler.close()

    empty, never, short, again, child, replica = asyncio.run(scenario())
    assert empty["y"].shape == (0,)
    assert type(never) is errors.RequestTooLarge, never
    assert f"needs a buffer of {2**52} bytes, more than all of this machine's memory" in str(never)
    assert type(short) is errors.Overloaded, short
    assert "could not get the memory to run this request now" in str(short) and short.retry_after_s > 0
    np.testing.assert_array_equal(again["y"], np.zeros(3, np.float32))  # the same child serves on
    assert replica.restarts == 0 and replica.ran[child.pid] == 2  # it counts batches answered with outputs


@pytest.mark.parametrize(
    "error",
    [
        errors.InvalidInput("bad"),
        errors.RequestTooLarge("too large"),
        errors.InferenceFailed("failed"),
        errors.Overloaded("no memory now", retry_after_s=2.5),
    ],
)
def test_the_pool_processes_errors_cross_as_themselves(error: errors.ApplianceError) -> None:
    crossed = raised_error(error_header(error))
    assert type(crossed) is type(error) and str(crossed) == str(error)
    assert getattr(crossed, "retry_after_s", None) == getattr(error, "retry_after_s", None)


def test_an_error_the_parent_does_not_know_crosses_as_its_nearest_base() -> None:
    crossed = raised_error(error_header(errors.QueueFull("full", retry_after_s=4.0)))
    assert type(crossed) is errors.Overloaded and crossed.retry_after_s == 4.0
    assert type(raised_error(error_header(errors.ModelLoadError("gone")))) is errors.InferenceFailed
    assert type(raised_error({"error": "SystemExit", "message": "x"})) is errors.InferenceFailed


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
            await stop(second)  # holds the next batch; the kill then lands mid-run
            job = asyncio.create_task(scheduler.infer(rows(2), priority=Priority.POOL))
            while not scheduler.pool_workers[0].runs:
                await asyncio.sleep(0)
            second.kill()
            mid_run = await asyncio.gather(job, return_exceptions=True)
            last = await scheduler.infer(rows(3), priority=Priority.POOL)
            assert scheduler.replica.restarts == 2  # one per kill, whichever way the second one landed
            ran = dict(scheduler.replica.ran)
            return first.pid, second.pid, scheduler.replica.pid, after_idle_kill, mid_run[0], last, ran
        finally:
            await scheduler.close()

    first, second, third, after_idle_kill, mid_run, last, ran = asyncio.run(scenario())
    assert ran[second] == 1, ran  # stopped, it answered no batch after the one before its stop
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
            await stop(hung)
            stuck = await short_pool_batch(scheduler, 1)
            line = await scheduler.infer(rows(2))
            after = await scheduler.infer(rows(3), priority=Priority.POOL)
            assert await scheduler.drain(60.0) and scheduler.inflight == 0
            return hung, stuck, line, after, scheduler.replica
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
        try:
            await stop(hung)  # at once: the interpreter has not even imported numpy yet
            loading = await short_pool_batch(scheduler, 1)
            line = await scheduler.infer(rows(2))
            monkeypatch.setattr(replicas, "LOAD_LIMIT_S", 0.0)
            given_up = await short_pool_batch(scheduler, 3)
            after = await scheduler.infer(rows(4), priority=Priority.POOL)
            assert await scheduler.drain(60.0) and scheduler.inflight == 0
            return hung, loading, line, given_up, after, scheduler.replica
        finally:
            await scheduler.close()

    hung, loading, line, given_up, after, replica = asyncio.run(scenario())
    assert isinstance(loading, DeadlineExceeded) and "still loading" in str(loading), loading
    np.testing.assert_array_equal(line["y"], rows(2)["x"] * 2 + 1)
    assert isinstance(given_up, dict), given_up  # given up while it waited: the batch ran in-process
    np.testing.assert_array_equal(given_up["y"], rows(3)["x"] * 2 + 1)
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


def test_the_pool_child_refuses_weights_changed_since_the_service_loaded_them(tmp_path: Path) -> None:
    """The digest covers external data: a child that would reopen other weights than the service's
    (model.onnx untouched) cannot serve, and pool work runs in-process on the served ones."""
    version = tmp_path / "repo" / "m" / "1"
    external_model(version, weight=2.0)
    model = load_model(tmp_path, onnx.load(str(version / "model.onnx"), load_external_data=False), FAR_SLO)
    set_weights(version, -5.0)  # after the service loaded them

    async def scenario():
        scheduler = pool_scheduler(model, instances=1)
        try:
            outputs = await scheduler.infer({"x": np.ones((1, 4), np.float32)}, priority=Priority.POOL)
            return outputs, scheduler.replica.failure
        finally:
            await scheduler.close()

    outputs, failure = asyncio.run(scenario())
    np.testing.assert_array_equal(outputs["y"], np.full((1, 4), 2.0))
    assert failure is not None and "changed since the service loaded it" in failure, failure
    assert "weights.bin" in failure


LABELS = "labels = [" + ", ".join(f'"label-{i:06d}"' for i in range(60_000)) + "]\n"  # ~900 KB of text


def test_the_spec_leaves_free_text_out_and_the_child_serves_without_it(tmp_path: Path) -> None:
    """The child reads its spec after its imports, at idle priority: each byte is one it must read."""
    model = load_model(tmp_path, modelzoo.batchable(), FAR_SLO + LABELS + 'description = "bolts"\n')
    assert len(model.source.manifest.labels) == 60_000
    spec = ReplicaSpec.of(model, models=Settings().models, provider_options={}, cache_dir=tmp_path / "c")
    assert len(pickle.dumps(spec)) < 16 * 1024
    assert (spec.source.manifest.labels, spec.source.manifest.description) == ([], "")
    assert spec.source.manifest.slo_p99_ms == model.slo_p99_ms and spec.digest == model.digest
    assert len(model.source.manifest.labels) == 60_000  # the served model keeps them

    async def scenario():
        scheduler = pool_scheduler(model, instances=1)
        try:
            return await scheduler.infer(rows(7), priority=Priority.POOL), scheduler.replica
        finally:
            await scheduler.close()

    outputs, replica = asyncio.run(scenario())
    np.testing.assert_array_equal(outputs["y"], rows(7)["x"] * 2 + 1)
    assert replica.failure is None and sum(replica.ran.values()) == 1


def test_starting_a_pool_process_never_waits_for_it_to_read_its_spec(tmp_path: Path, monkeypatch) -> None:
    """Replica.start runs on the event loop (ModelScheduler.start) and a restart under the replica's
    lock: neither may wait for a child that is slow to read, here one stopped before its imports,
    with a spec larger than a socket's buffer (a long provider list: any spec that size)."""
    from appliance.engine import replica as replicas

    model = load_model(tmp_path, modelzoo.batchable(), FAR_SLO)
    spec = dataclasses.replace(
        ReplicaSpec.of(model, models=Settings().models, provider_options={}, cache_dir=tmp_path / "c"),
        models=ModelSettings(providers=[f"provider-{i}" for i in range(100_000)]),
    )
    assert len(pickle.dumps(spec)) > 1 << 20
    stopped: list[int] = []

    def stop(pid: int | None = None) -> None:  # where the child is lowered to idle priority, at its start
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    monkeypatch.setattr(replicas, "lower_priority", stop)
    replica = Replica(spec, 1)
    started = threading.Event()
    starter = threading.Thread(target=lambda: (replica.start(), started.set()), daemon=True)
    try:
        starter.start()
        has_started = started.wait(WAIT_S)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)  # a blocked start (the bug) can now finish
    assert has_started, "Replica.start waited for the child to read its spec"
    starter.join(WAIT_S)
    try:
        outputs, _ = replica.run(0, rows(8), wait_s=WAIT_S)
    finally:
        replica.close()
    np.testing.assert_array_equal(outputs["y"], rows(8)["x"] * 2 + 1)


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
