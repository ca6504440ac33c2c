"""The ledger's tables (SQLAlchemy Core, the same on SQLite and PostgreSQL) and how a database is migrated.

Migrations are numbered steps, each run once in its own transaction, with the version reached kept in
`ledger_meta`. Every gateway runs `migrate` at start; on PostgreSQL an advisory lock and on SQLite the
database's write lock (BEGIN IMMEDIATE) make concurrent starts take turns, so a step never runs twice.
A database newer than this code is refused rather than written with an older idea of its shape. To
change the schema: append a step to MIGRATIONS (never edit one that has shipped) and change the tables
below to match what the steps build.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    select,
    text,
)

from appliance.errors import ConfigError

metadata = MetaData()

meta = Table(
    "ledger_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(200), nullable=False),
)

receipts = Table(
    "receipts",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("job_id", String(200), nullable=False, unique=True),  # the node signed it: <job>/<attempt>/<nonce>
    Column("job", String(64), nullable=False),  # the gateway's job id, shared by its attempts
    Column("attempt", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # buyer, canary, second_opinion
    Column("billed", Boolean, nullable=False),
    Column("buyer", String(200), nullable=False),
    Column("node", String(200), nullable=False),  # site/node
    Column("session", BigInteger, nullable=False),
    Column("model", String(200), nullable=False),
    Column("model_sha256", String(64), nullable=False),
    Column("rows", Integer, nullable=False),
    Column("input_sha256", String(64), nullable=False),
    Column("output_sha256", String(64), nullable=False),
    Column("queue_ms", Float, nullable=False),
    Column("compute_ms", Float, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("slo_ms", Float, nullable=False),
    Column("slo_met", Boolean, nullable=False),
    Column("node_signature", String(100), nullable=False),
    Column("verdict", String(32), nullable=False),
    Column("detail", Text, nullable=False),
    Column("gateway", String(100), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("gateway_signature", String(100), nullable=False),
    # Later annotations, outside what the gateway signed: a failed check flags what came before it.
    Column("flagged", Boolean, nullable=False, default=False),
    Column("flag_reason", Text, nullable=True),
)
Index("receipts_node_created", receipts.c.node, receipts.c.created_ms)
Index("receipts_created", receipts.c.created_ms)

nodes = Table(
    "nodes",
    metadata,
    Column("node", String(200), primary_key=True),  # site/node
    Column("public_key", String(64), nullable=False),  # pinned when first seen
    Column("first_seen_ms", BigInteger, nullable=False),
    Column("offered_key", String(64), nullable=True),  # a different key a birth showed: refused
    Column("quarantine", Text, nullable=True),  # why the node gets no buyer jobs; NULL: it does
    Column("quarantine_kind", String(16), nullable=True),  # key, file, check
    Column("quarantined_ms", BigInteger, nullable=True),
    Column("last_passed_ms", BigInteger, nullable=True),
    Column("updated_ms", BigInteger, nullable=False),
)
Index("nodes_updated", nodes.c.updated_ms)

gateways = Table(
    "gateways",
    metadata,
    Column("gateway", String(100), primary_key=True),
    Column("public_key", String(64), primary_key=True),  # every key it has had: verifies gateway_signature
    Column("first_seen_ms", BigInteger, nullable=False),
)


def _v1(connection: Connection) -> None:
    for table in (receipts, nodes, gateways):
        table.create(connection, checkfirst=True)


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "receipts, nodes (key pins, quarantine) and gateways (their keys)", _v1),
]
VERSION = MIGRATIONS[-1][0]
LOCK_ID = 0x6C6564676572  # "ledger": the PostgreSQL advisory lock migrations hold


def version(connection: Connection) -> int:
    """The schema version a database is at (0: an empty database)."""
    meta.create(connection, checkfirst=True)
    found = connection.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
    return int(found) if found is not None else 0


def migrate(connection: Connection, *, url: str) -> list[int]:
    """Bring the database to VERSION inside the caller's transaction; the steps run, in order."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": LOCK_ID})
    current = version(connection)
    if current > VERSION:
        raise ConfigError(
            f"ledger {url} has schema version {current}; this appliance knows up to {VERSION}: "
            "upgrade appliance on every gateway first"
        )
    ran = []
    for number, _, step in MIGRATIONS:
        if number > current:
            step(connection)
            ran.append(number)
    if ran:
        values = {"key": "schema_version", "value": str(VERSION)}
        if current == 0:
            connection.execute(meta.insert().values(**values))
        else:
            connection.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(VERSION)))
    return ran
