"""What a call on PostgreSQL pays to borrow a pooled connection (server/store/postgres.py,
PostgresStore._check): nothing for a connection that heard from PostgreSQL moments ago, one round
trip for one that sat idle, and a replacement, never a failed call, for one whose session
PostgreSQL ended. Round trips are counted on a real PostgreSQL store: every exchange of a store's
connection with the database, statements and checks alike, passes through the store's `_heard`, and
waits on the connection's socket there."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from chainrule.server.store import postgres as store_module
from chainrule.server.store.postgres import PostgresStore
from tests.postgres import PostgresServer


class RoundTrips:
    """Counts one store's exchanges with PostgreSQL, and the pool's empty-query checks among them."""

    def __init__(self, store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.exchanges = 0
        self.checks = 0
        self._lock = threading.Lock()
        heard = store._heard
        check = store_module.ConnectionPool.check_connection

        def counted_heard(gen):  # type: ignore[no-untyped-def]
            """`heard(gen)`, counted if it waits on the socket at all (a commit with no transaction open,
            as when the pool takes back an autocommit connection, sends nothing)."""
            exchange = heard(gen)
            try:
                state = next(exchange)
                with self._lock:
                    self.exchanges += 1
                while True:
                    state = exchange.send((yield state))
            except StopIteration as done:
                return done.value

        def counted_check(connection) -> None:  # type: ignore[no-untyped-def]
            with self._lock:
                self.checks += 1
            check(connection)

        monkeypatch.setattr(store, "_heard", counted_heard)
        monkeypatch.setattr(store_module.ConnectionPool, "check_connection", staticmethod(counted_check))

    def during(self, call: Callable[[], object]) -> tuple[int, int]:
        """The exchanges and checks of one call."""
        exchanges, checks = self.exchanges, self.checks
        call()
        return self.exchanges - exchanges, self.checks - checks


@pytest.fixture
def store(postgres: PostgresServer) -> Iterator[PostgresStore]:
    opened = PostgresStore(postgres.database(), pool_size=1)  # one connection: every call borrows the same
    yield opened
    opened.close()


def test_back_to_back_calls_pay_only_their_own_round_trips(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    trips = RoundTrips(store, monkeypatch)
    monkeypatch.setattr(store_module, "FRESH_SECONDS", 60.0)  # back to back however long a loaded machine stalls
    store.count_graphs()
    for _ in range(20):
        assert trips.during(store.count_graphs) == (1, 0)
        assert trips.during(lambda: store.graph_version("no-such-graph", "")) == (1, 0)


def test_a_connection_idle_past_the_fresh_interval_is_checked_first(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    trips = RoundTrips(store, monkeypatch)
    monkeypatch.setattr(store_module, "FRESH_SECONDS", 0.05)
    store.count_graphs()
    time.sleep(0.1)
    assert trips.during(store.count_graphs) == (2, 1)
    monkeypatch.setattr(store_module, "FRESH_SECONDS", 60.0)  # the next call is within it, however loaded the machine
    assert trips.during(store.count_graphs) == (1, 0)


def test_a_session_postgresql_ended_is_replaced_before_a_call_gets_it(
    store: PostgresStore, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a restart ends every session. However recently the connection was used (the fresh interval
    is made endless here), what PostgreSQL sent as it ended the session makes the pool check it."""
    monkeypatch.setattr(store_module, "FRESH_SECONDS", float("inf"))
    trips = RoundTrips(store, monkeypatch)
    store.count_graphs()
    database = store.url.rsplit("/", 1)[1]
    sessions = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = 'chainrule'"
    with postgres.connect() as admin:
        pids = [pid for (pid,) in admin.execute(sessions, (database,)).fetchall()]
        assert pids
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))  # waits until the session is gone
    assert trips.during(store.count_graphs)[1] >= 1  # the call succeeds: the pool checked, then replaced it
    assert store.count_graphs() == 0
