"""Schema versions and migrations, on both backends; and SQLite files written before versions existed.

tests/store_data/unversioned.db was written by the store as it was before schema versions (user
version 0, tables created with IF NOT EXISTS): two tenants' graphs, one trained three Adam steps
and created with a request id, a dataset, a running job with its history. It must open in place,
every row as it was.
"""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import psycopg
import pytest

from chainrule.server.engine import Engine
from chainrule.server.errors import FailedPrecondition
from chainrule.server.store import SqliteStore, location, open_store
from chainrule.server.store.migrations import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    SchemaTooNew,
    migrate_postgres,
    migrate_sqlite,
)

UNVERSIONED = Path(__file__).parent / "store_data" / "unversioned.db"
TABLES = (
    "graphs",
    "parameters",
    "optimizer_state",
    "create_requests",
    "jobs",
    "job_events",
    "datasets",
    "dataset_chunks",
)


def is_postgres(db: str) -> bool:
    return db.startswith("postgresql://")


def schema_version(db: str) -> int:
    if is_postgres(db):
        with psycopg.connect(db) as connection:
            row = connection.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        assert row is not None
        return int(row[0])
    connection = sqlite3.connect(db)
    try:
        return int(connection.execute("PRAGMA user_version").fetchone()[0])
    finally:
        connection.close()


