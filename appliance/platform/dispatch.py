"""Buyer jobs to nodes: credit, refusals that move a job, failover once, exactly one answer per job.

Runs on the event loop. Each send of a job is an attempt with its own CorrelationData
(`<job>/<n>/<nonce>`, the nonce random: only the node the attempt went to can answer it); answers come
back from the link. The buyer gets the first success of any attempt; every later answer, and any
answer after the job is over, is a late duplicate and is dropped. Nothing waits in a queue: a job either
finds a node with credit now or its buyer gets 503 + Retry-After now. A 200 counts only once its
signature verifies (`verify`). One that cannot be verified may come from any peer on the broker: it is
counted as noise and the attempt goes on waiting for its node's answer. One the node signed but that is
wrong (verify.Refused) bars that node and moves the job on, as a refusal does.

What a node answers costs it as its word deserves: a refusal withholds its credit for the time it names
(bounded), a 5xx or a status the protocol does not have for as long as a timeout does. A 400 or 413 for a
job the gateway has already checked against the model's signature is put to a second node (the job's
one re-send): if that one answers, a first that said 400 is withheld as for a timeout (a 413 may be
its own, smaller body limit); if it says the same, that is the buyer's answer. A node gone `offline` or
silent loses its jobs in flight; a draining one finishes them. A node whose job another node's late
answer settled keeps its rows until it answers, times out or is lost, since it is still working on it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from appliance import errors
from appliance.platform.attempts import Answer, Attempt, Finished, Job, answer_of
from appliance.platform.credit import CreditBook
from appliance.platform.settings import GatewaySettings
from appliance.platform.verify import MAX_ANSWER_JSON_BYTES, Proof, Refused, Unverified
from appliance.platform.view import NodeView
from appliance.pool.topics import NodeTopics
from appliance.pool.wire import HEADER_LENGTH, Inbound, Outbound

log = logging.getLogger(__name__)

REFUSALS = (403, 404, 429, 503)  # the node will not run it: move the job, withhold the node's credit
BUYER_ERRORS = (400, 413)  # the job is wrong, says the node: a second node is asked, then the buyer hears it
FINISHED_KEPT = 10_000  # finished attempts remembered (2 job timeouts at most): a late answer is recorded
NONCE_BYTES = 12  # of each attempt's CorrelationData: 96 random bits no other node can guess
# The most a node's refusal may withhold its credit for (its retry_after_s; at least gateway.retry_after_s):
# only the node itself is hurt by a long one, but the credit book must forget it some day.
MAX_NODE_RETRY_AFTER_S = 3600.0
# Bytes of 200s read under one CorrelationData and not taken (noise, or a late answer that does not
# verify): past them, answers under it are counted and dropped unread, so that no one who knows an
# attempt's CorrelationData can make the gateway verify answers without end. Room for a few small pieces
# of noise and then the node's own answer, or one of the largest answers a node writes (verify.py).
MAX_UNVERIFIED_BYTES = 4 * 1024 * 1024
MESSAGE_BYTES = 1024  # what each such answer counts for besides its payload
# Past this much JSON read of answers not taken under one live attempt, its node's credit is withheld
# as for a timeout: only that node and the broker know the attempt's CorrelationData, so megabytes of
# junk under it (each parsed on the loop) are its own doing. Less (a stray small message) costs it nothing.
NOISE_WITHHOLD_BYTES = 64 * 1024


class NodeLost(Exception):
    """The node went offline (Last Will, `offline`, or its reports stopped) with the attempt in flight."""


class TimedOut(Exception):
    """The node did not answer the attempt within gateway.job_timeout_s."""


def _expire(reply: asyncio.Future[Answer]) -> None:
    if not reply.done():
        reply.set_exception(TimedOut())


class JobLost(errors.Overloaded):
    """Two nodes in a row lost the job (offline or past the timeout): 503, try again."""


class Dispatcher:
    """Sends jobs on credit and matches answers; `sweep()` fails attempts on nodes gone silent."""

    def __init__(
        self,
        settings: GatewaySettings,
        credit: CreditBook,
        publish: Callable[[Outbound], None],
        *,
        reply_base: str,
        on_event: Callable[[str, str], None] = lambda model, outcome: None,
        verify: Callable[[Job, Answer], Proof] | None = None,
        on_refused: Callable[[Job, Answer, Refused], None] = lambda job, answer, why: None,
        on_late: Callable[[Job, Answer], None] = lambda job, answer: None,
        link_drops: Callable[[], int] = lambda: 0,
        was_away: Callable[[int], bool] = lambda drops: False,
    ) -> None:
        self.settings = settings
        self.credit = credit
        self.publish = publish
        self.reply_base = reply_base
        self.on_event = on_event
        self.verify = verify
        self.on_refused = on_refused  # a 200 the node signed but that is wrong: recorded, the node checked
        self.on_late = on_late  # a 200 after its job was over: recorded, never billed
        # The gateway's own broker connection: how often it dropped, and whether it dropped since a count
        # (a job timing out across the gateway's own outage is no fault of its node's: not withheld).
        self.link_drops = link_drops
        self.was_away = was_away
        self.late_answers = 0
        self.unverified_answers = 0  # 200s that could not be verified: noise (see _noise)
        self._jobs: dict[str, Job] = {}
        self._attempts: dict[bytes, Attempt] = {}
        self._finished: OrderedDict[bytes, Finished] = OrderedDict()
        self._by_node: dict[tuple[str, str], set[Attempt]] = {}
        # Attempts whose job another attempt settled while their node still works on it (their rows held).
        self._held: dict[bytes, Attempt] = {}
        # CorrelationData -> bytes of 200s read under it and not taken (MAX_UNVERIFIED_BYTES once one was
        # taken or recorded); kept as long as the attempt or its Finished record.
        self._unverified_bytes: dict[bytes, int] = {}
        self._sweep_all = False  # a sweep of every node is due in the next turn of the loop
        self._sweep_nodes: set[tuple[str, str]] = set()  # or of these nodes
        self._sweep_due: asyncio.Handle | None = None

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    async def run(self, job: Job) -> Answer:
        """The job's answer (200, or a 400/413 the node gave); raises NoPoolCapacity, JobLost, BrokerAway."""
        if len(self._jobs) >= self.settings.max_jobs_in_flight:
            raise errors.Overloaded(
                f"{len(self._jobs)} jobs in progress, gateway.max_jobs_in_flight; try again",
                retry_after_s=self.settings.retry_after_s,
            )
        self._jobs[job.id] = job
        answer: Answer | None = None
        try:
            answer = await self._run(job)
            return answer
        finally:
            job.is_done = True
            self._jobs.pop(job.id, None)
            self._remember(job, answer)
            job.attempts.clear()  # each refers to the job: freed now, not by the cycle collector

    def _remember(self, job: Job, answer: Answer | None) -> None:
        """Keep a finished job's attempts (without its body) for as long as a late answer may come; the
        attempt whose answer was taken has been heard (a replay of it is recorded nowhere)."""
        for attempt in job.attempts:
            self._attempts.pop(attempt.correlation, None)
            self._finished[attempt.correlation] = Finished.of(attempt)
        if answer is not None and answer.attempt < len(job.attempts):
            self._unverified_bytes[job.attempts[answer.attempt].correlation] = MAX_UNVERIFIED_BYTES
        oldest_s = time.perf_counter() - 2 * self.settings.job_timeout_s
        while self._finished and (
            len(self._finished) > FINISHED_KEPT or next(iter(self._finished.values())).sent_s < oldest_s
        ):
            correlation, _ = self._finished.popitem(last=False)
            self._unverified_bytes.pop(correlation, None)

    def _pick(self, job: Job, barred: set[tuple[str, str]]) -> NodeView | None:
        if job.target is None:
            return self.credit.pick(job.model, job.rows, job.files, barred | job.excluded)
        node = job.target
        offer = node.offer(job.model, self.credit.clock(), is_check=True)
        usable = offer is not None and (job.files is None or offer.sha256 in job.files)
        return node if usable and (node.site, node.node) not in barred else None

    async def _run(self, job: Job) -> Answer:
        barred: set[tuple[str, str]] = set()
        moves = 0
        doubted: Answer | None = None  # the 400/413 the job was re-sent to check
        while True:
            node = self._pick(job, barred)
            if node is None and job.target is not None:
                why = (
                    job.target.refusal(job.model, self.credit.clock(), is_check=True)
                    or "not one of its files"
                )
                raise errors.NoPoolCapacity(f"node {job.target.name} cannot take the {job.kind} now: {why}")
            if node is None and doubted is not None:  # no second node to ask: the first one's word stands
                self.on_event(job.model, "bad_job")
                return doubted
            if node is None:
                self.on_event(job.model, "no_capacity")
                raise errors.NoPoolCapacity(
                    f"no node has spare capacity for model {job.model!r} now"
                    + (f" (moved past {moves} refusing nodes)" if moves else ""),
                    retry_after_s=self.credit.retry_after_s(job.model, self.settings.retry_after_s),
                )
            answer = await self._attempt(job, node)
            if answer is not None and answer.status == 200:
                why = self._refusal(job, answer)
                if why is None:
                    answer.node.count(job.model, "answered")
                    self.on_event(job.model, "answered")
                    if doubted is not None and answer.node is not doubted.node:  # its 400/413 was wrong
                        doubted.node.count(job.model, "bad_job_refuted")
                        if doubted.status == 400:  # a 413 may be its own, smaller body limit: no fault
                            self.credit.withhold(doubted.node, job.model, self.settings.timeout_withhold_s)
                    return answer
                answer.node.count(job.model, "refused_answer")  # signed with its key: its own answer
                self.on_event(job.model, "bad_answer")
                self.on_refused(job, answer, why)
                barred.add((answer.node.site, answer.node.node))
                moves += 1
                if moves > self.settings.max_refusal_moves:
                    raise errors.NoPoolCapacity(
                        f"{moves} nodes refused or answered job for model {job.model!r} unverifiably",
                        retry_after_s=self.settings.retry_after_s,
                    )
                continue
            barred.add((node.site, node.node))
            if answer is not None and answer.status in BUYER_ERRORS:
                # The gateway checked the job against the model's signature already: a second node says
                # whether it is the buyer's fault (a check aimed at one node has no second).
                if job.was_resent or job.target is not None:
                    self.on_event(job.model, "bad_job")
                    return answer
                node.count(job.model, "bad_job")
                doubted = answer
                # It has answered: a 200 under the same attempt later is not taken (nor billed) for the
                # job, whatever it says; once the job is over it is a late answer like any other.
                self._attempts.pop(job.attempts[answer.attempt].correlation, None)
                job.was_resent = True
                self.on_event(job.model, "resent")
                continue
            if answer is not None and answer.status in REFUSALS:
                node.count(job.model, "refused")
                self.on_event(job.model, "refused")
                self.credit.withhold(node, job.model, self._withheld_s(answer.retry_after_s))
                moves += 1
                if moves > self.settings.max_refusal_moves:
                    raise errors.NoPoolCapacity(
                        f"{moves} nodes refused the job for model {job.model!r}",
                        retry_after_s=self.credit.retry_after_s(job.model, self.settings.retry_after_s),
                    )
                continue
            node.count(job.model, "lost")  # offline, past the timeout, or a 5xx from the node
            if answer is not None:  # a 5xx, or a status the protocol does not have: as bad as a timeout
                self.credit.withhold(node, job.model, self.settings.timeout_withhold_s)
            if job.was_resent:
                self.on_event(job.model, "lost")
                raise JobLost(
                    f"the job for model {job.model!r} was lost by two nodes (offline, past "
                    f"{self.settings.job_timeout_s:g} s, or failing)",
                    retry_after_s=self.settings.retry_after_s,
                )
            job.was_resent = True
            self.on_event(job.model, "resent")

    def _withheld_s(self, named_s: float | None) -> float:
        """How long a refusal withholds the node's credit: the retry_after_s it named, within
        [gateway.retry_after_s, MAX_NODE_RETRY_AFTER_S] (a node naming none, or nonsense, gets the least)."""
        least_s = self.settings.retry_after_s
        if named_s is None or math.isnan(named_s):
            return least_s
        return min(max(named_s, least_s), max(MAX_NODE_RETRY_AFTER_S, least_s))

    def _refusal(self, job: Job, answer: Answer) -> Refused | None:
        """Why a 200 cannot be accepted (None: verified, its proof set on the answer); checked once."""
        if self.verify is None or answer.proof is not None:
            return None
        if answer.refusal is None:
            try:
                answer.proof = self.verify(job, answer)
            except Refused as exc:
                answer.refusal = exc
        return answer.refusal

    async def _attempt(self, job: Job, node: NodeView) -> Answer | None:
        """One send and its outcome: the answer (its node's, or an earlier attempt's that settled the job),
        or None when the node was lost or timed out meanwhile."""
        number = len(job.attempts)
        attempt = Attempt(
            job,
            node,
            f"{job.id}/{number}/{secrets.token_urlsafe(NONCE_BYTES)}".encode(),
            time.perf_counter(),
            asyncio.get_running_loop().create_future(),
            number,
        )
        message = Outbound(
            NodeTopics(self.settings.topic_root, node.site, node.node).command("infer", job.model),
            job.body,
            expiry_s=self.settings.job_timeout_s,
            correlation=attempt.correlation,
            response_topic=f"{self.reply_base}/{job.buyer}/{job.id}",
        )
        if job.header_length is not None:
            message.user[HEADER_LENGTH] = str(job.header_length)
        self.credit.take(node, job.model, job.rows)
        try:
            self.publish(message)
        except BaseException:
            self.credit.release(node, job.model, job.rows)
            raise
        drops = self.link_drops()
        job.attempts.append(attempt)
        self._attempts[attempt.correlation] = attempt
        self._by_node.setdefault((node.site, node.node), set()).add(attempt)
        node.count(job.model, "sent")
        # A timer on the reply itself: cheaper per job than asyncio.timeout's scope around the await.
        timer = asyncio.get_running_loop().call_later(self.settings.job_timeout_s, _expire, attempt.reply)
        answer: Answer | None = None
        try:
            answer = await attempt.reply
        except TimedOut:
            if not self.was_away(drops):
                self.credit.withhold(node, job.model, self.settings.timeout_withhold_s)
        except NodeLost:
            pass
        finally:
            timer.cancel()
            if answer is not None and answer.attempt != number:
                self._hold(attempt, drops)  # an earlier attempt settled the job: its node still works
            else:
                self._let_go(attempt)
        return answer

    def _hold(self, attempt: Attempt, drops: int) -> None:
        """Keep a superseded attempt's rows until its node answers it, its timeout fires or it is lost."""
        loop = asyncio.get_running_loop()
        attempt.reply = loop.create_future()
        left_s = attempt.sent_s + self.settings.job_timeout_s - time.perf_counter()
        timer = loop.call_later(max(left_s, 0.0), _expire, attempt.reply)
        attempt.reply.add_done_callback(functools.partial(self._held_ended, attempt, timer, drops))
        self._held[attempt.correlation] = attempt

    def _held_ended(
        self, attempt: Attempt, timer: asyncio.TimerHandle, drops: int, reply: asyncio.Future[Answer]
    ) -> None:
        timer.cancel()
        self._held.pop(attempt.correlation, None)
        timed_out = not reply.cancelled() and isinstance(reply.exception(), TimedOut)
        if timed_out and not self.was_away(drops):
            self.credit.withhold(attempt.node, attempt.job.model, self.settings.timeout_withhold_s)
        self._let_go(attempt)

    def _let_go(self, attempt: Attempt) -> None:
        """The attempt's node is done with it: its rows come back."""
        node = attempt.node
        self.credit.release(node, attempt.job.model, attempt.job.rows)
        key = (node.site, node.node)
        held = self._by_node.get(key)
        if held is not None:
            held.discard(attempt)
            if not held:
                del self._by_node[key]

    def answered(self, message: Inbound, received_s: float) -> None:
        """An answer from a node (on the loop); late duplicates are counted, recorded and dropped."""
        correlation = message.correlation or b""
        attempt = self._attempts.get(correlation)
        if attempt is None or attempt.job.is_done:
            self.late_answers += 1
            held = self._held.get(correlation)
            finished = self._finished.get(correlation)
            may_verify = self._may_verify(correlation)
            if held is None and (finished is None or not may_verify):
                return
            answer = answer_of(message, finished or held)  # type: ignore[arg-type]
            if held is not None and not held.reply.done():
                held.reply.set_result(answer)  # its node is done with the job now
            if finished is not None and may_verify:
                self._late(finished, answer)
            return
        job = attempt.job
        if not self._may_verify(correlation):
            self.unverified_answers += 1  # unread, unlogged: its attempt had its share of them
            return
        answer = answer_of(message, attempt)
        current = job.current
        if answer.status == 200 and isinstance(self._refusal(job, answer), Unverified):
            # not its node's answer, as far as anyone can tell: logged once per attempt
            self._noise(job, attempt.node, answer.refusal, is_first=correlation not in self._unverified_bytes)
            if self._unread(correlation, answer) >= NOISE_WITHHOLD_BYTES:
                self.credit.withhold(attempt.node, job.model, self.settings.timeout_withhold_s)
        elif attempt is current and not attempt.reply.done():
            attempt.reply.set_result(answer)
        elif answer.status == 200 and current is not None and not current.reply.done():
            # An earlier node answered after all: take its answer if it verifies. One that does not is
            # only late: the current node, still working on the job, must not answer for it.
            if self._refusal(job, answer) is None:
                current.reply.set_result(answer)
            else:
                self.late_answers += 1
                self._unread(correlation, answer)
        else:
            self.late_answers += 1
            self._late(attempt, answer)

    def _may_verify(self, correlation: bytes) -> bool:
        """Whether an answer under `correlation` may still be read: none under it was taken or recorded,
        and those read and not taken came to less than MAX_UNVERIFIED_BYTES."""
        return self._unverified_bytes.get(correlation, 0) < MAX_UNVERIFIED_BYTES

    def _unread(self, correlation: bytes, answer: Answer) -> int:
        """A 200 under `correlation` was not taken: the JSON read of it counts against the attempt (none
        where it was past what a node writes, which is refused unread), and a KiB for the message itself,
        so that a flood of empty ones ends too. Unread junk cannot use up the room of the node's own
        answer."""
        payload_bytes = len(answer.payload)
        read = payload_bytes if answer.header_length is None else min(answer.header_length, payload_bytes)
        if read > MAX_ANSWER_JSON_BYTES:
            read = 0
        spent = self._unverified_bytes.get(correlation, 0) + read + MESSAGE_BYTES
        self._unverified_bytes[correlation] = spent
        return spent

    def _noise(self, job: Job, node: NodeView, why: object, *, is_first: bool) -> None:
        """A 200 under a live attempt's CorrelationData that cannot be verified: counted, logged, and
        not refused or recorded against the node (only the node it names would be hurt, and the nonce
        could have leaked); only megabytes of it withhold the node's credit (NOISE_WITHHOLD_BYTES)."""
        self.unverified_answers += 1
        node.count(job.model, "unverified")
        self.on_event(job.model, "unverified_answer")
        log.log(
            logging.INFO if is_first else logging.DEBUG,
            "unverified answer to an attempt of job %s (sent to node %s) ignored: %s",
            job.id,
            node.name,
            why,
        )

    def _late(self, attempt: Attempt | Finished, answer: Answer) -> None:
        """An answer after its job was settled: a 200 that verifies is recorded, once per attempt."""
        if answer.status != 200:
            return
        correlation = attempt.correlation
        if self._refusal(attempt.job, answer) is None:
            self._unverified_bytes[correlation] = MAX_UNVERIFIED_BYTES
            self.on_late(attempt.job, answer)
        else:
            self._unread(correlation, answer)

    def sweep(self, nodes: Iterable[tuple[str, str]] | None = None) -> None:
        """Fail the attempts held by lost nodes (offline or silent; `NodeView.is_lost`): of `nodes` (site,
        node) only, or of every node holding one. Calls in one turn of the loop make one check, in the
        next turn (a node's flood of state messages costs one check of its own attempts)."""
        if nodes is None:
            self._sweep_all = True
        else:
            self._sweep_nodes.update(nodes)
        if self._sweep_due is None:
            self._sweep_due = asyncio.get_running_loop().call_soon(self._swept)

    def _swept(self) -> None:
        self._sweep_due = None
        everyone, nodes = self._sweep_all, self._sweep_nodes
        self._sweep_all, self._sweep_nodes = False, set()
        now_s = self.credit.clock()
        held = list(self._by_node.values()) if everyone else [self._by_node.get(key) for key in nodes]
        for attempts in held:
            for attempt in list(attempts or ()):
                if not attempt.reply.done() and attempt.node.is_lost(now_s):
                    attempt.reply.set_exception(NodeLost())

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            self.sweep()
