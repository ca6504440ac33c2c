"""Dispatch: refusals move a job, failover happens once, late duplicates are dropped, no queue.

The link is replaced at its seam (the `publish` callable) by a list, and answers are handed to
`Dispatcher.answered` as the link would; the MQTT side is tested on a real broker in
tests/integration/platform/.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from test_platform_credit import ROOT, add

from appliance import errors
from appliance.platform import verify
from appliance.platform.attempts import Answer, answer_of
from appliance.platform.credit import CreditBook
from appliance.platform.dispatch import Dispatcher, Job, JobLost
from appliance.platform.settings import GatewaySettings
from appliance.platform.view import NodeView, PoolView
from appliance.pool import identity, signing
from appliance.pool.wire import Inbound, Outbound
from appliance.protocol import codec


class Fixture:
    def __init__(self, **settings: Any) -> None:
        self.view = PoolView(ROOT)
        self.clock_s = 0.0
        self.credit = CreditBook(self.view, clock=lambda: self.clock_s)
        self.sent: list[Outbound] = []
        self.arrived = asyncio.Event()
        self.settings = GatewaySettings(**({"broker": "mqtt://x", "job_timeout_s": 30.0} | settings))
        self.dispatcher = Dispatcher(self.settings, self.credit, self._publish, reply_base=f"{ROOT}/_reply/g")

    def _publish(self, message: Outbound) -> None:
        self.sent.append(message)
        self.arrived.set()

    async def next_job(self, count: int) -> Outbound:
        async with asyncio.timeout(5):
            while len(self.sent) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.sent[count - 1]

    def answer(self, job: Outbound, status: int = 200, **document: Any) -> None:
        body = orjson.dumps(document or {"outputs": []})
        reply = Inbound(
            job.response_topic or "", body, correlation=job.correlation, user={"status": str(status)}
        )
        self.dispatcher.answered(reply, 0.0)


def job() -> Job:
    return Job("m", "acme", b"{}", None, 1, None)


@pytest.mark.asyncio
async def test_a_refusal_moves_the_job_and_withholds_the_node() -> None:
    f = Fixture()
    a, b = add(f.view, "a", 1000.0), add(f.view, "b", 1000.0)
    running = asyncio.create_task(f.dispatcher.run(job()))
    first = await f.next_job(1)
    f.answer(first, 503, error="busy", retry_after_s=30)
    second = await f.next_job(2)
    assert first.topic.split("/")[3] != second.topic.split("/")[3]  # another node
    assert second.response_topic == first.response_topic and second.correlation != first.correlation
    assert second.response_topic.startswith(f"{ROOT}/_reply/g/acme/")  # one sender level per buyer
    f.answer(second)
    answer = await running
    refuser = a if first.topic.split("/")[3] == "a" else b
    assert answer.status == 200 and answer.node is not refuser
    assert f.credit.withheld_for_s(refuser, "m") == pytest.approx(30.0)


@pytest.mark.asyncio
async def test_a_lost_node_has_its_job_resent_once_and_late_duplicates_are_dropped() -> None:
    f = Fixture()
    add(f.view, "a", 1000.0)
    add(f.view, "b", 1000.0)
    running = asyncio.create_task(f.dispatcher.run(job()))
    first = await f.next_job(1)
    lost = f.view.get("s", first.topic.split("/")[3])
    assert lost is not None
    f.view.ingest(f"{ROOT}/s/{lost.node}/state", orjson.dumps({"session": 1, "state": "offline"}), 0.0)
    f.dispatcher.sweep()
    second = await f.next_job(2)
    f.answer(second)
    f.answer(first)  # the lost node answers after all, too late
    f.answer(second)  # and a duplicate of the second
    answer = await running
    assert answer.node.node != lost.node and f.dispatcher.late_answers == 2
    assert len(f.sent) == 2 and f.dispatcher.in_flight == 0


@pytest.mark.asyncio
async def test_a_job_lost_twice_is_a_503_not_a_third_send() -> None:
    f = Fixture(job_timeout_s=0.05, timeout_withhold_s=60.0)
    for name in "abc":
        add(f.view, name, 1000.0)
    with pytest.raises(JobLost):
        await f.dispatcher.run(job())
    assert len(f.sent) == 2


@pytest.mark.asyncio
async def test_the_first_success_of_any_attempt_wins() -> None:
    f = Fixture()
    add(f.view, "a", 1000.0)
    add(f.view, "b", 1000.0)
    running = asyncio.create_task(f.dispatcher.run(job()))
    first = await f.next_job(1)
    lost = f.view.get("s", first.topic.split("/")[3])
    assert lost is not None
    f.view.ingest(f"{ROOT}/s/{lost.node}/state", orjson.dumps({"session": 1, "state": "offline"}), 0.0)
    f.dispatcher.sweep()
    await f.next_job(2)
    f.answer(first)  # the first node's answer arrives before the second's
    assert (await running).node is lost


@pytest.mark.asyncio
async def test_no_capacity_is_a_503_at_once_and_nothing_waits() -> None:
    f = Fixture(max_jobs_in_flight=1)
    with pytest.raises(errors.NoPoolCapacity) as refused:
        await f.dispatcher.run(job())
    assert refused.value.retry_after_s == 1.0 and not f.sent
    add(f.view, "a", 1000.0)
    running = asyncio.create_task(f.dispatcher.run(job()))
    await f.next_job(1)
    with pytest.raises(errors.Overloaded, match="max_jobs_in_flight"):
        await f.dispatcher.run(job())
    f.answer(f.sent[0])
    assert (await running).status == 200


@pytest.mark.asyncio
async def test_a_late_answer_is_handed_over_to_be_recorded_and_the_body_is_not_kept() -> None:
    f = Fixture()
    late: list[tuple[Job, Any]] = []
    f.dispatcher.on_late = lambda job, answer: late.append((job, answer))
    add(f.view, "a", 1000.0)
    add(f.view, "b", 1000.0)
    running = asyncio.create_task(f.dispatcher.run(Job("m", "acme", b'{"inputs": []}', None, 1, None)))
    first = await f.next_job(1)
    lost = f.view.get("s", first.topic.split("/")[3])
    assert lost is not None
    f.view.ingest(f"{ROOT}/s/{lost.node}/state", orjson.dumps({"session": 1, "state": "offline"}), 0.0)
    f.dispatcher.sweep()
    f.answer(await f.next_job(2))
    answer = await running
    f.answer(first)  # the lost node answers after the job is over
    [(kept, recorded)] = late
    assert (kept.id, kept.buyer, kept.body) == (answer.job_id.split("/")[0], "acme", b"")
    assert (recorded.attempt, recorded.node) == (0, lost) and answer.attempt == 1
    f.answer(first, 503, error="busy")  # a late refusal is only counted
    assert len(late) == 1 and f.dispatcher.late_answers == 2
    kept_records = list(f.dispatcher._finished.values())  # what is kept for late answers
    assert len(kept_records) == 2 and not any(hasattr(r, "reply") for r in kept_records)  # no answer in it
    # one object each for full collections to scan: no Job (with its dict and lists) inside
    inside = [type(x) for record in kept_records for x in gc.get_referents(record)]
    assert not {Job, dict, list} & set(inside), inside


@pytest.mark.asyncio
async def test_a_finished_job_leaves_nothing_for_the_cycle_collector() -> None:
    """A job and its attempts refer to each other; once the job is over the dispatcher breaks that, so
    a job's objects (with its answer) are freed at once rather than by collections that stop the loop."""
    f = Fixture()
    add(f.view, "a", 1000.0)
    gc.collect()
    gc.disable()
    try:
        for n in range(50):
            running = asyncio.create_task(f.dispatcher.run(job()))
            f.answer(await f.next_job(n + 1))
            assert (await running).status == 200
            del running
        found = gc.collect()
    finally:
        gc.enable()
    assert found < 50, f"{found} objects of cyclic garbage after 50 jobs"