def tables(db: str) -> set[str]:
    if is_postgres(db):
        with psycopg.connect(db) as connection:
            return {
                name for (name,) in connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            }
    connection = sqlite3.connect(db)
    try:
        return {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        connection.close()


def test_a_new_database_gets_every_migration_and_opening_it_again_changes_nothing(backend_db: str) -> None:
    store = open_store(backend_db)
    store.insert_graph("g", "", "kept", b"definition", {"inputs": []}, {"w": np.ones(2)})
    store.close()
    assert schema_version(backend_db) == SCHEMA_VERSION == len(MIGRATIONS)
    assert set(TABLES) <= tables(backend_db)
    store = open_store(backend_db)
    try:
        assert schema_version(backend_db) == SCHEMA_VERSION
        assert [graph.name for graph in store.list_graphs("", 0, 10)] == ["kept"]
    finally:
        store.close()
    if is_postgres(backend_db):
        with psycopg.connect(backend_db) as connection:
            applied = connection.execute("SELECT version, description FROM schema_version ORDER BY version").fetchall()
        assert applied == [(number, m.description) for number, m in enumerate(MIGRATIONS, start=1)]


def test_a_database_with_a_newer_schema_is_refused_in_one_line_and_left_alone(backend_db: str) -> None:
    open_store(backend_db).close()
    newer = SCHEMA_VERSION + 1
    if is_postgres(backend_db):
        with psycopg.connect(backend_db, autocommit=True) as connection:
            connection.execute("INSERT INTO schema_version VALUES (%s, 'from the future', 0)", (newer,))
    else:
        with sqlite3.connect(backend_db) as connection:
            connection.execute(f"PRAGMA user_version = {newer}")
    with pytest.raises(SchemaTooNew) as raised:
        open_store(backend_db)
    message = str(raised.value)
    assert "\n" not in message
    assert f"schema version {newer}, newer than version {SCHEMA_VERSION}" in message
    assert location.shown(backend_db) in message
    assert all(secret not in message for secret in location.secrets(backend_db))
    assert schema_version(backend_db) == newer


BROKEN = Migration(
    "a migration that fails after others succeeded",
    sqlite="CREATE TABLE extra (x INTEGER);\nCREATE TABLE graphs (x INTEGER);\n",
    postgres="CREATE TABLE extra (x INTEGER);\nCREATE TABLE graphs (x INTEGER);\n",
)


def test_pending_migrations_apply_in_one_transaction_all_or_none(backend_db: str) -> None:
    if is_postgres(backend_db):
        connection = psycopg.connect(backend_db, autocommit=True)

        def migrate(migrations: tuple[Migration, ...]) -> tuple[int, int]:
            return migrate_postgres(connection, "test", migrations)

        refused: type[Exception] = psycopg.errors.DuplicateTable
    else:
        connection = sqlite3.connect(backend_db, isolation_level=None)

        def migrate(migrations: tuple[Migration, ...]) -> tuple[int, int]:
            return migrate_sqlite(connection, "test", migrations)

        refused = sqlite3.OperationalError
    try:
        with pytest.raises(refused):
            migrate((*MIGRATIONS, BROKEN))
        assert tables(backend_db) == set(), "every migration of the failed run was rolled back"
        assert migrate(MIGRATIONS[:2]) == (0, 2)
        assert tables(backend_db) >= {"graphs", "create_requests"} and "jobs" not in tables(backend_db)
        assert migrate(MIGRATIONS) == (2, SCHEMA_VERSION)
        assert set(TABLES) <= tables(backend_db)
    finally:
        connection.close()


# ---------------------------------------------------------------- SQLite files from before schema versions
def dump(path: Path) -> dict[str, list[tuple]]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        present = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {
            table: connection.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in TABLES
            if table in present
        }
    finally:
        connection.close()


def narrowed(tables: dict[str, list[tuple]], like: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    """The rows of `tables` without the columns that later migrations added to the tables of `like`."""
    widths = {table: len(rows[0]) for table, rows in like.items() if rows}
    return {table: [row[: widths.get(table, len(row))] for row in rows] for table, rows in tables.items()}


def test_an_unversioned_sqlite_file_upgrades_in_place_keeping_every_row(tmp_path: Path) -> None:
    db = tmp_path / "chainrule.db"
    shutil.copy(UNVERSIONED, db)
    before = dump(db)
    assert schema_version(str(db)) == 0 and set(before) == set(TABLES)
    assert all(before[table] for table in TABLES), "the file holds rows in every table"

    store = SqliteStore(str(db))
    try:
        assert schema_version(str(db)) == SCHEMA_VERSION
        assert narrowed(dump(db), before) == before
        (trained,) = [row for row in before["graphs"] if row[7] == 3]  # step 3
        graph_id = trained[1]
        checkpoint = store.load_checkpoint(graph_id)
        assert checkpoint is not None and checkpoint.step == 3
        assert {kind for kind, _ in checkpoint.optimizer_state.values()} == {"adam"}
        assert [graph.tenant for graph in store.list_graphs("acme", 0, 10)] == ["acme"]
        (job,) = store.unfinished_jobs()
        assert job.graph_id == graph_id and [event.step for event in store.job_events(job.job_id, 0, 10)] == [1, 2]
        (dataset,) = store.list_datasets("", 0, 10)
        assert sum(len(data) for _, data in store.dataset_chunks(dataset.dataset_id)) == dataset.size_bytes

        # The engine compiles the stored graph with its committed parameters, and trains on.
        engine = Engine(store)
        parameters, step = engine.get_parameters(graph_id, [])
        assert step == 3
        for name, value in checkpoint.parameters.items():
            assert parameters[name].tobytes() == value.tobytes()
        zeros = {name: np.zeros_like(value) for name, value in parameters.items()}
        with pytest.raises(FailedPrecondition, match="job 'legacy-job'"):  # left running, it holds its graph
            engine.set_parameters(graph_id, zeros)
        store.save_job(replace(job, state="CANCELLED", ended_at=1.0))
        engine.set_parameters(graph_id, zeros)
    finally:
        store.close()
    reopened = SqliteStore(str(db))
    try:
        saved = reopened.load_checkpoint(graph_id)
        assert saved is not None and saved.step == 3
        assert not any(value.any() for value in saved.parameters.values()), "what the upgraded file took is kept"
    finally:
        reopened.close()


def test_an_unversioned_file_from_before_request_ids_jobs_and_datasets_gets_their_tables(tmp_path: Path) -> None:
    db = tmp_path / "chainrule.db"
    shutil.copy(UNVERSIONED, db)
    with sqlite3.connect(db) as connection:
        for table in ("create_requests", "job_events", "jobs", "dataset_chunks", "datasets"):
            connection.execute(f"DROP TABLE {table}")
    before = dump(db)
    assert set(before) == {"graphs", "parameters", "optimizer_state"}
    store = SqliteStore(str(db))
    try:
        assert narrowed(dump(db), before) == {**before, **{table: [] for table in TABLES if table not in before}}
        assert schema_version(str(db)) == SCHEMA_VERSION
        assert store.unfinished_jobs() == [] and store.dataset_hashes() == set()
    finally:
        store.close()
