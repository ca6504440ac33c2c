"""Ledger databases for tests: a SQLite file, or a fresh schema in the PostgreSQL on 127.0.0.1:5432.

PostgreSQL tests skip, saying why, where no server answers; CI here has one. Each test gets its own
schema (search_path in the URL), dropped afterwards, so tests run side by side on one database.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

POSTGRES = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
KINDS = ("sqlite", "postgresql")


@asynccontextmanager
async def writer_held(writer: Any) -> AsyncIterator[None]:
    """A LedgerWriter's thread busy until the block ends: what is sent to it inside queues up."""
    busy, release = threading.Event(), threading.Event()

    def hold() -> None:
        busy.set()
        release.wait(30)

    held = asyncio.ensure_future(writer.call(hold))
    assert await asyncio.to_thread(busy.wait, 30)
    try:
        yield
    finally:
        release.set()
        await held


def _admin() -> object:
    psycopg = pytest.importorskip("psycopg", reason="psycopg (the `platform` extra) is not installed")
    try:
        return psycopg.connect(POSTGRES, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(
            f"no PostgreSQL at {POSTGRES} ({str(exc).strip().splitlines()[0]}); set TEST_POSTGRES_URL"
        )


@contextmanager
def ledger_url(kind: str, tmp_path: Path) -> Iterator[str]:
    """A ledger URL of `kind` that no other test uses."""
    if kind == "sqlite":
        yield str(tmp_path / "ledger.sqlite3")
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = _admin()
    with admin:  # type: ignore[attr-defined]
        admin.execute(f'CREATE SCHEMA "{schema}"')  # type: ignore[attr-defined]
        try:
            yield f"{POSTGRES}?options={quote(f'-csearch_path={schema}')}"
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')  # type: ignore[attr-defined]