# An answer that decodes and carries a well-formed pool_signature: only the node's key is left to check.
SIGNED_LOOKING = orjson.dumps(
    {
        "parameters": {
            "pool_signature": {
                **signing.Statement("j/0", "a" * 64, "", "", 0.0, 0.0, "evil", 1).fields(),
                "signature": "AAAA",
            }
        },
        "outputs": [],
    }
)


class Signing(Fixture):
    """Nodes with device keys, and a dispatcher that verifies every 200 as the gateway does."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.keys: dict[str, Any] = {}
        self.refused: list[str] = []
        self.dispatcher.verify = lambda job, answer: verify.check(
            answer.node, answer.job_id, answer.payload, answer.header_length,
            input_sha256=job.input_sha256, files=job.files,
        )  # fmt: skip
        self.dispatcher.on_refused = lambda job, answer, why: self.refused.append(answer.node.node)

    def node(self, name: str, key_text: str | None = None) -> NodeView:
        node = add(self.view, name, 1000.0)
        self.keys[name] = identity.generate()
        node.birth = {
            **(node.birth or {}),
            "public_key": key_text or signing.public_key_text(self.keys[name]),
        }
        return node

    def signed(self, job: Outbound, *, session: int = 1) -> bytes:
        """What an honest node answers: outputs, with its signature over them."""
        name = job.topic.split("/")[3]
        outputs = {"y": np.ones((1, 2), np.float32)}
        asked = codec.encode_request({"x": np.zeros((1, 4), np.float32)}, binary=False, binary_output=False)
        request = codec.decode_request(asked.body())
        encoded = codec.encode_response(model_name="m", model_version="1", request=request, outputs=outputs)
        assert encoded.header_length is None  # JSON: the signed header is the whole answer
        statement = signing.Statement(
            (job.correlation or b"").decode(),
            "a" * 64,
            "",
            signing.tensor_digest(outputs),
            0.0,
            0.1,
            name,
            session,
        )
        proof = {**statement.fields(), "signature": signing.sign(self.keys[name], statement)}
        return signing.attach(encoded.body(), proof)

    def reply(self, job: Outbound, payload: bytes, **user: str) -> None:
        message = Inbound(job.response_topic or "", payload, correlation=job.correlation, user=user)
        self.dispatcher.answered(message, 0.0)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "key_text"),
    [(b"[]", None), (b'{"outputs": 5}', None), (SIGNED_LOOKING, None), (SIGNED_LOOKING, "ed25519:no!!")],
    ids=["list", "outputs-number", "bad-signature", "key-not-base64"],
)
async def test_a_200_that_cannot_be_verified_is_noise_held_against_nobody(
    body: bytes, key_text: str | None
) -> None:
    """Anyone on the broker may publish under a reply topic: an answer that cannot be verified is
    counted and ignored, and the attempt still waits for its node, which is never refused for it."""
    f = Signing(job_timeout_s=0.2)
    slow = f.node("slow", key_text)
    f.node("honest")
    f.credit.withhold(f.view.get("s", "honest"), "m", 1.0)  # so that the job goes to slow first
    running = asyncio.create_task(f.dispatcher.run(job()))
    first = await f.next_job(1)
    assert first.topic.split("/")[3] == "slow"
    f.clock_s = 2.0
    f.reply(first, body, status="200")
    assert not running.done() and len(f.sent) == 1  # still slow's job
    assert f.dispatcher.unverified_answers == 1 and slow.jobs["m"]["unverified"] == 1
    if key_text is None:  # slow's own answer comes after the noise and is the one taken
        f.reply(first, f.signed(first), status="200")
        answer = await running
        assert answer.node is slow and answer.proof is not None and answer.attempt == 0
    else:  # slow never answers verifiably: it times out, and the job moves on as after any timeout
        second = await f.next_job(2)
        assert second.topic.split("/")[3] == "honest"
        f.reply(second, f.signed(second), status="200")
        answer = await running
        assert answer.node.node == "honest" and answer.proof is not None
    assert f.refused == [] and "refused_answer" not in slow.jobs["m"]


@pytest.mark.asyncio
async def test_no_node_can_answer_an_attempt_it_was_not_sent() -> None:
    """Node a refuses its attempt, which moves the job to b, then answers b's attempt with junk under
    every CorrelationData it can make of its own: none is b's, and b's answer is the buyer's."""
    f = Signing()
    f.node("a")
    b = f.node("b")
    f.credit.withhold(b, "m", 1.0)  # the job goes to a first
    running = asyncio.create_task(f.dispatcher.run(job()))
    first = await f.next_job(1)
    assert first.topic.split("/")[3] == "a"
    f.clock_s = 2.0
    f.reply(first, orjson.dumps({"error": "busy", "retry_after_s": 0.01}), status="503")
    second = await f.next_job(2)
    assert second.topic.split("/")[3] == "b"
    mine = (first.correlation or b"").decode()
    job_id, _, rest = mine.partition("/")
    nonce = rest.partition("/")[2]
    assert len(nonce) >= 16 and nonce not in (second.correlation or b"").decode()  # 96 random bits
    for guess in (f"{job_id}/1", f"{job_id}/1/{nonce}", f"{job_id}/1/{secrets.token_urlsafe(12)}"):
        forged = Inbound(
            second.response_topic or "",
            b'{"outputs": []}',
            correlation=guess.encode(),
            user={"status": "200"},
        )
        f.dispatcher.answered(forged, 0.0)
    f.reply(second, f.signed(second), status="200")
    answer = await running
    assert answer.node is b and answer.proof is not None and answer.attempt == 1
    assert f.refused == [] and f.dispatcher.late_answers == 3 and "unverified" not in b.jobs["m"]


