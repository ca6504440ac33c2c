"""Dispatch against nodes that misbehave: floods of state messages, failing statuses, refusals naming any
retry time, 400s for jobs the gateway already checked, replays of answers; and the credit a node keeps
while it still works.

Real PoolView, CreditBook and Dispatcher (and the real GatewayLink for the flood), the link replaced at
its `publish` seam as in test_platform_dispatch.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from test_platform_credit import ROOT, add
from test_platform_dispatch import Fixture, Signing, job

from appliance.platform.credit import CreditBook
from appliance.platform.dispatch import MAX_NODE_RETRY_AFTER_S, NOISE_WITHHOLD_BYTES, Dispatcher
from appliance.platform.gateway import Gateway
from appliance.platform.link import GatewayLink
from appliance.platform.presence import Presence
from appliance.platform.verify import MAX_ANSWER_JSON_BYTES
from appliance.platform.view import NodeView, PoolView
from appliance.pool.wire import Outbound


def node_of(message: Outbound) -> str:
    return message.topic.split("/")[3]


def state(view: PoolView, node: str, value: str, at_s: float = 0.0) -> None:
    """A state message without seq (every copy is taken), as a node may send as often as it likes."""
    view.ingest(f"{ROOT}/s/{node}/state", orjson.dumps({"session": 1, "state": value}), at_s)


def state_changed(f: Fixture) -> None:
    """What the link's on_state runs: the gateway's own handler, over this fixture's view and dispatcher."""
    Gateway._state_changed(SimpleNamespace(view=f.view, dispatcher=f.dispatcher))  # type: ignore[arg-type]


async def turns(count: int = 3) -> None:
    """Let the loop run what was scheduled (the gateway's handlers, the merged sweep, woken jobs)."""
    for _ in range(count):
        await asyncio.sleep(0)


# --- finding 2: one node's state messages cost the loop its own attempts only ------------------------


def paho_message(topic: str, payload: bytes) -> mqtt.MQTTMessage:
    found = mqtt.MQTTMessage(topic=topic.encode())
    found.payload = payload
    return found


@pytest.mark.asyncio
async def test_a_flood_of_state_messages_checks_only_the_node_that_went_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    f = Fixture(job_timeout_s=600.0, max_jobs_in_flight=1000)
    for i in range(20):
        add(f.view, f"n{i}", 1000.0)
    add(f.view, "noisy", 1000.0)
    running = [asyncio.create_task(f.dispatcher.run(job())) for _ in range(400)]
    await f.next_job(400)
    noisy = sum(node_of(m) == "noisy" for m in f.sent)
    assert 0 < noisy < 400

    checked: Counter[str] = Counter()
    sweeping = [False]

    def counting(name: str) -> Callable[..., Any]:
        original = getattr(NodeView, name, None)

        def check(self: NodeView, now_s: float) -> bool:
            if sweeping[0]:
                checked[self.node] += 1
            return original(self, now_s) if original is not None else False

        return check

    def flagged(name: str) -> Callable[..., Any] | None:
        original = getattr(Dispatcher, name, None)
        if original is None:
            return None

        def run(self: Dispatcher, *args: Any) -> Any:
            sweeping[0] = True
            try:
                return original(self, *args)
            finally:
                sweeping[0] = False

        return run

    for name in ("is_live", "is_lost"):
        monkeypatch.setattr(NodeView, name, counting(name), raising=False)
    for name in ("sweep", "_swept"):
        if (wrapped := flagged(name)) is not None:
            monkeypatch.setattr(Dispatcher, name, wrapped)

    link = GatewayLink(
        f.settings,
        f.view,
        Presence(ROOT, "g"),
        on_answer=lambda m, s: None,
        on_state=lambda: state_changed(f),
    )
    link._loop, link._loop_thread = asyncio.get_running_loop(), threading.get_ident()
    # The link stamps messages with time.monotonic(), the nodes were heard at 0: on a host up for more
    # than forget_after_s the view would forget them all at the first message.
    f.view.forget_after_s = float("inf")
    flood = [
        paho_message(f"{ROOT}/s/noisy/state", orjson.dumps({"session": 1, "state": value}))
        for value in ["draining"] * 500 + ["offline"] * 500
    ]
    for message in flood:
        link._received(None, None, message)
    await turns()
    assert set(checked) <= {"noisy"}, f"other nodes' attempts checked: {checked}"
    assert checked["noisy"] <= noisy  # each of its attempts once, for the one move to offline
    await f.next_job(400 + noisy)  # and each of them was re-sent, to other nodes
    assert all(node_of(m) != "noisy" for m in f.sent[400:])
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


