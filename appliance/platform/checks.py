"""Evidence that answers are right: canary jobs and second opinions, compared within stated tolerances.

After a buyer's job is answered, with probability `canary.probability` the gateway sends a canary for
the same model: as many rows as the buyer's job, drawn afresh from the golden samples (golden.py),
under the same buyer's reply topic and in the same encoding, so that it looks like any buyer job. Its
expected outputs come from a trusted run of the file the answering node serves; the two must agree
within the catalogue's tolerance for the pair (node's precision/class, the same precision/cpu). With
probability `canary.second_opinion_probability` the buyer's job is also sent to another node and the
two answers compared within the tolerance for their pair; when they disagree, a trusted run of each
node's file decides which is wrong, and with no trusted copy the two answers are recorded as disputed.
A failed check quarantines the node (trust.py); a passed canary frees one. Quarantined nodes get a
canary every `canary.recheck_interval_s`, their only way back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from appliance import errors
from appliance.platform import receipts
from appliance.platform.attempts import Answer, Job
from appliance.platform.catalogue import Catalogue, Entry, provider_class
from appliance.platform.dispatch import Dispatcher
from appliance.platform.golden import Golden, References, exposure
from appliance.platform.ledger import KEY
from appliance.platform.metering import Metering
from appliance.platform.settings import CanarySettings
from appliance.platform.trust import Trust
from appliance.platform.view import NodeView
from appliance.pool import signing
from appliance.pool.wire import MAX_JSON_BYTES
from appliance.protocol import codec

log = logging.getLogger(__name__)


def precision_class(node: NodeView, model: str) -> str:
    """ "precision/provider class" of the node's model, as its birth says: the key of tolerances."""
    born = node.model_birth(model)
    return f"{born.get('precision', 'fp32')}/{provider_class(str(born.get('provider', 'cpu')))}"


def compare(
    expected: dict[str, np.ndarray], got: dict[str, np.ndarray], atol: float, rtol: float
) -> list[str]:
    """What differs beyond |got - expected| <= atol + rtol * |expected|, one line per output."""
    problems = []
    for name, want in expected.items():
        have = got.get(name)
        if have is None or have.shape != want.shape:
            shape = None if have is None else list(have.shape)
            problems.append(f"output {name!r}: shape {shape}, expected {list(want.shape)}")
        elif want.dtype.kind in "fc" or have.dtype.kind in "fc":
            diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
            wrong = ~(diff <= atol + rtol * np.abs(want.astype(np.float64)))
            if wrong.any():
                problems.append(
                    f"output {name!r}: {int(wrong.sum())} of {want.size} values differ beyond atol {atol:g}"
                    f" + rtol {rtol:g}, by up to {float(np.nanmax(np.where(wrong, diff, 0.0))):.3g}"
                )
        elif not np.array_equal(have, want):
            problems.append(f"output {name!r}: {int((have != want).sum())} of {want.size} values differ")
    return problems


