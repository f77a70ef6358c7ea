"""`--db`: what `chainrule serve` says when it cannot use its database (PostgreSQL unreachable or
refusing it, its driver missing, a schema newer than this server knows, a role that may not upgrade
it), that a URL's password is never shown, servers starting at once on one new PostgreSQL database,
a role with no more than row privileges serving an up-to-date one, and a server's connections
keeping up with as many calls as it admits."""

from __future__ import annotations

import secrets
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent import futures
from pathlib import Path

import psycopg
import pytest

import chainrule.client as cr
from chainrule.server.store import DatabaseUnusable, location, open_store
from chainrule.server.store.migrations import MIGRATIONS, SCHEMA_VERSION, migrate_postgres
from chainrule.v1 import graph_service_pb2 as pb
from tests.postgres import PostgresServer, free_port
from tests.server_process import ServerProcess
from tests.test_jobs import data, logistic_graph
from tests.test_service import mlp_graph


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://ann:s3cret@db.example:5432/chainrule", "postgresql://ann:***@db.example:5432/chainrule"),
        ("postgres://ann:p%40ss@h1:1,h2:2/x?sslmode=require", "postgres://ann:***@h1:1,h2:2/x?sslmode=require"),
        ("postgresql://ann@h/x?password=s3cret&sslmode=require", "postgresql://ann@h/x?password=***&sslmode=require"),
        ("postgresql:///x?host=/run/postgresql", "postgresql:///x?host=/run/postgresql"),
        ("/var/lib/chainrule/chainrule.db", "/var/lib/chainrule/chainrule.db"),
    ],
)
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert location.shown(url) == shown
    for secret in location.secrets(url):
        assert location.scrubbed(f"failed: {secret}!", url) == "failed: ***!"


def serve(db: str, python_prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = f"{python_prelude}import sys; from chainrule.server.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", code, "serve", "--port", "0", "--db", db]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def assert_refused(finished: subprocess.CompletedProcess[str], db: str, *fragments: str) -> str:
    """Exit 2, one line on stderr naming the database (password hidden) and why."""
    assert finished.returncode == 2, finished.stderr
    line = finished.stderr.strip()
    assert "\n" not in line and line.startswith("chainrule: "), finished.stderr
    assert location.shown(db) in line
    for fragment in fragments:
        assert fragment in line
    for secret in location.secrets(db):
        assert secret not in finished.stdout + finished.stderr
    return line


def test_a_postgresql_database_that_cannot_be_used_is_named_with_the_reason(postgres: PostgresServer) -> None:
    password = urllib.parse.quote(postgres.password, safe="")
    cases = [
        (f"postgresql://chainrule:{password}@127.0.0.1:{free_port()}/chainrule", "Connection refused"),
        (f"postgresql://chainrule:not-{password}@127.0.0.1:{postgres.port}/postgres", "password authentication failed"),
        (postgres.url("missing_database"), 'database "missing_database" does not exist'),
        (
            postgres.url("postgres") + "?colour=blue",
            'is not a PostgreSQL URL libpq accepts: invalid URI query parameter: "colour"',
        ),
    ]
    for url, reason in cases:
        with pytest.raises(DatabaseUnusable) as raised:
            open_store(url)
        message = str(raised.value)
        assert reason in message and location.shown(url) in message and "\n" not in message
        assert all(secret not in message for secret in location.secrets(url))


def test_serve_exits_2_with_one_line_when_it_cannot_use_its_database(postgres: PostgresServer) -> None:
    unreachable = f"postgresql://chainrule:{urllib.parse.quote(postgres.password, safe='')}@127.0.0.1:{free_port()}/x"
    assert_refused(serve(unreachable), unreachable, "cannot use the database", "Connection refused")


def test_serve_without_the_postgres_extra_says_what_to_install(postgres: PostgresServer) -> None:
    url = postgres.url("postgres")
    finished = serve(url, python_prelude="import sys; sys.modules['psycopg'] = None; ")
    assert_refused(finished, url, "needs PostgreSQL support", "pip install 'chainrule[postgres]'")


def test_a_server_shows_its_database_without_the_password(postgres: PostgresServer) -> None:
    url = postgres.database()
    server = ServerProcess(url).start()
    try:
        log = "".join(server.log)
        assert f"(database {location.shown(url)})" in log
        assert all(secret not in log for secret in location.secrets(url))
    finally:
        server.kill()


def test_servers_starting_at_once_on_a_new_database_migrate_it_once(postgres: PostgresServer) -> None:
    url = postgres.database()
    errors: list[Exception] = []
    start = threading.Barrier(4)

    def open_and_close() -> None:
        start.wait()
        try:
            open_store(url).close()
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=open_and_close) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with psycopg.connect(url) as connection:
        versions = [version for (version,) in connection.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))


def test_serve_refuses_a_sqlite_file_a_newer_chainrule_migrated(tmp_path: Path) -> None:
    db = str(tmp_path / "chainrule.db")
    open_store(db).close()
    connection = sqlite3.connect(db)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    assert_refused(serve(db), db, f"schema version {SCHEMA_VERSION + 1}, newer than version {SCHEMA_VERSION}")