def test_the_view_names_a_node_fallen_once_per_move_to_offline() -> None:
    view = PoolView(ROOT, forget_after_s=100.0)
    add(view, "a", 1000.0)
    add(view, "b", 1000.0)
    for value in ["draining", "draining", "offline", "offline", "draining", "offline"]:
        state(view, "a", value)
    state(view, "b", "offline")
    assert view.fallen() == {("s", "a"), ("s", "b")} and view.fallen() == set()
    state(view, "a", "online")
    state(view, "a", "offline")
    view.forget(200.0)  # heard nothing from for forget_after_s: nothing is kept of it
    assert view.fallen() == set()


# --- finding 8: draining finishes its jobs; offline or silence loses them ----------------------------


@pytest.mark.asyncio
async def test_a_draining_node_keeps_its_jobs_an_offline_or_silent_one_loses_them() -> None:
    f = Fixture()
    add(f.view, "a", 1000.0)
    b = add(f.view, "b", 1000.0)
    f.credit.withhold(b, "m", 0.5)  # the jobs go to a first
    first = asyncio.create_task(f.dispatcher.run(job()))
    sent = await f.next_job(1)
    state(f.view, "a", "draining")
    state_changed(f)
    f.dispatcher.sweep()  # the periodic check, too
    await turns()
    assert len(f.sent) == 1  # a finishes it, as a draining box does
    f.answer(sent)
    assert (await first).node.node == "a"

    state(f.view, "a", "online")
    second = asyncio.create_task(f.dispatcher.run(job()))
    sent = await f.next_job(2)
    assert node_of(sent) == "a"
    f.clock_s = 1.0
    state(f.view, "a", "offline")
    state_changed(f)
    assert node_of(await f.next_job(3)) == "b"
    f.answer(f.sent[2])
    assert (await second).node is b

    state(f.view, "a", "online")
    f.credit.withhold(b, "m", 0.5)
    third = asyncio.create_task(f.dispatcher.run(job()))
    assert node_of(await f.next_job(4)) == "a"
    f.clock_s = 2.5  # b's withholding is over; a's (and b's) reports of valid_for_s 3 are not
    state(f.view, "a", "draining")
    f.dispatcher.sweep()
    await turns()
    assert len(f.sent) == 4
    f.clock_s = 3.5  # a's last report has expired: silent, whatever it said it was doing
    model = {"spare_ips_at_slo": 1000.0, "accepts_pool_jobs": True, "slo_p99_ms": 100.0}
    report = {"session": 1, "seq": 3, "valid_for_s": 3, "models": {"m": model}}
    f.view.ingest(f"{ROOT}/s/b/capacity", orjson.dumps(report), 3.5)  # b reports again
    f.dispatcher.sweep()
    assert node_of(await f.next_job(5)) == "b"
    f.answer(f.sent[4])
    assert (await third).node.node == "b"


# --- finding 3: failing statuses, refusals' retry times, 400/413 put to a second node -----------------


