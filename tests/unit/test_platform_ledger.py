"""The receipts ledger on SQLite and PostgreSQL: migrations, no duplicates, pins, quarantine and flags."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from ledger_databases import KINDS, ledger_url, writer_held
from sqlalchemy import select, text

from appliance.errors import ConfigError
from appliance.platform import receipts, schema
from appliance.platform.catalogue import Catalogue
from appliance.platform.ledger import CHECK, FILE, KEY, Ledger, engine_url
from appliance.platform.trust import BAD_KEY, Trust
from appliance.platform.view import PoolView
from appliance.platform.writer import LedgerWriter
from appliance.pool import identity, signing

KEY_A = "ed25519:" + "A" * 42 + "E="
KEY_B = "ed25519:" + "B" * 42 + "E="


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with ledger_url(request.param, tmp_path) as found:
        yield found


def receipt(
    job_id: str = "j1/0", node: str = "s/n1", created_ms: int = 1_000, **changes: object
) -> receipts.Receipt:
    fields: dict[str, object] = {
        "job_id": job_id, "job": job_id.split("/")[0], "attempt": 0, "kind": receipts.BUYER, "billed": True,
        "buyer": "acme", "node": node, "session": 3, "model": "m", "model_sha256": "a" * 64, "rows": 2,
        "input_sha256": "b" * 64, "output_sha256": "c" * 64, "queue_ms": 0.5, "compute_ms": 1.25,
        "latency_ms": 4.0, "slo_ms": 50.0, "slo_met": True, "node_signature": "sig",
        "verdict": receipts.ACCEPTED, "detail": "", "gateway": "gw-1", "created_ms": created_ms,
    }  # fmt: skip
    fields.update(changes)
    return receipts.Receipt(**fields)  # type: ignore[arg-type]


def test_a_file_path_is_sqlite_and_postgresql_goes_through_psycopg() -> None:
    assert engine_url("/var/lib/x/ledger.sqlite3") == "sqlite:////var/lib/x/ledger.sqlite3"
    assert engine_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(ConfigError, match=r"ledger 'mysql://h/db': expected a file path, sqlite:///PATH"):
        engine_url("mysql://h/db")


def test_receipts_are_written_once_and_signed_by_the_gateway(url: str, tmp_path: Path) -> None:
    ledger = Ledger.open(url)
    key = identity.device_key(tmp_path / "gw")
    signed = receipt().signed(key)
    ledger.write([signed, receipt("j2/0").signed(key)])
    ledger.write([replace(signed, rows=99)])  # the same job id again: no duplicate, no change
    with ledger.engine.connect() as connection:
        rows = [dict(r._mapping) for r in connection.execute(select(schema.receipts).order_by("job_id"))]
    assert [r["job_id"] for r in rows] == ["j1/0", "j2/0"]
    back = receipts.from_row(rows[0])
    assert back == signed and back.rows == 2
    public = signing.parse_public_key(signing.public_key_text(key))
    assert receipts.is_signed_by(back, public)
    assert not receipts.is_signed_by(replace(back, billed=False), public)  # break it: a changed bill
    ledger.close()


def test_migrations_run_once_and_a_newer_database_is_refused(url: str) -> None:
    ledger = Ledger.open(url)
    with ledger.engine.begin() as connection:
        assert schema.version(connection) == schema.VERSION
        assert schema.migrate(connection, url=url) == []  # a second gateway's start changes nothing
        connection.execute(schema.meta.update().values(value=str(schema.VERSION + 1)))
    ledger.close()
    with pytest.raises(
        ConfigError, match=rf"has schema version {schema.VERSION + 1}; this appliance knows up to"
    ):
        Ledger.open(url)


def test_a_key_is_pinned_when_first_seen_and_a_new_one_refused_until_trusted(url: str) -> None:
    ledger = Ledger.open(url)
    first = ledger.pin("s/n1", KEY_A)
    assert (first.public_key, first.quarantine) == (KEY_A, None)
    assert ledger.pin("s/n1", KEY_A).quarantine is None
    changed = ledger.pin("s/n1", KEY_B)
    assert (changed.public_key, changed.offered_key, changed.quarantine_kind) == (KEY_A, KEY_B, KEY)
    assert "refused until `appliance platform nodes trust s/n1`" in (changed.quarantine or "")
    assert ledger.passed("s/n1").quarantine_kind == KEY  # a passed check does not lift a key refusal
    ledger.quarantine("s/n1", "canary failed")
    assert ledger.nodes()[0].quarantine_kind == KEY  # nor is it replaced by another reason
    trusted = ledger.trust("s/n1")
    assert (trusted.public_key, trusted.offered_key, trusted.quarantine) == (KEY_B, None, None)
    with pytest.raises(ConfigError, match="node 's/n1' offers no new key; it is pinned to"):
        ledger.trust("s/n1")
    with pytest.raises(ConfigError, match="node 's/nx' is not in ledger"):
        ledger.trust("s/nx")
    ledger.close()


def test_quarantine_flags_receipts_since_the_last_passed_check(url: str, tmp_path: Path) -> None:
    ledger = Ledger.open(url)
    ledger.pin("s/n1", KEY_A)
    ledger.pin("s/n2", KEY_A)
    passed_ms = ledger.passed("s/n1").last_passed_ms
    assert passed_ms is not None
    ledger.write([
        receipt("before/0", created_ms=passed_ms - 10), receipt("after/0", created_ms=passed_ms + 10),
        receipt("other/0", node="s/n2", created_ms=passed_ms + 10),
    ])  # fmt: skip
    assert ledger.quarantine("s/n1", "canary failed: output differs", CHECK) == 1
    with ledger.engine.connect() as connection:
        flagged = dict(connection.execute(text("SELECT job_id, flagged FROM receipts")).all())
    assert flagged == {"before/0": False, "after/0": True, "other/0": False}
    record = ledger.nodes()[0]
    assert (record.quarantine, record.quarantine_kind) == ("canary failed: output differs", CHECK)
    assert ledger.passed("s/n1").quarantine is None  # passes again: free
    ledger.quarantine("s/n2", "serves another file", FILE)
    assert ledger.passed("s/n2").quarantine is None
    assert [r.node for r in ledger.nodes(since_ms=record.updated_ms + 10**9)] == []
    ledger.close()


@pytest.mark.asyncio
async def test_the_writer_commits_before_it_returns_and_groups_what_waits(url: str, tmp_path: Path) -> None:
    writer = LedgerWriter(Ledger.open(url))
    await asyncio.gather(*(writer.commit(receipt(f"j{i}/0")) for i in range(300)))
    assert writer.committed == 300 and writer.groups < 300
    record = await writer.call(writer.ledger.pin, "s/n1", KEY_A)
    assert record.public_key == KEY_A
    writer.close()
    if not url.startswith("postgresql"):
        with contextlib.closing(sqlite3.connect(url)) as connection:
            assert connection.execute("SELECT count(*) FROM receipts").fetchone()[0] == 300


def test_libsodiums_receipt_signatures_are_the_keys_own_ed25519_signatures(tmp_path: Path) -> None:
    """Receipts are signed on the loop with libsodium (receipts.signer): the very bytes OpenSSL makes
    with the same key, so any Ed25519 verifier reads them."""
    key = identity.device_key(tmp_path / "gw")
    fields = {name: getattr(receipt(), name) for name in receipts.SIGNED}
    made = receipts.Receipt.signed_with(receipts.signer(key), **fields)
    canonical = made.canonical()
    assert made.gateway_signature == base64.b64encode(key.sign(canonical)).decode()
    assert made == receipt().signed(key)
    assert receipts.is_signed_by(made, signing.parse_public_key(signing.public_key_text(key)))
    with pytest.raises(TypeError, match="a receipt signs exactly"):
        receipts.Receipt.signed_with(receipts.signer(key), **{**fields, "extra": 1})


def test_a_gateway_keeps_every_key_it_signed_with(url: str) -> None:
    ledger = Ledger.open(url)
    for key in (KEY_A, KEY_A, KEY_B):  # a restart with the same key, then a new state directory
        ledger.register_gateway("gw-1", key)
    with ledger.engine.connect() as connection:
        keys = connection.execute(select(schema.gateways.c.public_key).order_by("public_key")).scalars().all()
    assert keys == [KEY_A, KEY_B]
    ledger.close()


def test_a_lost_database_connection_fails_its_batch_and_the_next_one_reconnects(tmp_path: Path) -> None:
    name = f"ledger-test-{uuid.uuid4().hex[:8]}"
    with ledger_url("postgresql", tmp_path) as url:
        ledger = Ledger.open(f"{url}&application_name={name}")
        key = identity.device_key(tmp_path / "gw")
        ledger.write([receipt("j1/0").signed(key)])
        with ledger.engine.connect() as connection:  # the database drops every connection of the ledger
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            connection.commit()
        with pytest.raises(Exception, match=r"terminat|closed"):
            ledger.write([receipt("j2/0").signed(key)])
        ledger.write([receipt("j3/0").signed(key)])
        with ledger.engine.connect() as connection:
            found = connection.execute(select(schema.receipts.c.job_id).order_by("job_id")).scalars().all()
        assert found == ["j1/0", "j3/0"]
        ledger.close()


@pytest.mark.asyncio
async def test_a_waiter_cancelled_while_the_writer_is_busy_does_not_stop_the_writer(tmp_path: Path) -> None:
    writer = LedgerWriter(Ledger.open(str(tmp_path / "ledger.sqlite3")))
    async with writer_held(writer):
        cancelled = [
            asyncio.ensure_future(writer.commit(receipt("j1/0"))),
            asyncio.ensure_future(writer.call(writer.ledger.pin, "s/n1", KEY_A)),
        ]
        await asyncio.sleep(0)  # both are queued behind the hold
        for task in cancelled:
            task.cancel()
    await asyncio.wait_for(writer.commit(receipt("j2/0")), 30)  # the writer goes on
    assert (await asyncio.wait_for(writer.call(writer.ledger.pin, "s/n2", KEY_B), 30)).public_key == KEY_B
    writer.close()


@pytest.mark.asyncio
async def test_a_birth_key_that_is_not_an_ed25519_key_is_never_pinned(tmp_path: Path) -> None:
    writer = LedgerWriter(Ledger.open(str(tmp_path / "ledger.sqlite3")))
    view = PoolView("ecp/v1", needs_key=True)
    events: list[str] = []
    trust = Trust(view, writer, Catalogue(None), emit=lambda kind, **_: events.append(kind), refresh_s=60.0)
    small_order = "ed25519:" + base64.b64encode(bytes([1]) + bytes(31)).decode()  # signs every message
    for key in ("ed25519:not-base64!!", "ed25519:AAAA", "rsa:" + "A" * 43 + "=", small_order):
        birth = {"session": 1, "public_key": key, "models": {"m": {"sha256": "a" * 64}}}
        node = view.ingest("ecp/v1/s/n1/birth", orjson.dumps(birth), 0.0)
        assert node is not None
        trust.born(node)
        assert (
            (node.quarantine or "").startswith(BAD_KEY) and node.trusted_key is None and not node.is_trusted
        )
    assert not trust._tasks and await writer.call(writer.ledger.nodes) == []  # nothing went to the ledger
    assert events == ["node_quarantined"]
    writer.close()