def test_serve_refuses_a_postgresql_database_a_newer_chainrule_migrated(postgres: PostgresServer) -> None:
    url = postgres.database()
    open_store(url).close()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("INSERT INTO schema_version VALUES (%s, 'from the future', 0)", (SCHEMA_VERSION + 1,))
    assert_refused(serve(url), url, f"schema version {SCHEMA_VERSION + 1}, newer than version {SCHEMA_VERSION}")


def row_privileges_only(postgres: PostgresServer, url: str, role: str, password: str) -> str:
    """`url` for a new role that may read and write the rows of the tables the database has now, and use
    their sequences, but not create anything; the schema stays the cluster's superuser's."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        connection.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        connection.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        connection.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    database = url.rsplit("/", 1)[1]
    return f"postgresql://{role}:{password}@127.0.0.1:{postgres.port}/{database}"


def test_a_role_with_row_privileges_serves_an_up_to_date_database_and_cannot_upgrade_one(
    postgres: PostgresServer,
) -> None:
    password = secrets.token_hex(8)
    current = postgres.database()
    open_store(current).close()  # migrated by the superuser
    behind = postgres.database()
    with psycopg.connect(behind, autocommit=True) as connection:
        migrate_postgres(connection, "test", MIGRATIONS[:-1])
    suffix = secrets.token_hex(3)

    refused = row_privileges_only(postgres, behind, f"behind_{suffix}", password)
    line = assert_refused(
        serve(refused),
        refused,
        f"schema version {SCHEMA_VERSION - 1} and chainrule",
        f"needs version {SCHEMA_VERSION}, but role 'behind_{suffix}' may not change the schema",
        "run this chainrule once as a role that may",
    )
    assert "permission denied" in line

    url = row_privileges_only(postgres, current, f"rows_{suffix}", password)
    server = ServerProcess(url).start()
    try:
        with cr.Client(server.address) as client:
            graph_id = client.create_graph(logistic_graph(), request_id="once").graph_id
            assert client.create_graph(logistic_graph(), request_id="once").graph_id == graph_id
            x, y = data(20)
            steps = list(client.train(graph_id, [{"x": x, "y": y}] * 3, loss="loss", optimizer=cr.Sgd(0.1)))
            dataset = client.upload_dataset("twenty", {"x": x, "y": y}, progress=False)
            job = client.create_job(
                graph_id,
                dataset.dataset_id,
                loss="loss",
                optimizer=cr.Sgd(0.1),
                feeds={"x": "x", "y": "y"},
                batch_size=5,
                epochs=1,
                checkpoint_every=2,
            )
            info = job.wait(progress=False)
            assert (info.state, info.step) == ("succeeded", 4), info.error
            assert client.get_parameters_with_step(graph_id)[1] == len(steps) + 4
            client.delete_dataset(dataset.dataset_id)
            client.delete_graph(graph_id)
            assert client.list_graphs() == []
    finally:
        server.kill()
    assert schema_version_rows(current) == list(range(1, SCHEMA_VERSION + 1))


def schema_version_rows(url: str) -> list[int]:
    with psycopg.connect(url) as connection:
        return [version for (version,) in connection.execute("SELECT version FROM schema_version ORDER BY 1")]


def test_a_server_has_a_connection_for_every_call_it_admits(postgres: PostgresServer) -> None:
    """Calls waiting on PostgreSQL (deletes of graphs whose rows the test keeps locked) hold as many
    connections as --max-concurrent-rpcs allows, and others still get connections of their own: none
    waits for one until the pool's UNAVAILABLE. The lock is held longer than a connection may hear
    nothing before the store asks whether PostgreSQL still answers: it does, and the deletes go on."""
    calls = 30
    url = postgres.database()
    server = ServerProcess(url, ["--max-concurrent-rpcs", str(calls + 8), "--max-concurrent-rpcs-per-tenant", "40"])
    server.start()
    try:
        stub = server.stub()
        graph_ids = [stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id for _ in range(calls)]
        with psycopg.connect(url) as locker, futures.ThreadPoolExecutor(calls + 8) as pool:
            locker.execute("SELECT 1 FROM graphs WHERE graph_id = ANY(%s) FOR UPDATE", (graph_ids,))
            deletes = [
                pool.submit(stub.DeleteGraph, pb.DeleteGraphRequest(graph_id=graph_id), timeout=60)
                for graph_id in graph_ids
            ]
            waiting = 0
            for _ in range(600):  # until every delete waits on the lock, each on a connection of its own
                with psycopg.connect(url, autocommit=True) as watcher:
                    row = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'chainrule' "
                        "AND wait_event_type = 'Lock'"
                    ).fetchone()
                waiting = row[0] if row else 0
                if waiting == calls:
                    break
                time.sleep(0.05)
            assert waiting == calls
            reads = [
                pool.submit(stub.ListGraphs, pb.ListGraphsRequest(), timeout=10),
                *(pool.submit(stub.GetGraph, pb.GetGraphRequest(graph_id=g), timeout=10) for g in graph_ids[:7]),
            ]
            for read in reads:
                read.result()
            time.sleep(3)  # longer than the store lets a connection hear nothing (SILENCE_SECONDS)
            locker.rollback()
            for delete in deletes:
                delete.result()
        assert stub.ListGraphs(pb.ListGraphsRequest()).graphs == []
    finally:
        server.kill()
