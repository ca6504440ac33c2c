"""The ledger per node and model: what `appliance platform ledger` prints and bills from.

`jobs`, `rows`, `compute_s` and `slo_met_pct` count billed receipts only (a buyer's job, once, for
the answer the buyer got). `compute_s` is what the gateway can stand behind: each job's `compute_ms` as
the node signed it, but never more than the gateway's own `latency_ms` for it (send to answer) nor less
than 0 (gateways refuse such claims; this also bounds any receipt a gateway wrote before they did).
`flagged_jobs` are billed jobs done since a check the node later failed: hold them back from payment.
`unbilled_answers` are answers recorded but never billed: canaries, second opinions, late duplicates of
re-sent jobs and refused answers (signed by the node, but wrong).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, select

from appliance.platform import receipts as kinds
from appliance.platform.ledger import Ledger
from appliance.platform.schema import receipts


def summary(ledger: Ledger, since_ms: int | None = None, until_ms: int | None = None) -> list[dict[str, Any]]:
    """One row per (node, model) with receipts between the two times (ms since the epoch)."""
    c = receipts.c

    def count(condition: Any) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    def billed(value: Any) -> Any:
        return func.coalesce(func.sum(case((c.billed.is_(True), value), else_=0)), 0)

    # min(max(compute_ms, 0), latency_ms) in SQL both databases speak
    compute_ms = case(
        (c.compute_ms > c.latency_ms, c.latency_ms), (c.compute_ms < 0, 0.0), else_=c.compute_ms
    )

    query = (
        select(
            c.node,
            c.model,
            count(c.billed.is_(True)).label("jobs"),
            billed(c.rows).label("rows"),
            billed(compute_ms).label("compute_ms"),
            count(c.billed.is_(True) & c.slo_met.is_(True)).label("slo_met"),
            count((c.kind == kinds.CANARY) & (c.verdict == kinds.CANARY_PASSED)).label("canaries_passed"),
            count((c.kind == kinds.CANARY) & (c.verdict == kinds.CANARY_FAILED)).label("canaries_failed"),
            count(c.billed.is_(True) & c.flagged.is_(True)).label("flagged_jobs"),
            count(c.billed.is_(False)).label("unbilled_answers"),
        )
        .group_by(c.node, c.model)
        .order_by(c.node, c.model)
    )
    if since_ms is not None:
        query = query.where(c.created_ms >= since_ms)
    if until_ms is not None:
        query = query.where(c.created_ms < until_ms)
    with ledger.engine.connect() as connection:
        found = connection.execute(query).mappings().all()
    rows = []
    for row in found:
        jobs = int(row["jobs"])
        rows.append(
            {
                "node": row["node"],
                "model": row["model"],
                "jobs": jobs,
                "rows": int(row["rows"]),
                "compute_s": round(float(row["compute_ms"]) / 1e3, 3),
                "slo_met_pct": round(100.0 * int(row["slo_met"]) / jobs, 2) if jobs else None,
                "canaries_passed": int(row["canaries_passed"]),
                "canaries_failed": int(row["canaries_failed"]),
                "flagged_jobs": int(row["flagged_jobs"]),
                "unbilled_answers": int(row["unbilled_answers"]),
            }
        )
    return rows