class Checks:
    """Canaries and second opinions for one gateway; every check runs in its own task."""

    def __init__(
        self,
        settings: CanarySettings,
        catalogue: Catalogue,
        dispatcher: Dispatcher,
        metering: Metering,
        trust: Trust,
        *,
        count: Any = lambda model, outcome: None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.dispatcher = dispatcher
        self.metering = metering
        self.trust = trust
        self.count = count
        self.rng = rng or np.random.default_rng()
        self.references = References()
        self.golden = {  # canaries need golden inputs and a trusted copy to compute references with
            name: Golden(entry.samples)
            for name, entry in (catalogue.entries or {}).items()
            if entry.samples is not None and entry.model_files
        }
        for name, golden in self.golden.items():
            why = exposure(golden.path, self._entry(name).files)
            if why is not None:
                log.warning(
                    "model %r: nodes can tell its canaries from buyer work, as their golden samples %s "
                    "are not secret: %s. Draw golden samples like buyers' inputs and keep them on the "
                    "gateway only; until then, only second opinions check the answers buyers get",
                    name,
                    golden.path,
                    why,
                )
        self._buyer = "anonymous"  # the last buyer seen: a recheck canary goes under a real buyer's name
        self._tasks: set[asyncio.Task[None]] = set()

    def after(
        self,
        job: Job,
        answer: Answer,
        inputs: dict[str, np.ndarray],
        asked: frozenset[str] | None = None,
    ) -> None:
        """A buyer's job was answered: maybe a canary, maybe a second opinion. `asked`: the outputs the
        buyer asked for (None: all of them), which are all a second opinion's referee compares."""
        self._buyer = job.buyer
        if job.model in self.golden and self.rng.random() < self.settings.probability:
            binary = job.header_length is not None
            canary = self.canary(
                job.model,
                job.rows,
                job.buyer,
                binary=binary,
                binary_output=job.asks_binary_output,
                outputs=job.outputs,
            )
            self._spawn(canary)
        if self.rng.random() < self.settings.second_opinion_probability:
            self._spawn(self.second_opinion(job, answer, inputs, asked))

    async def canary(
        self,
        model: str,
        rows: int,
        buyer: str,
        *,
        binary: bool = True,
        binary_output: bool | None = None,
        outputs: frozenset[str] | None = None,
        target: NodeView | None = None,
    ) -> str | None:
        """Send one canary, as the buyer job before it travelled: inputs and outputs as binary or JSON
        (`binary_output` None: as `binary`), the same outputs named (None: all); its verdict (None when
        no node took it). Inputs go binary where their JSON would pass what a node parses of a
        stranger's (pool.wire.MAX_JSON_BYTES). Only the outputs named are compared."""
        entry = self._entry(model)
        inputs = self.golden[model].draw(rows, self.rng, self.settings.perturbation)
        binary_output = binary if binary_output is None else binary_output
        named = None if outputs is None else sorted(outputs)
        encoded = codec.encode_request(inputs, binary=binary, binary_output=binary_output, outputs=named)
        if encoded.header_length is None and len(encoded.body()) > MAX_JSON_BYTES:
            encoded = codec.encode_request(inputs, binary=True, binary_output=binary_output, outputs=named)
        files = frozenset(entry.model_files)  # only nodes serving a file the gateway holds a copy of
        job = Job(
            model,
            buyer,
            encoded.body(),
            encoded.header_length,
            rows,
            files,
            kind=receipts.CANARY,
            target=target,
            outputs=outputs,
        )
        job.input_sha256 = signing.tensor_digest(inputs)
        answer = await self._run(job)
        if answer is None or answer.proof is None:
            return None
        node = answer.node
        path = entry.model_files[answer.proof.statement.model_sha256]  # verify checked it is one of them
        expected = await asyncio.to_thread(self.references.run, path, inputs)
        if outputs is not None:
            expected = {name: array for name, array in expected.items() if name in outputs}
        mine = precision_class(node, model)
        problems = compare(
            expected, answer.proof.outputs, *entry.tolerance(mine, f"{mine.partition('/')[0]}/cpu")
        )
        verdict = receipts.CANARY_FAILED if problems else receipts.CANARY_PASSED
        detail = "; ".join(problems)
        self.metering.record(self.metering.receipt(job, answer, verdict, detail=detail))
        self.count(model, verdict)
        if verdict == receipts.CANARY_PASSED:
            await self.trust.passed(node)
        else:
            self.trust.fail(node, f"canary failed on model {model!r}: {detail}")
        return verdict

    async def second_opinion(
        self, first: Job, answer: Answer, inputs: dict[str, np.ndarray], asked: frozenset[str] | None = None
    ) -> str | None:
        """Run a buyer's job again on another node and compare; the verdict (None: no other node)."""
        assert answer.proof is not None
        job = Job(first.model, first.buyer, first.body, first.header_length, first.rows, first.files,
                  input_sha256=first.input_sha256, outputs=first.outputs, kind=receipts.SECOND_OPINION,
                  excluded=frozenset({(answer.node.site, answer.node.node)}))  # fmt: skip
        other = await self._run(job)
        if other is None or other.proof is None:
            return None
        pair = (precision_class(answer.node, first.model), precision_class(other.node, first.model))
        entry = self._entry(first.model)
        problems = compare(answer.proof.outputs, other.proof.outputs, *entry.tolerance(*pair))
        verdict, detail = receipts.AGREED, f"agrees with {answer.node.name} ({answer.job_id})"
        if problems:
            pair_of = (answer, other)
            verdict, detail = await self._referee(entry, first.model, inputs, pair_of, problems, asked)
        self.metering.record(self.metering.receipt(job, other, verdict, detail=detail))
        self.count(first.model, verdict)
        return verdict

    async def _referee(
        self,
        entry: Entry,
        model: str,
        inputs: dict[str, np.ndarray],
        answers: tuple[Answer, Answer],
        problems: list[str],
        asked: frozenset[str] | None = None,
    ) -> tuple[str, str]:
        """Two answers disagree: a trusted run of each node's file says which node is wrong, on the
        outputs the buyer asked for (`asked`; None: all)."""
        said = f"differs from {answers[0].node.name} ({answers[0].job_id}): {'; '.join(problems)}"
        judged = []
        for answer in answers:
            assert answer.proof is not None
            path = entry.model_files.get(answer.proof.statement.model_sha256)
            if path is None:
                return (
                    receipts.DISPUTED,
                    f"{said}; no trusted copy of file {answer.proof.statement.model_sha256}",
                )
            expected = await asyncio.to_thread(self.references.run, path, inputs)
            if asked is not None:
                expected = {name: value for name, value in expected.items() if name in asked}
            mine = precision_class(answer.node, model)
            wrong = compare(
                expected, answer.proof.outputs, *entry.tolerance(mine, f"{mine.partition('/')[0]}/cpu")
            )
            if wrong:
                self.trust.fail(answer.node, f"second opinion on model {model!r}: {'; '.join(wrong)}")
                judged.append(answer.node.name)
        return receipts.DISAGREED, f"{said}; wrong by a trusted run: {', '.join(judged) or 'neither'}"

    async def recheck_forever(self) -> None:
        """Every recheck interval, a canary for each quarantined node that could pass one. What one node
        published never ends the loop: a node whose offer cannot be read is skipped, and logged."""
        while True:
            await asyncio.sleep(self.settings.recheck_interval_s)
            now_s = self.dispatcher.credit.clock()
            for node in self.trust.view.nodes():
                try:
                    self._recheck(node, now_s)
                except Exception:  # the next node, and the next round, still get theirs
                    log.exception("recheck of node %s skipped", node.name)

    def _recheck(self, node: NodeView, now_s: float) -> None:
        record = self.trust.records.get(node.name)
        if node.quarantine is None or (record is not None and record.quarantine_kind == KEY):
            return
        model = next((m for m in self.golden if node.offer(m, now_s, is_check=True)), None)
        if model is not None:
            self._spawn(self.canary(model, 1, self._buyer, target=node))

    def _entry(self, model: str) -> Entry:
        entries = self.catalogue.entries or {}
        return entries.get(model) or Entry(model, frozenset())

    async def _run(self, job: Job) -> Answer | None:
        try:
            return await self.dispatcher.run(job)
        except errors.ApplianceError as exc:
            log.info("%s for model %s not run: %s", job.kind, job.model, exc)
            return None

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("check failed to run: %r", task.exception())
