"""`--db postgresql://...`: what `chainrule serve` says when it cannot use the database, and that a
URL's password is never shown; servers starting at once on one new database."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import urllib.parse

import psycopg
import pytest

from chainrule.server.store import location, open_store
from chainrule.server.store.migrations import MIGRATIONS, SCHEMA_VERSION
from tests.postgres import PostgresServer, free_port
from tests.server_process import ServerProcess


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


def test_serve_names_what_keeps_it_from_using_a_postgresql_database(postgres: PostgresServer) -> None:
    port = postgres.port
    password = urllib.parse.quote(postgres.password, safe="")
    nobody_listens = f"postgresql://chainrule:{password}@127.0.0.1:{free_port()}/chainrule"
    assert_refused(serve(nobody_listens), nobody_listens, "cannot use the database", "Connection refused")
    wrong_password = f"postgresql://chainrule:not-{password}@127.0.0.1:{port}/postgres"
    assert_refused(serve(wrong_password), wrong_password, "password authentication failed")
    no_database = postgres.url("missing_database")
    assert_refused(serve(no_database), no_database, 'database "missing_database" does not exist')
    unknown_option = postgres.url("postgres") + "?colour=blue"
    assert_refused(serve(unknown_option), unknown_option, "is not a PostgreSQL URL libpq accepts", "colour")


def test_serve_without_the_postgres_extra_says_what_to_install(postgres: PostgresServer) -> None:
    url = postgres.url("postgres")
    finished = serve(url, python_prelude="import sys; sys.modules['psycopg'] = None; ")
    assert_refused(finished, url, "needs PostgreSQL support", "pip install 'chainrule[postgres]'")


def test_serve_refuses_a_database_a_newer_chainrule_migrated(backend_db: str) -> None:
    open_store(backend_db).close()
    if backend_db.startswith("postgresql://"):
        with psycopg.connect(backend_db, autocommit=True) as connection:
            connection.execute("INSERT INTO schema_version VALUES (%s, 'newer', 0)", (SCHEMA_VERSION + 5,))
    else:
        connection = sqlite3.connect(backend_db)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
        connection.close()
    assert_refused(serve(backend_db), backend_db, f"schema version {SCHEMA_VERSION + 5}", "newer")


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
