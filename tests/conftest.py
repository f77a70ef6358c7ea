from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer, running_postgres
from tests.ray_cluster import RayHeadFixture, running_ray
from tests.server_process import ServerProcess

BACKENDS = ("sqlite", "postgres")
BOTH_BACKENDS = "both_backends"
"""The mark of a test (or a module's `pytestmark`) that runs once per backend: its `backend`, and the
`new_db`, `server` and `fresh_server` made from it, are SQLite's and then PostgreSQL's."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{BOTH_BACKENDS}: run on a SQLite file, then on PostgreSQL (tests/conftest.py)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Module scope: a module's servers start once per backend, its tests grouped by backend."""
    if "backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker(BOTH_BACKENDS):
        metafunc.parametrize("backend", BACKENDS, indirect=True, scope="module")


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    """The store behind the databases `new_db` makes: SQLite, unless the test is marked `both_backends`."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture(scope="module")
def new_db(backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[[], str]:
    """Makes a new, empty database of `backend`, as `--db` takes it: a SQLite file in a directory of
    its own, or a PostgreSQL URL."""
    if backend == "postgres":
        return request.getfixturevalue("postgres").database  # type: ignore[no-any-return]
    return lambda: str(tmp_path_factory.mktemp("db") / "chainrule.db")


@pytest.fixture(scope="module")
def server(new_db: Callable[[], str]) -> Iterator[ServerProcess]:
    """One real server process per test module (per backend), on an ephemeral port, with its own database."""
    process = ServerProcess(new_db()).start()
    yield process
    process.kill()


@pytest.fixture
def fresh_server(new_db: Callable[[], str]) -> Iterator[ServerProcess]:
    """A server of the test's own, for tests that kill or restart it."""
    process = ServerProcess(new_db()).start()
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
