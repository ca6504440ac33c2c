"""The receipts ledger: SQLite (a file) or PostgreSQL through SQLAlchemy Core; blocking calls.

The gateway calls these from one writer thread (platform/writer.py); the CLI calls them directly.
Every change is one transaction: a batch of receipts, a pin, a quarantine with the flags it sets.
Receipts are inserted with ON CONFLICT DO NOTHING on their job id, so writing one twice (a retry after
a lost connection) never makes a duplicate. When a batch fails for one of its rows rather than for the
database (`is_unavailable`), `write_each` writes the batch again with each row on its own, so that the
row fails alone.
"""

from __future__ import annotations

import contextlib
import operator
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from appliance.errors import ConfigError
from appliance.platform import schema
from appliance.platform.receipts import COLUMNS, Receipt
from appliance.platform.schema import gateways, nodes, receipts

KEY, FILE, CHECK = "key", "file", "check"  # why a node is quarantined; only `trust` lifts KEY


def now_ms() -> int:
    return int(time.time() * 1000)


def engine_url(url: str) -> str:
    """A SQLAlchemy URL from what an operator writes: a file path, sqlite:///PATH or postgresql://..."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith(("postgresql+psycopg://", "sqlite://")):
        return url
    if "://" in url:
        raise ConfigError(f"ledger {url!r}: expected a file path, sqlite:///PATH or postgresql://...")
    return f"sqlite:///{Path(url).expanduser()}"


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node as the ledger knows it: its pinned key and whether it is quarantined."""

    node: str
    public_key: str
    offered_key: str | None
    quarantine: str | None
    quarantine_kind: str | None
    last_passed_ms: int | None
    updated_ms: int


