"""Buyer jobs to nodes: credit, refusals that move a job, failover once, exactly one answer per job.

Runs on the event loop. Each send of a job is an attempt with its own CorrelationData
(`<job>/<n>/<nonce>`, the nonce random: only the node the attempt went to can answer it); answers come
back from the link. The buyer gets the first success of any attempt; every later answer, and any
answer after the job is over, is a late duplicate and is dropped. Nothing waits in a queue: a job either
finds a node with credit now or its buyer gets 503 + Retry-After now. A 200 counts only once its
signature verifies (`verify`). One that cannot be verified may come from any peer on the broker: it is
counted as noise and the attempt goes on waiting for its node's answer. One the node signed but that is
wrong (verify.Refused) bars that node and moves the job on, as a refusal does.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from appliance import errors
from appliance.platform.attempts import Answer, Attempt, Finished, Job, answer_of
from appliance.platform.credit import CreditBook
from appliance.platform.settings import GatewaySettings
from appliance.platform.verify import Proof, Refused, Unverified
from appliance.platform.view import NodeView
from appliance.pool.topics import NodeTopics
from appliance.pool.wire import HEADER_LENGTH, Inbound, Outbound

log = logging.getLogger(__name__)

REFUSALS = (403, 404, 429, 503)  # the node will not run it: move the job, withhold the node's credit
BUYER_ERRORS = (400, 413)  # the job itself is wrong: the buyer hears it as the node said it
FINISHED_KEPT = 10_000  # finished attempts remembered (2 job timeouts at most): a late answer is recorded
NONCE_BYTES = 12  # of each attempt's CorrelationData: 96 random bits no other node can guess


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
    ) -> None:
        self.settings = settings
        self.credit = credit
        self.publish = publish
        self.reply_base = reply_base
        self.on_event = on_event
        self.verify = verify
        self.on_refused = on_refused  # a 200 the node signed but that is wrong: recorded, the node checked
        self.on_late = on_late  # a 200 after its job was over: recorded, never billed
        self.late_answers = 0
        self.unverified_answers = 0  # 200s that could not be verified: noise, held against nobody
        self._jobs: dict[str, Job] = {}
        self._attempts: dict[bytes, Attempt] = {}
        self._finished: OrderedDict[bytes, Finished] = OrderedDict()
        self._by_node: dict[tuple[str, str], set[Attempt]] = {}

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
        try:
            return await self._run(job)
        finally:
            job.is_done = True
            self._jobs.pop(job.id, None)
            self._remember(job)
            job.attempts.clear()  # each refers to the job: freed now, not by the cycle collector

    def _remember(self, job: Job) -> None:
        """Keep a finished job's attempts (without its body) for as long as a late answer may come."""
        for attempt in job.attempts:
            self._attempts.pop(attempt.correlation, None)
            self._finished[attempt.correlation] = Finished.of(attempt)
        oldest_s = time.perf_counter() - 2 * self.settings.job_timeout_s
        while self._finished and (
            len(self._finished) > FINISHED_KEPT or next(iter(self._finished.values())).sent_s < oldest_s
        ):
            self._finished.popitem(last=False)

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
        while True:
            node = self._pick(job, barred)
            if node is None and job.target is not None:
                why = (
                    job.target.refusal(job.model, self.credit.clock(), is_check=True)
                    or "not one of its files"
                )
                raise errors.NoPoolCapacity(f"node {job.target.name} cannot take the {job.kind} now: {why}")
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
            if answer is not None and answer.status in BUYER_ERRORS:
                self.on_event(job.model, "bad_job")
                return answer
            barred.add((node.site, node.node))
            if answer is not None and answer.status in REFUSALS:
                node.count(job.model, "refused")
                self.on_event(job.model, "refused")
                self.credit.withhold(node, job.model, answer.retry_after_s or self.settings.retry_after_s)
                moves += 1
                if moves > self.settings.max_refusal_moves:
                    raise errors.NoPoolCapacity(
                        f"{moves} nodes refused the job for model {job.model!r}",
                        retry_after_s=self.credit.retry_after_s(job.model, self.settings.retry_after_s),
                    )
                continue
            node.count(job.model, "lost")  # offline, past the timeout, or a 5xx from the node
            if job.was_resent:
                self.on_event(job.model, "lost")
                raise JobLost(
                    f"the job for model {job.model!r} was lost by two nodes (offline or past "
                    f"{self.settings.job_timeout_s:g} s)",
                    retry_after_s=self.settings.retry_after_s,
                )
            job.was_resent = True
            self.on_event(job.model, "resent")

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
        """One send and its outcome: the node's answer, or None when the node was lost meanwhile."""
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
        key = (node.site, node.node)
        try:
            self.publish(message)
        except BaseException:
            self.credit.release(node, job.model, job.rows)
            raise
        job.attempts.append(attempt)
        self._attempts[attempt.correlation] = attempt
        self._by_node.setdefault(key, set()).add(attempt)
        node.count(job.model, "sent")
        # A timer on the reply itself: cheaper per job than asyncio.timeout's scope around the await.
        timer = asyncio.get_running_loop().call_later(self.settings.job_timeout_s, _expire, attempt.reply)
        try:
            return await attempt.reply
        except TimedOut:
            self.credit.withhold(node, job.model, self.settings.timeout_withhold_s)
            return None
        except NodeLost:
            return None
        finally:
            timer.cancel()
            self.credit.release(node, job.model, job.rows)
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
            finished = self._finished.get(correlation)
            if finished is not None:
                self._late(finished, answer_of(message, finished))
            return
        job = attempt.job
        answer = answer_of(message, attempt)
        current = job.current
        if answer.status == 200 and isinstance(self._refusal(job, answer), Unverified):
            self._noise(job, answer)  # not its node's answer, as far as anyone can tell: wait for that
        elif attempt is current and not attempt.reply.done():
            attempt.reply.set_result(answer)
        elif answer.status == 200 and current is not None and not current.reply.done():
            # An earlier node answered after all: take its answer if it verifies. One that does not is
            # only late: the current node, still working on the job, must not answer for it.
            if self._refusal(job, answer) is None:
                current.reply.set_result(answer)
            else:
                self.late_answers += 1
        else:
            self.late_answers += 1
            self._late(attempt, answer)

    def _noise(self, job: Job, answer: Answer) -> None:
        """A 200 under a live attempt's CorrelationData that cannot be verified: counted, logged, and
        held against nobody (only the node it names would be hurt, and anyone could have sent it)."""
        self.unverified_answers += 1
        answer.node.count(job.model, "unverified")
        self.on_event(job.model, "unverified_answer")
        log.info(
            "unverified answer to attempt %s (sent to node %s) ignored: %s",
            answer.job_id,
            answer.node.name,
            answer.refusal,
        )

    def _late(self, attempt: Attempt | Finished, answer: Answer) -> None:
        if answer.status == 200 and self._refusal(attempt.job, answer) is None:
            self.on_late(attempt.job, answer)

    def sweep(self) -> None:
        """Fail every attempt held by a node that is no longer live (offline or silent)."""
        now_s = self.credit.clock()
        for attempts in list(self._by_node.values()):
            for attempt in list(attempts):
                if not attempt.node.is_live(now_s) and not attempt.reply.done():
                    attempt.reply.set_exception(NodeLost())

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            self.sweep()