@pytest.mark.asyncio
@pytest.mark.parametrize("status", ["500", "503x", "302", "299"])
async def test_a_node_failing_with_5xx_or_an_unknown_status_is_withheld_as_for_a_timeout(status: str) -> None:
    f = Fixture(timeout_withhold_s=42.0)
    a, b = add(f.view, "a", 1000.0), add(f.view, "b", 1000.0)
    f.credit.withhold(b, "m", 0.5)
    running = asyncio.create_task(f.dispatcher.run(job()))
    sent = await f.next_job(1)
    assert node_of(sent) == "a"
    f.clock_s = 1.0
    f.dispatcher.answered(
        SimpleNamespace(correlation=sent.correlation, payload=b"{}", user={"status": status}),  # type: ignore[arg-type]
        0.0,
    )
    resent = await f.next_job(2)  # re-sent once, to another node
    assert node_of(resent) == "b"
    f.answer(resent)
    assert (await running).node is b
    assert f.credit.withheld_for_s(a, "m") == pytest.approx(42.0)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("named", "withheld_s"),
    [(-1, 1.0), (0, 1.0), (1e-9, 1.0), (None, 1.0), (30, 30.0), (1e12, MAX_NODE_RETRY_AFTER_S)],
)
async def test_a_refusal_withholds_the_node_for_what_it_names_within_bounds(
    named: float | None, withheld_s: float
) -> None:
    f = Fixture()  # gateway.retry_after_s = 1.0: the least a refusal withholds
    a, b = add(f.view, "a", 1000.0), add(f.view, "b", 1000.0)
    f.credit.withhold(b, "m", 0.5)
    running = asyncio.create_task(f.dispatcher.run(job()))
    sent = await f.next_job(1)
    f.clock_s = 1.0
    f.answer(sent, 503, error="busy", **({} if named is None else {"retry_after_s": named}))
    f.answer(await f.next_job(2))
    assert (await running).node is b
    assert f.credit.withheld_for_s(a, "m") == pytest.approx(withheld_s)


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [400, 413])
async def test_a_nodes_400_or_413_is_put_to_a_second_node(status: int) -> None:
    f = Fixture()
    a, b = add(f.view, "a", 1000.0), add(f.view, "b", 1000.0)

    async def first_says_no(second: int) -> Any:
        count = len(f.sent)
        f.credit.withhold(b, "m", 0.5)  # the job goes to a first
        running = asyncio.create_task(f.dispatcher.run(job()))
        sent = await f.next_job(count + 1)
        assert node_of(sent) == "a"
        f.clock_s += 1.0
        f.answer(sent, status, error="bad input")
        resent = await f.next_job(count + 2)
        assert node_of(resent) == "b"
        f.answer(resent, second, error="bad input")
        return await running

    assert (await first_says_no(status)).node is b  # both say so: the buyer's fault, nobody withheld
    assert f.credit.withheld_for_s(a, "m") == 0.0
    answer = await first_says_no(200)  # b ran it: a's 400 was wrong, and a is withheld for it
    assert answer.status == 200 and answer.node is b
    # a's 413 may be its own body limit, smaller than b's: no fault of its, so not withheld
    withheld_s = f.settings.timeout_withhold_s if status == 400 else 0.0
    assert f.credit.withheld_for_s(a, "m") == pytest.approx(withheld_s)


@pytest.mark.asyncio
async def test_a_node_that_said_400_cannot_answer_the_job_after_all() -> None:
    f = Signing()
    a, b = f.node("a"), f.node("b")
    f.credit.withhold(b, "m", 0.5)  # the job goes to a first
    running = asyncio.create_task(f.dispatcher.run(job()))
    first = await f.next_job(1)
    f.clock_s = 1.0
    f.reply(first, b'{"error": "bad input"}', status="400")
    second = await f.next_job(2)
    assert node_of(second) == "b"
    f.reply(first, f.signed(first), status="200")  # a answers after all: not taken, not billed
    await turns()
    assert not running.done()
    f.reply(second, f.signed(second), status="200")
    answer = await running
    assert answer.node is b and answer.status == 200
    assert f.credit.withheld_for_s(a, "m") == pytest.approx(f.settings.timeout_withhold_s)


@pytest.mark.asyncio
async def test_a_400_with_no_second_node_to_ask_is_the_buyers_answer() -> None:
    f = Fixture()
    add(f.view, "a", 1000.0)
    running = asyncio.create_task(f.dispatcher.run(job()))
    f.answer(await f.next_job(1), 400, error="bad input")
    answer = await running
    assert answer.status == 400 and len(f.sent) == 1


# --- finding 7: a node still working on a settled job keeps its rows ---------------------------------