class Ledger:
    """One database; `open` migrates it. Errors from the database are ConfigError at open, else raised."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url
        self.is_sqlite = engine.dialect.name == "sqlite"
        marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        self._insert_sql = (
            f"INSERT INTO receipts ({', '.join(COLUMNS)}, flagged) "
            f"VALUES ({', '.join([marker] * len(COLUMNS))}, false) ON CONFLICT (job_id) DO NOTHING"
        )
        self._receipts: Any = None  # the DBAPI connection receipts are written on (see write)
        dbapi = engine.dialect.loaded_dbapi
        self._unavailable = (dbapi.OperationalError, dbapi.InterfaceError)

    @classmethod
    def open(cls, url: str, *, is_writer: bool = True) -> Ledger:
        shown = url.split("@")[-1]  # never a password in a message
        full = engine_url(url)
        if full.startswith("sqlite:///"):
            Path(full.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            engine = create_engine(full, pool_pre_ping=not full.startswith("sqlite"))
        except (ImportError, SQLAlchemyError) as exc:
            raise ConfigError(f"ledger {shown}: {exc}") from exc
        if engine.dialect.name == "sqlite":
            _sqlite_setup(engine, is_writer=is_writer)
        ledger = cls(engine, shown)
        try:
            with engine.begin() as connection:
                schema.migrate(connection, url=shown)
        except SQLAlchemyError as exc:
            engine.dispose()
            cause = getattr(exc, "orig", None) or exc
            raise ConfigError(f"ledger {shown}: {type(cause).__name__}: {cause}") from exc
        except BaseException:
            engine.dispose()
            raise
        return ledger

    def close(self) -> None:
        if self._receipts is not None:
            self._receipts.close()
            self._receipts = None
        self.engine.dispose()

    def write(self, batch: Iterable[Receipt]) -> None:
        """Insert receipts in one transaction; one already there (same job id) is left as it was.

        Every answer a buyer gets waits for this, so it runs one prepared statement on a connection it
        keeps, straight through the driver: SQLAlchemy's checkout, reset and per-execute bookkeeping
        cost the gateway more CPU per receipt than the database did (bench/swarm.py). A connection
        that fails is dropped and the next batch opens another."""
        rows = [_values(receipt) for receipt in batch]
        if rows:
            self._in_transaction(lambda cursor: cursor.executemany(self._insert_sql, rows))

    def write_each(self, batch: Iterable[Receipt]) -> list[Exception | None]:
        """Insert receipts in one transaction, each under its own savepoint: a row the database refuses
        (a number out of range, a string too long) is left out and its error returned in its place,
        None for each row written. What fails for the database as a whole (`is_unavailable`, or the
        commit) is raised, and then nothing was written."""
        rows = [_values(receipt) for receipt in batch]
        outcomes: list[Exception | None] = []

        def insert_each(cursor: Any) -> None:
            for row in rows:
                cursor.execute("SAVEPOINT receipt")
                try:
                    cursor.execute(self._insert_sql, row)
                except Exception as exc:
                    if self.is_unavailable(exc):
                        raise
                    cursor.execute("ROLLBACK TO SAVEPOINT receipt")
                    outcomes.append(exc)
                else:
                    outcomes.append(None)
                cursor.execute("RELEASE SAVEPOINT receipt")

        self._in_transaction(insert_each)
        return outcomes

    def _in_transaction(self, work: Callable[[Any], object]) -> None:
        """`work(cursor)` in one committed transaction on the receipts connection; a connection on
        which anything fails is dropped (its open transaction rolled back) and the error raised."""
        if self._receipts is None:
            self._receipts = self.engine.raw_connection()
        connection = self._receipts
        try:
            cursor = connection.cursor()
            try:
                if self.is_sqlite:  # autocommit mode (see _sqlite_setup): the transaction is ours
                    cursor.execute("BEGIN IMMEDIATE")
                work(cursor)
                if self.is_sqlite:
                    cursor.execute("COMMIT")
                else:
                    connection.commit()
            finally:
                cursor.close()
        except Exception:
            self._receipts = None
            with contextlib.suppress(Exception):
                connection.invalidate()  # rolls back what is open, and never returns it to the pool
            raise

    def is_unavailable(self, exc: BaseException) -> bool:
        """Whether an error from `write` is the database's (unreachable, locked, its disk) rather than
        one of the rows' (the DBAPI's OperationalError and InterfaceError, as PEP 249 defines them)."""
        return isinstance(exc, self._unavailable)

    def register_gateway(self, gateway: str, public_key: str) -> None:
        """Record the key this gateway signs receipts with (its old keys stay: old receipts verify)."""
        insert = (sqlite.insert if self.is_sqlite else postgresql.insert)(gateways)
        row = {"gateway": gateway, "public_key": public_key, "first_seen_ms": now_ms()}
        with self.engine.begin() as connection:
            connection.execute(insert.values(**row).on_conflict_do_nothing())

    def gateway_keys(self) -> dict[str, list[str]]:
        """Every gateway's keys as registered (gateway id -> keys): what its presence may be signed with."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(gateways.c.gateway, gateways.c.public_key))
            found: dict[str, list[str]] = {}
            for gateway, public_key in rows:
                found.setdefault(gateway, []).append(public_key)
            return found

    def pin(self, node: str, public_key: str) -> NodeRecord:
        """The node's record after showing `public_key`: pinned if new; a different key than the pinned
        one is kept as `offered_key` and quarantines the node until an operator trusts it."""
        stamp = now_ms()
        insert = (sqlite.insert if self.is_sqlite else postgresql.insert)(nodes)
        with self.engine.begin() as connection:
            connection.execute(
                insert.values(
                    node=node, public_key=public_key, first_seen_ms=stamp, updated_ms=stamp
                ).on_conflict_do_nothing(index_elements=["node"])
            )
            record = _record(connection.execute(select(nodes).where(nodes.c.node == node)).one())
            if record.public_key != public_key and record.offered_key != public_key:
                reason = (
                    f"its device key changed to {public_key}; refused until "
                    f"`appliance platform nodes trust {node}`"
                )
                connection.execute(
                    update(nodes)
                    .where(nodes.c.node == node)
                    .values(
                        offered_key=public_key,
                        quarantine=reason,
                        quarantine_kind=KEY,
                        quarantined_ms=stamp,
                        updated_ms=stamp,
                    )
                )
                record = _record(connection.execute(select(nodes).where(nodes.c.node == node)).one())
        return record

    def trust(self, node: str) -> NodeRecord:
        """Accept the key a node offered instead of its pinned one (`appliance platform nodes trust`)."""
        with self.engine.begin() as connection:
            row = connection.execute(select(nodes).where(nodes.c.node == node)).one_or_none()
            if row is None:
                raise ConfigError(
                    f"node {node!r} is not in ledger {self.url}; see `appliance platform nodes list`"
                )
            record = _record(row)
            if record.offered_key is None:
                raise ConfigError(f"node {node!r} offers no new key; it is pinned to {record.public_key}")
            values: dict[str, Any] = {
                "public_key": record.offered_key,
                "offered_key": None,
                "updated_ms": now_ms(),
            }
            if record.quarantine_kind == KEY:
                values.update(quarantine=None, quarantine_kind=None, quarantined_ms=None)
            connection.execute(update(nodes).where(nodes.c.node == node).values(**values))
            return _record(connection.execute(select(nodes).where(nodes.c.node == node)).one())

    def quarantine(self, node: str, reason: str, kind: str = CHECK) -> int:
        """Quarantine the node and flag its receipts since its last passed check; how many were flagged.
        A key quarantine is never replaced by another reason."""
        stamp = now_ms()
        with self.engine.begin() as connection:
            row = connection.execute(select(nodes).where(nodes.c.node == node)).one_or_none()
            if row is None:
                return 0
            record = _record(row)
            if record.quarantine_kind != KEY:
                connection.execute(
                    update(nodes)
                    .where(nodes.c.node == node)
                    .values(quarantine=reason, quarantine_kind=kind, quarantined_ms=stamp, updated_ms=stamp)
                )
            flagged = connection.execute(
                update(receipts)
                .where(receipts.c.node == node, receipts.c.created_ms > (record.last_passed_ms or 0))
                .where(receipts.c.flagged.is_(False))
                .values(flagged=True, flag_reason=reason)
            )
            return int(flagged.rowcount or 0)

    def passed(self, node: str) -> NodeRecord | None:
        """A check passed: the node's receipts up to now stand, and a check or file quarantine ends."""
        stamp = now_ms()
        with self.engine.begin() as connection:
            connection.execute(
                update(nodes).where(nodes.c.node == node).values(last_passed_ms=stamp, updated_ms=stamp)
            )
            connection.execute(
                update(nodes)
                .where(
                    nodes.c.node == node,
                    or_(nodes.c.quarantine_kind == CHECK, nodes.c.quarantine_kind == FILE),
                )
                .values(quarantine=None, quarantine_kind=None, quarantined_ms=None)
            )
            row = connection.execute(select(nodes).where(nodes.c.node == node)).one_or_none()
            return None if row is None else _record(row)

    def nodes(self, since_ms: int = 0) -> list[NodeRecord]:
        """Every node record changed since `since_ms` (all with 0)."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(nodes).where(nodes.c.updated_ms >= since_ms).order_by(nodes.c.node)
            )
            return [_record(row) for row in rows]


def _record(row: Any) -> NodeRecord:
    return NodeRecord(
        row.node,
        row.public_key,
        row.offered_key,
        row.quarantine,
        row.quarantine_kind,
        row.last_passed_ms,
        row.updated_ms,
    )


_values = operator.attrgetter(*COLUMNS)  # a receipt's row, in COLUMNS order


def _sqlite_setup(engine: Engine, *, is_writer: bool) -> None:
    """WAL (readers never wait for the writer), FULL sync (a commit survives a power cut, not only a
    SIGKILL), a busy timeout for a second gateway on the same file, and real transactions: pysqlite's
    own BEGIN handling is switched off and a writer begins IMMEDIATE, taking the write lock up front."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if is_writer else "BEGIN")
