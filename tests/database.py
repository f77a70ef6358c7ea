"""A server's database read (or tampered with) by the test itself, as another process would: a SQLite
file over a connection of its own, or PostgreSQL over one; and where that server keeps its dataset cache."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg

from chainrule.server.store.location import is_postgres_url
from tests import postgres


def query(db: str | Path, sql: str, *parameters: object) -> list[tuple[Any, ...]]:
    """The rows of `sql`, written with `?` placeholders, each statement committed. A SQLite file is
    opened read-only unless the statement writes (UPDATE)."""
    if is_postgres_url(str(db)):
        with psycopg.connect(str(db), autocommit=True, connect_timeout=10) as connection:
            cursor = connection.execute(sql.replace("?", "%s"), parameters)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []
    mode = "rw" if sql.lstrip().upper().startswith("UPDATE") else "ro"
    with closing(sqlite3.connect(f"file:{db}?mode={mode}", uri=True)) as connection, connection:
        return connection.execute(sql, parameters).fetchall()


def dataset_cache(db: str | Path) -> Path:
    """The dataset cache of a test server on `db` (tests/server_process.py): beside a SQLite file, as
    the server's default; for PostgreSQL, the directory ServerProcess passes as --dataset-cache."""
    return postgres.dataset_cache(str(db)) if is_postgres_url(str(db)) else Path(f"{db}.cache")
