"""WatchJob streams that read the store (replaying history, or following a job another server runs)
share WATCHER_CONNECTIONS of the server's PostgreSQL connections, however many watch: with more such
watchers than the pool has connections, all stuck on a slow store, calls still find a connection.

The store is made slow for the watchers alone: the test holds an ACCESS EXCLUSIVE lock on the table
of job events, which every watcher's first read of history waits for while GetJob, reading the jobs
table, does not. Without the watchers' bound, they would hold every connection and GetJob would wait
for one until the pool gave up (UNAVAILABLE after 5 s).
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

import chainrule.client as cr
from chainrule.server.store import WATCHER_CONNECTIONS
from tests.postgres import PostgresServer
from tests.server_process import ServerProcess
from tests.test_jobs import data, logistic_graph, wait_for
from tests.test_watchers import Watcher

POOL_SIZE = 3
WATCHERS = 8
STEPS = 12
CALL_DEADLINE_SECONDS = 30.0
"""Generous: a call that waited for a connection the watchers held would get UNAVAILABLE after 5 s."""
LOCK_WAITERS = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name = 'chainrule' AND wait_event_type = 'Lock'"
)


@pytest.fixture
def database(postgres: PostgresServer) -> str:
    return str(postgres.database())


@pytest.fixture
def small_pool(database: str) -> Iterator[ServerProcess]:
    args = ["--db-pool-size", str(POOL_SIZE), "--max-watchers", str(WATCHERS), "--max-watchers-per-tenant", "8"]
    process = ServerProcess(database, args).start()
    yield process
    process.kill()


def test_watchers_stuck_on_the_store_leave_connections_for_calls(database: str, small_pool: ServerProcess) -> None:
    assert WATCHERS > POOL_SIZE > WATCHER_CONNECTIONS
    with cr.Client(small_pool.address, timeout=CALL_DEADLINE_SECONDS) as client:
        x, y = data(64)
        graph_id = client.create_graph(logistic_graph()).graph_id
        dataset = client.upload_dataset("watched", {"x": x, "y": y}, progress=False)
        job = client.create_job(
            graph_id,
            dataset.dataset_id,
            loss="loss",
            optimizer=cr.Sgd(0.1),
            feeds={"x": "x", "y": "y"},
            batch_size=16,
            max_steps=STEPS,
        )
        assert job.wait(progress=False).state == "succeeded"
        history = job.history()
        assert history.steps == list(range(1, STEPS + 1))

        with psycopg.connect(database) as lock, psycopg.connect(database, autocommit=True) as observer:
            lock.execute("LOCK TABLE job_events IN ACCESS EXCLUSIVE MODE")

            def waiting() -> int:
                row = observer.execute(LOCK_WAITERS).fetchone()
                assert row is not None
                return int(row[0])

            watchers = [Watcher(job) for _ in range(WATCHERS)]
            wait_for(lambda: waiting() >= WATCHER_CONNECTIONS, "the watchers' reads of history to wait on the lock")

            # Every watcher is replaying history from a store that does not answer it; calls are answered.
            assert client.get_job(job.job_id).info().state == "succeeded"
            assert client.get_graph(graph_id).graph_id == graph_id
            assert [listed.job_id for listed in client.list_jobs()] == [job.job_id]
            assert waiting() == WATCHER_CONNECTIONS
            assert not any(watcher.events for watcher in watchers)
            lock.commit()

        for watcher in watchers:
            events = watcher.join()
            assert [event.step for event in events if event.state is None] == history.steps
            assert [event.loss for event in events if event.state is None] == history.losses
            assert events[-1].state == "succeeded"