@pytest.mark.asyncio
async def test_a_signed_answer_that_is_wrong_is_refused_and_the_job_moves_on() -> None:
    """A node's own signature on an impossible claim is its word: refused (for the gateway to record and
    quarantine), and the job moves on."""
    f = Signing()
    liar, honest = f.node("liar"), f.node("honest")
    f.credit.withhold(honest, "m", 1.0)
    running = asyncio.create_task(f.dispatcher.run(job()))
    first = await f.next_job(1)
    f.clock_s = 2.0
    f.reply(first, f.signed(first, session=2**63), status="200")
    second = await f.next_job(2)
    assert (first.topic.split("/")[3], second.topic.split("/")[3]) == ("liar", "honest")
    f.reply(second, f.signed(second), status="200")
    answer = await running
    assert answer.node is honest and f.refused == ["liar"] and liar.jobs["m"]["refused_answer"] == 1


def test_a_status_or_header_length_that_is_not_a_decimal_number_is_still_an_answer() -> None:
    node = NodeView("s", "a")
    attempt = SimpleNamespace(node=node, correlation=b"job/0/nonce", sent_s=0.0, number=0)
    for user, expected in [
        ({"status": "\u00b2"}, (502, None)),  # str.isdigit() says yes, int() says no
        ({"status": "2" * 5000}, (502, None)),  # past int()'s 4300 digits
        ({"status": "200", codec.HEADER_LENGTH: "\u00b9"}, (200, None)),
        ({"status": " 200 ", codec.HEADER_LENGTH: "12"}, (200, 12)),
        ({}, (502, None)),
    ]:
        answer: Answer = answer_of(Inbound("t", b"{}", correlation=b"job/0", user=user), attempt)  # type: ignore[arg-type]
        assert (answer.status, answer.header_length) == expected, user


