"""The store's tables, as an ordered list of migrations, each written for SQLite and PostgreSQL side by side.

A database's schema version is the number of migrations applied to it: SQLite keeps it in
`PRAGMA user_version`, PostgreSQL in the `schema_version` table (one row per migration applied,
with when). At startup a store applies the migrations its database lacks, all in one transaction
(a failure leaves the database as it was), and refuses a database whose version is newer than
the migrations it knows: a newer chainrule wrote it, and this one would misread it.

To change the schema, append a Migration; never edit one that has shipped. Its two dialects say
the same thing in each database's words:

    SQLite                          PostgreSQL
    INTEGER PRIMARY KEY AUTOINCREMENT   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY (never reused)
    INTEGER (64 bits)               BIGINT
    REAL (64 bits)                  DOUBLE PRECISION (keeps NaN; SQLite turns it into NULL)
    BLOB                            BYTEA, STORAGE EXTERNAL for raw tensor and dataset bytes
                                    (stored out of line, not compressed: float data does not compress)
    TEXT holding JSON               TEXT, except graphs.summary: JSONB, so that a read can leave the
                                    topological order out (SQLite does that with json_remove)

SQLite databases written before schema versions existed (user_version 0) hold some prefix of
the first four migrations' tables, created with IF NOT EXISTS: those four keep IF NOT EXISTS so
that they upgrade such a file in place. Later migrations know exactly what they start from.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chainrule import __version__
from chainrule.server.store.base import DatabaseUnusable

if TYPE_CHECKING:
    import psycopg


log = logging.getLogger("chainrule.server.store")


@dataclass(frozen=True)
class Migration:
    description: str
    sqlite: str
    postgres: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "graphs, their parameters and optimizer state",
        sqlite="""
CREATE TABLE IF NOT EXISTS graphs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    graph_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    definition BLOB NOT NULL,
    summary TEXT NOT NULL,
    created_at REAL NOT NULL,
    step INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS parameters (
    graph_id TEXT NOT NULL REFERENCES graphs(graph_id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (graph_id, name)
);
CREATE TABLE IF NOT EXISTS optimizer_state (
    graph_id TEXT NOT NULL REFERENCES graphs(graph_id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    optimizer TEXT NOT NULL,
    slot TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (graph_id, name, slot)
);
""",
        postgres="""
CREATE TABLE graphs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    graph_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    definition BYTEA NOT NULL,
    summary JSONB NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    step BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE parameters (
    graph_id TEXT NOT NULL REFERENCES graphs(graph_id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (graph_id, name)
);
ALTER TABLE parameters ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE optimizer_state (
    graph_id TEXT NOT NULL REFERENCES graphs(graph_id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    optimizer TEXT NOT NULL,
    slot TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (graph_id, name, slot)
);
ALTER TABLE optimizer_state ALTER COLUMN data SET STORAGE EXTERNAL;
""",
    ),
    Migration(
        "CreateGraph request ids",
        sqlite="""
CREATE TABLE IF NOT EXISTS create_requests (
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    graph_id TEXT NOT NULL REFERENCES graphs(graph_id) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, request_id)
);
CREATE INDEX IF NOT EXISTS create_requests_by_graph ON create_requests (graph_id);
CREATE INDEX IF NOT EXISTS create_requests_by_age ON create_requests (created_at);
""",
        postgres="""
CREATE TABLE create_requests (
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    graph_id TEXT NOT NULL REFERENCES graphs(graph_id) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant, request_id)
);
CREATE INDEX create_requests_by_graph ON create_requests (graph_id);
CREATE INDEX create_requests_by_age ON create_requests (created_at);
""",
    ),
    Migration(
        "jobs and their per-step history",
        sqlite="""
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL DEFAULT '',
    graph_id TEXT NOT NULL,
    spec BLOB NOT NULL,
    state TEXT NOT NULL,
    total_steps INTEGER NOT NULL,
    created_at REAL NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    epoch INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    metrics TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    started_at REAL,
    ended_at REAL,
    start_graph_step INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, seq);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    loss REAL,
    learning_rate REAL NOT NULL,
    metrics TEXT,
    PRIMARY KEY (job_id, step)
) WITHOUT ROWID;
""",
        postgres="""
