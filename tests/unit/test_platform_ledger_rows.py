"""One receipt the database will not hold fails alone: the others committed with it are kept (SQLite and
PostgreSQL); and the ledger report bills no more compute than the gateway saw."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_databases import KINDS, ledger_url, writer_held
from sqlalchemy import select, text
from test_platform_ledger import receipt

from appliance.platform import schema
from appliance.platform.ledger import Ledger
from appliance.platform.report import summary
from appliance.platform.writer import LedgerUnavailable, LedgerWriter
from appliance.pool import identity

KEY = identity.generate()


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with ledger_url(request.param, tmp_path) as found:
        yield found


# A row each database refuses (SQLite checks no length and holds NUL; PostgreSQL holds NaN).
BAD_ROWS = [
    pytest.param("sqlite", {"session": 2**63}, id="sqlite-session-2^63"),
    pytest.param("postgresql", {"session": 2**63}, id="postgresql-session-2^63"),
    pytest.param("sqlite", {"queue_ms": float("nan")}, id="sqlite-queue_ms-NaN"),
    pytest.param("postgresql", {"model_sha256": "x" * 65}, id="postgresql-model_sha256-of-65"),
    pytest.param("postgresql", {"detail": "a\x00b"}, id="postgresql-NUL-in-detail"),
]


async def committed_together(writer: LedgerWriter, receipts: list[object]) -> list[BaseException | None]:
    """Commit the receipts in one group: the writer is held until every one of them waits for it."""
    async with writer_held(writer):
        waiting = [asyncio.ensure_future(writer.commit(r)) for r in receipts]  # type: ignore[arg-type]
        while writer.waiting < len(receipts):
            await asyncio.sleep(0)  # each commit queues its receipt on its first step
    return await asyncio.gather(*waiting, return_exceptions=True)


@pytest.mark.asyncio
@pytest.mark.parametrize(("kind", "changes"), BAD_ROWS)
async def test_a_receipt_the_database_refuses_fails_alone(
    tmp_path: Path, kind: str, changes: dict[str, object]
) -> None:
    with ledger_url(kind, tmp_path) as url:
        await commit_with_a_bad_row(url, changes)


async def commit_with_a_bad_row(url: str, changes: dict[str, object]) -> None:
    writer = LedgerWriter(Ledger.open(url))
    try:
        receipts = [receipt(f"good{i}/0").signed(KEY) for i in range(3)]
        receipts.insert(1, receipt("evil/0", billed=False, **changes).signed(KEY))
        groups = writer.groups
        outcomes = await committed_together(writer, receipts)
        assert [type(o).__name__ for o in outcomes] == [
            "NoneType",
            "LedgerUnavailable",
            "NoneType",
            "NoneType",
        ]
        assert isinstance(outcomes[1], LedgerUnavailable)
        assert writer.committed == 3 and writer.groups == groups + 1  # one transaction still
        with writer.ledger.engine.connect() as connection:
            found = connection.execute(select(schema.receipts.c.job_id).order_by("job_id")).scalars().all()
        assert found == ["good0/0", "good1/0", "good2/0"]
        # And the writer goes on, grouping again.
        await asyncio.gather(*(writer.commit(receipt(f"after{i}/0").signed(KEY)) for i in range(5)))
        assert writer.committed == 8
    finally:
        writer.close()


@pytest.mark.asyncio
async def test_a_group_the_database_itself_fails_is_failed_whole_not_row_by_row(tmp_path: Path) -> None:
    """A dropped connection is the database's failure, not a row's: every waiter of the group hears it
    at once (503, try again), and the next group reconnects."""
    name = f"ledger-rows-{uuid.uuid4().hex[:8]}"
    with ledger_url("postgresql", tmp_path) as url:
        writer = LedgerWriter(Ledger.open(f"{url}&application_name={name}"))
        try:
            await writer.commit(receipt("first/0").signed(KEY))  # the writer's connection is open
            with writer.ledger.engine.connect() as connection:
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
                connection.commit()
            outcomes = await committed_together(writer, [receipt(f"lost{i}/0").signed(KEY) for i in range(3)])
            assert all(isinstance(o, LedgerUnavailable) for o in outcomes), outcomes
            await writer.commit(receipt("next/0").signed(KEY))
            with writer.ledger.engine.connect() as connection:
                found = (
                    connection.execute(select(schema.receipts.c.job_id).order_by("job_id")).scalars().all()
                )
            assert found == ["first/0", "next/0"] and writer.committed == 2
        finally:
            writer.close()


def test_the_report_bills_no_more_compute_than_the_gateway_measured(url: str) -> None:
    """Receipts whose node claimed more compute than the gateway saw the job away, or less than none
    (as gateways before the check recorded them), are billed at the gateway's latency, or 0."""
    ledger = Ledger.open(url)
    try:
        ledger.write([
            receipt("honest/0", node="s/a", compute_ms=3.0, latency_ms=5.0),
            receipt("greedy/0", node="s/b", queue_ms=-1e12, compute_ms=1e12, latency_ms=12.0),
            receipt("negative/0", node="s/b", compute_ms=-7.0, latency_ms=4.0),
        ])  # fmt: skip
        figures = {row["node"]: row for row in summary(ledger)}
        assert figures["s/a"]["compute_s"] == 0.003
        assert figures["s/b"]["compute_s"] == 0.012 and figures["s/b"]["jobs"] == 2
    finally:
        ledger.close()