@pytest.mark.asyncio
async def test_a_late_answer_that_does_not_verify_is_noise_and_never_costs_the_current_node() -> None:
    f = Signing()
    f.node("a")
    b = f.node("b")
    f.credit.withhold(b, "m", 1.0)  # the job goes to a first
    running = asyncio.create_task(f.dispatcher.run(job()))
    first = await f.next_job(1)
    f.view.ingest(f"{ROOT}/s/a/state", orjson.dumps({"session": 1, "state": "offline"}), 0.0)
    f.clock_s = 2.0
    f.dispatcher.sweep()  # a is lost: the job is re-sent to b
    second = await f.next_job(2)
    assert (first.topic.split("/")[3], second.topic.split("/")[3]) == ("a", "b")
    f.reply(first, b'{"outputs": []}', status="200")  # a answers after all, unsigned: only noise
    f.reply(second, f.signed(second), status="200")
    answer = await running
    assert answer.node is b and answer.proof is not None and f.refused == []
    assert "unverified" not in b.jobs["m"] and f.dispatcher.unverified_answers == 1


@pytest.mark.asyncio
async def test_a_late_answer_that_verifies_answers_for_the_job() -> None:
    f = Signing()
    a, b = f.node("a"), f.node("b")
    f.credit.withhold(b, "m", 1.0)
    running = asyncio.create_task(f.dispatcher.run(job()))
    first = await f.next_job(1)
    f.view.ingest(f"{ROOT}/s/a/state", orjson.dumps({"session": 1, "state": "offline"}), 0.0)
    f.clock_s = 2.0
    f.dispatcher.sweep()
    await f.next_job(2)
    f.reply(first, f.signed(first), status="200")
    answer = await running
    assert answer.node is a and answer.proof is not None and a.jobs["m"]["answered"] == 1