CREATE TABLE jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL DEFAULT '',
    graph_id TEXT NOT NULL,
    spec BYTEA NOT NULL,
    state TEXT NOT NULL,
    total_steps BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    step BIGINT NOT NULL DEFAULT 0,
    epoch BIGINT NOT NULL DEFAULT 0,
    loss DOUBLE PRECISION,
    metrics TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    started_at DOUBLE PRECISION,
    ended_at DOUBLE PRECISION,
    start_graph_step BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_tenant ON jobs (tenant, seq);
CREATE INDEX jobs_by_state ON jobs (state, seq);
CREATE TABLE job_events (
    job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
    step BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    loss DOUBLE PRECISION,
    learning_rate DOUBLE PRECISION NOT NULL,
    metrics TEXT,
    PRIMARY KEY (job_id, step)
);
""",
    ),
    Migration(
        "datasets, their bytes in chunk rows",
        sqlite="""
CREATE TABLE IF NOT EXISTS datasets (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    columns TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS datasets_by_tenant ON datasets (tenant, seq);
CREATE TABLE IF NOT EXISTS dataset_chunks (
    dataset_id TEXT NOT NULL REFERENCES datasets(dataset_id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    column_index INTEGER NOT NULL,
    chunk_index INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (dataset_id, column_index, chunk_index)
);
""",
        postgres="""
CREATE TABLE datasets (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dataset_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL,
    columns TEXT NOT NULL,
    num_examples BIGINT NOT NULL,
    size_bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX datasets_by_tenant ON datasets (tenant, seq);
CREATE TABLE dataset_chunks (
    dataset_id TEXT NOT NULL REFERENCES datasets(dataset_id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    column_index INTEGER NOT NULL,
    chunk_index INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (dataset_id, column_index, chunk_index)
);
ALTER TABLE dataset_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
""",
    ),
    Migration(
        "graph versions, trainer leases and job claims, for several servers on one database",
        sqlite="""
ALTER TABLE graphs ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE graphs ADD COLUMN trainer TEXT NOT NULL DEFAULT '';
ALTER TABLE graphs ADD COLUMN trainer_until REAL;
ALTER TABLE jobs ADD COLUMN worker TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN resumes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN claim TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN lease_until REAL;
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
UPDATE graphs SET trainer = 'job/' || (
    SELECT job_id FROM jobs WHERE jobs.graph_id = graphs.graph_id AND jobs.state = 'RUNNING' ORDER BY seq LIMIT 1
) || '/' WHERE EXISTS (SELECT 1 FROM jobs WHERE jobs.graph_id = graphs.graph_id AND jobs.state = 'RUNNING');
""",
        postgres="""
ALTER TABLE graphs ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE graphs ADD COLUMN trainer TEXT NOT NULL DEFAULT '';
ALTER TABLE graphs ADD COLUMN trainer_until DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN worker TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN resumes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN claim TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN lease_until DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE graphs SET trainer = 'job/' || (
    SELECT job_id FROM jobs WHERE jobs.graph_id = graphs.graph_id AND jobs.state = 'RUNNING' ORDER BY seq LIMIT 1
) || '/' WHERE EXISTS (SELECT 1 FROM jobs WHERE jobs.graph_id = graphs.graph_id AND jobs.state = 'RUNNING');
""",
    ),
    Migration(
        # Jobs stored before hold 1: JobSpec.replicas came with migration 5, in the same release.
        "jobs' replicas, which servers without Ray pass over, and what a job waits for",
        sqlite="""
ALTER TABLE jobs ADD COLUMN replicas INTEGER NOT NULL DEFAULT 1;
ALTER TABLE jobs ADD COLUMN status_message TEXT NOT NULL DEFAULT '';
""",
        postgres="""
ALTER TABLE jobs ADD COLUMN replicas INTEGER NOT NULL DEFAULT 1;
ALTER TABLE jobs ADD COLUMN status_message TEXT NOT NULL DEFAULT '';
""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
"""The schema version this code reads and writes."""


class SchemaTooNew(DatabaseUnusable):
    """The database was migrated by a newer chainrule than this one."""


def _check_known(found: int, known: int, where: str) -> None:
    if found > known:
        raise SchemaTooNew(
            f"the database {where} has schema version {found}, newer than version {known}, the newest chainrule "
            f"{__version__} knows: a newer chainrule has upgraded it; run that version, or give --db another database"
        )


def _statements(script: str) -> list[str]:
    """A script's statements, one per item: sqlite3 runs one at a time outside executescript, which would
    commit the migration's transaction."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ValueError(f"an incomplete SQL statement ends the migration: {pending.strip()!r}")
    return statements


def migrate_sqlite(db: sqlite3.Connection, where: str, migrations: Sequence[Migration] = MIGRATIONS) -> tuple[int, int]:
    """Bring the database (a connection in autocommit mode) to the newest version in one transaction;
    the versions before and after. A file with tables but version 0 predates versions: it is upgraded."""
    db.execute("BEGIN IMMEDIATE")  # the write lock first: another process may be migrating the same file
    try:
        (found,) = db.execute("PRAGMA user_version").fetchone()
        _check_known(found, len(migrations), where)
        existing = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] > 0
        for migration in migrations[found:]:
            for statement in _statements(migration.sqlite):
                db.execute(statement)
        if found < len(migrations):
            db.execute(f"PRAGMA user_version = {len(migrations)}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    if existing and found < len(migrations):
        log.info("upgraded the schema of %s from version %d to %d", where, found, len(migrations))
    return found, len(migrations)


MIGRATION_LOCK = 0x63720001
"""The PostgreSQL advisory lock that servers starting at once take to migrate one at a time (its
first half spells "cr", for chainrule)."""


def migrate_postgres(
    connection: psycopg.Connection[Any], where: str, migrations: Sequence[Migration] = MIGRATIONS
) -> tuple[int, int]:
    """Bring the database (a connection in autocommit mode) to the newest version in one transaction;
    the versions before and after. The version is read first, and a database already at the newest
    version is left untouched: no lock, no DDL, so a role that may only read and write rows (no CREATE
    on the schema) runs servers on a database a role that may change it has upgraded."""
    import psycopg

    found = _postgres_version(connection)
    _check_known(found, len(migrations), where)
    if found == len(migrations):
        return found, found
    try:
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (MIGRATION_LOCK,))
            connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
                "applied_at DOUBLE PRECISION NOT NULL)"
            )
            found = _postgres_version(connection)  # another server may have migrated it while this one waited
            _check_known(found, len(migrations), where)
            for version, migration in enumerate(migrations[found:], start=found + 1):
                connection.execute(migration.postgres.encode())  # several statements, no parameters: one query
                connection.execute(
                    "INSERT INTO schema_version (version, description, applied_at) VALUES (%s, %s, %s)",
                    (version, migration.description, time.time()),
                )
    except psycopg.errors.InsufficientPrivilege as error:
        reason = " ".join(str(error).split())
        raise DatabaseUnusable(
            f"the database {where} has schema version {found} and chainrule {__version__} needs version "
            f"{len(migrations)}, but role '{connection.info.user}' may not change the schema ({reason}): run this "
            "chainrule once as a role that may (with CREATE on the schema and owning its tables, such as the "
            "database's owner) to upgrade it, then start servers as this role again"
        ) from None
    if 0 < found < len(migrations):
        log.info("upgraded the schema of %s from version %d to %d", where, found, len(migrations))
    return found, len(migrations)


def _postgres_version(connection: psycopg.Connection[Any]) -> int:
    """The migrations a database has had: 0 without a schema_version table (found by the search path,
    as the migrations create it)."""
    row = connection.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = connection.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    return int(row[0]) if row is not None else 0