async def settled_by_an_earlier_node(f: Fixture) -> tuple[NodeView, Outbound]:
    """Job 1 goes to a, a is lost, the job goes to b, then a's answer comes after all and is the buyer's:
    b still works on the job. Returns b and its job."""
    add(f.view, "a", 10.0)
    b = add(f.view, "b", 10.0)  # 10 inferences/s x 100 ms: 1 row of credit
    f.credit.withhold(b, "m", 0.5)
    running = asyncio.create_task(f.dispatcher.run(job()))
    first = await f.next_job(1)
    f.clock_s = 1.0
    state(f.view, "a", "offline")
    state_changed(f)
    second = await f.next_job(2)
    assert node_of(second) == "b"
    f.answer(first)
    assert (await running).node.node == "a"
    assert f.credit.in_flight(b, "m") == 1 and f.credit.pick("m", 1, None) is None
    return b, second


@pytest.mark.asyncio
async def test_a_node_still_working_on_a_settled_job_keeps_its_rows_until_it_answers() -> None:
    f = Fixture()
    b, second = await settled_by_an_earlier_node(f)
    f.answer(second)
    await turns()
    assert f.credit.in_flight(b, "m") == 0 and f.credit.pick("m", 1, None) is b
    assert f.credit.withheld_for_s(b, "m") == 0.0


@pytest.mark.asyncio
async def test_a_node_still_working_on_a_settled_job_keeps_its_rows_until_its_timeout() -> None:
    f = Fixture(job_timeout_s=0.2, timeout_withhold_s=60.0)
    b, _ = await settled_by_an_earlier_node(f)
    [held] = f.dispatcher._held.values()
    async with asyncio.timeout(5):
        await asyncio.wait([held.reply])  # the attempt's own timer
    assert f.credit.in_flight(b, "m") == 0 and f.credit.withheld_for_s(b, "m") > 0


@pytest.mark.asyncio
async def test_a_held_attempt_timing_out_across_the_gateways_own_outage_withholds_no_node() -> None:
    f = Fixture(job_timeout_s=0.2, timeout_withhold_s=60.0)
    drops = [0]
    f.dispatcher.link_drops = lambda: drops[0]
    f.dispatcher.was_away = lambda since: drops[0] != since
    b, _ = await settled_by_an_earlier_node(f)
    [held] = f.dispatcher._held.values()
    drops[0] += 1  # the gateway's link dropped while b worked on it: b's answer may have been lost
    async with asyncio.timeout(5):
        await asyncio.wait([held.reply])
    assert f.credit.in_flight(b, "m") == 0 and f.credit.withheld_for_s(b, "m") == 0.0


@pytest.mark.asyncio
async def test_a_node_still_working_on_a_settled_job_keeps_its_rows_until_it_is_lost() -> None:
    f = Fixture()
    b, _ = await settled_by_an_earlier_node(f)
    state(f.view, "b", "offline")
    state_changed(f)
    await turns()
    assert f.credit.in_flight(b, "m") == 0 and not f.dispatcher._held


@pytest.mark.asyncio
@pytest.mark.parametrize("gateway_dropped", [True, False])
async def test_a_timeout_across_the_gateways_own_outage_withholds_no_node(gateway_dropped: bool) -> None:
    f = Fixture(job_timeout_s=0.2, timeout_withhold_s=60.0)
    drops = [0]
    f.dispatcher.link_drops = lambda: drops[0]
    f.dispatcher.was_away = lambda since: drops[0] != since
    add(f.view, "a", 1000.0), add(f.view, "b", 1000.0)
    running = asyncio.create_task(f.dispatcher.run(job()))
    first = await f.next_job(1)
    if gateway_dropped:
        drops[0] += 1  # the gateway's link dropped while the job was out: its answer may have been lost
    resent = await f.next_job(2)  # after the job's timeout, to the other node
    assert node_of(resent) != node_of(first)
    f.answer(resent)
    await running
    timed_out = f.view.get("s", node_of(first))
    assert timed_out is not None
    assert (f.credit.withheld_for_s(timed_out, "m") == 0.0) is gateway_dropped


# --- suspicions: the withheld book is bounded; an attempt's answers are verified a bounded number of times


def test_withheld_credit_is_forgotten_once_expired() -> None:
    view, now = PoolView(ROOT), [0.0]
    book = CreditBook(view, clock=lambda: now[0])
    for i in range(20_000):  # nodes come and go: each refuses once, then is never heard of again
        now[0] = i * 0.01
        book.withhold(NodeView("s", f"n{i}"), "m", 1.0)
    assert book.withheld_count() < 3000  # about 100 withheld at any time
    now[0] += 2.0
    assert book.retry_after_s("m", 5.0) == 5.0 and book.withheld_count() == 0


