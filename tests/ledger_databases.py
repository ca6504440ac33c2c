"""Ledger databases for tests: a SQLite file, or a fresh schema in the PostgreSQL on 127.0.0.1:5432.

PostgreSQL tests skip, saying why, where no server answers; CI here has one. Each test gets its own
schema (search_path in the URL), dropped afterwards, so tests run side by side on one database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

POSTGRES = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
KINDS = ("sqlite", "postgresql")


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
