"""Receipts from answers: built and signed with the gateway key here, committed by the ledger thread."""

from __future__ import annotations

import asyncio
import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.platform import receipts
from appliance.platform.attempts import Answer, Job
from appliance.platform.ledger import now_ms
from appliance.platform.receipts import Receipt
from appliance.platform.verify import MAX_SESSION
from appliance.platform.writer import LedgerWriter
from appliance.pool import signing

log = logging.getLogger(__name__)
DEFAULT_SLO_MS = 100.0


class Metering:
    """Turns a job's answer into its signed receipt; `commit` waits for it, `record` does not."""

    def __init__(self, writer: LedgerWriter, key: Ed25519PrivateKey, gateway_id: str) -> None:
        self.writer = writer
        self.sign = receipts.signer(key)
        self.gateway_id = gateway_id
        self._pending: set[asyncio.Task[None]] = set()

    def receipt(
        self,
        job: Job,
        answer: Answer,
        verdict: str,
        *,
        detail: str = "",
        statement: signing.Statement | None = None,
        signature: str = "",
    ) -> Receipt:
        """The signed receipt of one answered attempt; billed only for a buyer's accepted answer.

        The node's figures come from a statement verify.check let through (its session, file and times
        are in bounds and fit the gateway's own latency); a refused answer whose figures could not be
        recorded as they are comes without one, and its receipt holds none of them (the detail quotes
        them)."""
        proof = answer.proof
        statement = statement or (proof.statement if proof is not None else None)
        signature = signature or (proof.signature if proof is not None else "")
        node = answer.node
        slo_ms = float(node.model_birth(job.model).get("slo_p99_ms") or DEFAULT_SLO_MS)
        queue_ms = statement.queue_ms if statement else 0.0
        compute_ms = statement.compute_ms if statement else 0.0
        return Receipt.signed_with(
            self.sign,
            job_id=answer.job_id,
            job=job.id,
            attempt=answer.attempt,
            kind=job.kind,
            billed=job.kind == receipts.BUYER and verdict == receipts.ACCEPTED,
            buyer=job.buyer,
            node=node.name,
            session=statement.session if statement else min(max(node.session, 0), MAX_SESSION),
            model=job.model,
            model_sha256=statement.model_sha256 if statement else "",
            rows=job.rows,
            input_sha256=job.input_sha256,
            output_sha256=statement.output_sha256 if statement else "",
            queue_ms=float(queue_ms),
            compute_ms=float(compute_ms),
            latency_ms=round(answer.latency_ms, 3),
            slo_ms=slo_ms,
            slo_met=statement is not None and queue_ms + compute_ms <= slo_ms,
            node_signature=signature,
            verdict=verdict,
            detail=detail[:2000].replace("\x00", "\\0"),  # PostgreSQL text holds no NUL
            gateway=self.gateway_id,
            created_ms=now_ms(),
        )

    async def commit(self, receipt: Receipt) -> None:
        """Return once the receipt is in the ledger (LedgerUnavailable when it cannot be)."""
        await self.writer.commit(receipt)

    def record(self, receipt: Receipt) -> None:
        """Commit in the background: receipts no buyer waits for (checks, refusals, late answers)."""
        task = asyncio.get_running_loop().create_task(self._record(receipt))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _record(self, receipt: Receipt) -> None:
        try:
            await self.writer.commit(receipt)
        except Exception as exc:  # noqa: BLE001 - nobody waits: said in the log
            log.error("ledger: receipt %s not written: %s", receipt.job_id, exc)

    async def drain(self) -> None:
        """Wait for background receipts (at stop)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=10.0)