def counting_verifications(f: Signing) -> list[int]:
    """Make the dispatcher count the answers it verifies: the count is the list's one item."""
    verified = [0]
    check = f.dispatcher.verify
    assert check is not None

    def counting(job: Any, answer: Any) -> Any:
        verified[0] += 1
        return check(job, answer)

    f.dispatcher.verify = counting
    return verified


@pytest.mark.asyncio
async def test_replays_of_an_answer_are_verified_at_most_once() -> None:
    f = Signing()
    verified = counting_verifications(f)
    late: list[str] = []
    f.dispatcher.on_late = lambda job, answer: late.append(answer.job_id)
    f.node("a")
    b = f.node("b")
    f.credit.withhold(b, "m", 0.5)
    running = asyncio.create_task(f.dispatcher.run(job()))
    first = await f.next_job(1)
    f.clock_s = 1.0
    state(f.view, "a", "offline")
    state_changed(f)
    second = await f.next_job(2)
    answer = f.signed(second)
    f.reply(second, answer, status="200")
    assert (await running).node is b and verified[0] == 1
    for _ in range(5):  # the answer the buyer had, replayed
        f.reply(second, answer, status="200")
    assert verified[0] == 1 and late == []
    late_answer = f.signed(first)
    for _ in range(5):  # the lost node's answer, after the job was over, replayed
        f.reply(first, late_answer, status="200")
    assert verified[0] == 2 and late == [(first.correlation or b"").decode()]
    assert f.dispatcher.late_answers == 10


@pytest.mark.asyncio
async def test_noise_under_a_live_attempt_is_verified_a_bounded_number_of_times() -> None:
    f = Signing()
    verified = counting_verifications(f)
    f.node("a")
    running = asyncio.create_task(f.dispatcher.run(job()))
    sent = await f.next_job(1)
    junk = b" " * 1024 * 1024 + b"[]"  # as costly as any 1 MiB of JSON to parse
    for _ in range(20):
        f.reply(sent, junk, status="200")
    assert verified[0] == 4 and f.dispatcher.unverified_answers == 20 and not running.done()
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)


@pytest.mark.asyncio
async def test_megabytes_of_noise_under_an_attempt_withhold_its_node_a_stray_message_does_not() -> None:
    f = Signing()
    a = f.node("a")
    running = asyncio.create_task(f.dispatcher.run(job()))
    sent = await f.next_job(1)
    f.reply(sent, b"[]", status="200")  # a stray small message: counted, held against nobody
    assert f.credit.withheld_for_s(a, "m") == 0.0
    junk = b" " * NOISE_WITHHOLD_BYTES + b"[]"  # parsed on the loop: only a and the broker know the nonce
    f.reply(sent, junk, status="200")
    assert f.credit.withheld_for_s(a, "m") == pytest.approx(f.settings.timeout_withhold_s)
    f.reply(sent, f.signed(sent), status="200")  # its own answer is still the buyer's
    assert (await running).node is a


@pytest.mark.asyncio
async def test_junk_past_what_a_node_writes_is_unread_and_leaves_room_for_the_nodes_answer() -> None:
    f = Signing()
    f.node("a")
    running = asyncio.create_task(f.dispatcher.run(job()))
    sent = await f.next_job(1)
    junk = b" " * (MAX_ANSWER_JSON_BYTES + 1) + b"[]"  # refused by its size alone, never parsed
    for _ in range(20):
        f.reply(sent, junk, status="200")
    assert f.dispatcher.unverified_answers == 20 and not running.done()
    f.reply(sent, f.signed(sent), status="200")  # the node's own answer still counts
    assert (await running).status == 200


def test_a_clean_up_keeps_what_is_still_withheld() -> None:
    view, now = PoolView(ROOT), [0.0]
    book = CreditBook(view, clock=lambda: now[0])
    for i in range(3000):  # every model's entries expire before the next one's come, then a clean-up
        now[0] = float(i)
        book.withhold(NodeView("s", f"n{i}"), f"m{i}", 0.5)
        assert book.withheld_for_s(NodeView("s", f"n{i}"), f"m{i}") == 0.5
    assert book.withheld_count() < 1100
