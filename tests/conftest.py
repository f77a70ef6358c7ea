from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer, running_postgres
from tests.ray_cluster import RayHeadFixture, running_ray
from tests.server_process import ServerProcess

BACKENDS = ("sqlite", "postgres")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server process per test module, on an ephemeral port, with its own database."""
    process = ServerProcess(tmp_path_factory.mktemp("server") / "chainrule.db").start()
    yield process
    process.kill()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of the test's own, for tests that kill or restart it."""
    process = ServerProcess(tmp_path / "chainrule.db").start()
    yield process
    process.kill()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL for the whole session, started on first use (tests/postgres.py)."""
    yield from running_postgres()


@pytest.fixture(params=BACKENDS)
def backend_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new database of each backend, as `--db` takes it: a SQLite file, or a PostgreSQL URL."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres").database())
    return str(tmp_path / "chainrule.db")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayHeadFixture]:
    """One real Ray head for the whole session, started on first use (tests/ray_cluster.py)."""
    yield from running_ray()
