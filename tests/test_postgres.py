"""`--db`: what `chainrule serve` says when it cannot use its database (PostgreSQL unreachable or
refusing it, its driver missing, a schema newer than this server knows), that a URL's password is
never shown, and servers starting at once on one new PostgreSQL database."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import psycopg
import pytest

from chainrule.server.store import DatabaseUnusable, location, open_store
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
