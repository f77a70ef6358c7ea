"""The PostgreSQL store: `--db postgresql://...`, the shared database of one or more servers.

The same guarantees as the SQLite store: each write is one transaction; a checkpoint is replaced
whole or not at all; a dataset's bytes go in chunk rows in the transaction that registers it;
tensors are raw little-endian bytes with their dtype and shape. What PostgreSQL adds is a network
between the server and its data, so this store also bounds how long anything waits for it:

* connections come from a psycopg_pool ConnectionPool, checked before each use, so a connection
  the database dropped (a restart) is replaced instead of failing a call;
* a call waits at most POOL_WAIT_SECONDS for a connection (UNREACHABLE_WAIT_SECONDS once the
  database is known to be down), and a connection attempt at most CONNECT_TIMEOUT_SECONDS: while
  PostgreSQL is down, calls get `Unavailable` within seconds, not after the pool's default 30;
* once PostgreSQL is back, the next call connects again (background attempts back off, but give
  up within RECONNECT_SECONDS, after which any call starts a fresh one), without a restart.

Transactions that read several statements (a checkpoint) run REPEATABLE READ, so they see one
committed state; writes run READ COMMITTED, with row locks (the graph's row first) or advisory
locks where two writers could otherwise interleave (request ids). A URL's password is never
shown: messages name the database by `location.shown`, and driver errors are scrubbed of it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from chainrule.server.errors import Unavailable
from chainrule.server.store import location
from chainrule.server.store.base import (
    REQUEST_ID_SECONDS,
    Checkpoint,
    ColumnSpec,
    CreateRequest,
    DatabaseUnusable,
    JobEventRow,
    OptimizerState,
    RequestIdTaken,
    Store,
    StoredDataset,
    StoredGraph,
    StoredJob,
    tensor_from_row,
    tensor_row,
)
from chainrule.server.store.migrations import migrate_postgres
from chainrule.server.store.sqlite import (
    DATASET_COLUMNS,
    GRAPH_COLUMNS,
    JOB_COLUMNS,
    _dataset_from_row,
    _job_from_row,
    _job_row,
)

log = logging.getLogger("chainrule.server.store")

CONNECT_TIMEOUT_SECONDS = 3
"""libpq's connect_timeout (whole seconds; it counts at least 2): a host that does not answer."""
POOL_WAIT_SECONDS = 5.0
"""The longest a call waits for a connection before it gets Unavailable."""
UNREACHABLE_WAIT_SECONDS = 1.0
"""The same while the database is known to be unreachable, so that a call that needs the store twice
(a refused checkpoint, then reading back the committed one) still answers within seconds. Each wait
also starts a new connection attempt, which succeeds at once when the database is back."""
RECONNECT_SECONDS = 4.0
"""How long the pool's background attempts to replace a lost connection back off before giving
up; a call then starts a new attempt at once. Bounds how long recovery takes once the database is back."""
POOL_MAX_CONNECTIONS = 10
"""Connections one server holds at most: calls are short, and several servers share PostgreSQL's
max_connections (100 by default)."""
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3}
"""TCP keepalives, so that a connection to a host that vanished from the network is noticed."""
REQUEST_ID_LOCK = 0x63720002
"""The advisory lock space of CreateGraph request ids (see migrations.MIGRATION_LOCK for the first)."""
UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
"""Errors that say the database could not be reached or the connection broke, not that it refused the statement."""


def graph_columns(with_order: bool) -> str:
    """GRAPH_COLUMNS; without the order, PostgreSQL drops it from the summary's JSONB before sending it."""
    columns = GRAPH_COLUMNS.split(", ")
    if not with_order:
        columns[4] = "summary - 'topological_order'"
    return ", ".join(columns)


class PostgresStore(Store):
    """A pool of connections to one PostgreSQL database, migrated to the newest schema when opened."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = location.shown(url)
        try:
            settings = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as error:
            raise DatabaseUnusable(
                f"--db {self.where} is not a PostgreSQL URL libpq accepts: {self._text(error)}"
            ) from None
        defaults: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, "application_name": "chainrule"}
        defaults.update(KEEPALIVE)
        self._connect_options = {key: value for key, value in defaults.items() if key not in settings}
        self._last_connect_error = ""
        self._unreachable = False
        self._state_lock = threading.Lock()
        try:
            with psycopg.connect(url, autocommit=True, **self._connect_options) as connection:
                migrate_postgres(connection, self.where)
        except psycopg.Error as error:
            raise DatabaseUnusable(f"cannot use the database {self.where}: {self._text(error)}") from None
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # this store logs outages once, in its own words
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=POOL_MAX_CONNECTIONS,
            kwargs={"autocommit": True, **self._connect_options},
            connection_class=self._connection_class(),
            check=ConnectionPool.check_connection,
            timeout=POOL_WAIT_SECONDS,
            reconnect_timeout=RECONNECT_SECONDS,
            name="chainrule-store",
            open=True,
        )

    def close(self) -> None:
        self._pool.close()

    # ------------------------------------------------------------ connections and errors
    def _connection_class(self) -> type[psycopg.Connection[Any]]:
        """Connections that tell the store why connecting failed, for the message of a call that then
        times out waiting (the pool only says it waited)."""
        store = self

        class Connection(psycopg.Connection[Any]):
            @classmethod
            def connect(cls, *args: Any, **kwargs: Any) -> Connection:  # type: ignore[override]
                try:
                    connection = super().connect(*args, **kwargs)
                except psycopg.Error as error:
                    store._last_connect_error = store._text(error)
                    raise
                store._last_connect_error = ""
                return connection

        return Connection

    def _text(self, error: BaseException) -> str:
        """The error's message on one line, without the URL's password."""
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return location.scrubbed("; ".join(lines) or type(error).__name__, self.url)

    def _wait(self) -> float:
        return UNREACHABLE_WAIT_SECONDS if self._unreachable else POOL_WAIT_SECONDS

    def _problem(self, error: BaseException, waited: float) -> str:
        if isinstance(error, PoolTimeout):
            why = self._last_connect_error or "every connection stayed busy"
            return f"PostgreSQL at {self.where} gave no connection within {waited:g} s ({why})"
        if isinstance(error, UNREACHABLE):
            return f"the connection to PostgreSQL at {self.where} failed ({self._text(error)})"
        return f"PostgreSQL at {self.where} refused it ({self._text(error)})"

    def _failed(self, error: BaseException, waited: float) -> None:
        if isinstance(error, UNREACHABLE):
            with self._state_lock:
                first, self._unreachable = not self._unreachable, True
            if first:
                problem = self._problem(error, waited)
                log.warning("%s; calls that need the store get UNAVAILABLE until it answers", problem)

    def _answered(self) -> None:
        if self._unreachable:
            with self._state_lock:
                was, self._unreachable = self._unreachable, False
            if was:
                log.info("PostgreSQL at %s answers again", self.where)

    @contextmanager
    def _connection(self, action: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection (autocommit: each statement its own transaction) for reads."""
        wait = self._wait()
        try:
            with self._pool.connection(wait) as connection:
                yield connection
        except (psycopg.Error, PoolTimeout) as error:
            self._failed(error, wait)
            raise Unavailable(
                f"the graph store could not {action}: {self._problem(error, wait)}", reason="STORE_UNAVAILABLE"
            ) from None
        self._answered()

    @contextmanager
    def _transaction(self, action: str, snapshot: bool = False) -> Iterator[psycopg.Connection[Any]]:
        """One atomic write (or, with `snapshot`, a read of several statements that see one committed
        state). A refused write becomes Unavailable having changed nothing; a connection lost while the
        COMMIT was on its way leaves the outcome unknown, and the message says so."""
        committing, wait = False, self._wait()
        try:
            with self._pool.connection(wait) as connection:
                with connection.transaction():
                    if snapshot:
                        connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    yield connection
                    committing = True
        except (psycopg.Error, PoolTimeout) as error:
            self._failed(error, wait)
            if committing and isinstance(error, UNREACHABLE):
                raise Unavailable(
                    f"the graph store could not confirm that it did {action}: the connection to PostgreSQL at "
                    f"{self.where} broke during the commit ({self._text(error)}); the write may or may not be stored",
                    reason="STORE_UNAVAILABLE",
                ) from None
            outcome = "" if snapshot else "; nothing was written"
            raise Unavailable(
                f"the graph store could not {action}: {self._problem(error, wait)}{outcome}", reason="STORE_UNAVAILABLE"
            ) from None
        self._answered()

    def _read(self, query: str, arguments: tuple) -> list[tuple]:
        with self._connection("be read") as connection:
            return connection.cursor(binary=True).execute(query, arguments).fetchall()

    # ------------------------------------------------------------ graphs
    def insert_graph(
        self,
        graph_id: str,
        tenant: str,
        name: str,
        definition: bytes,
        summary: dict,
        parameters: Mapping[str, np.ndarray],
        request: CreateRequest | None = None,
    ) -> StoredGraph:
        created_at = time.time()
        earlier = None
        with self._transaction(f"store graph '{name}'") as db:
            if request is not None:
                # Two servers (or threads) with the same request id take turns, as SQLite's one writer does.
                key = f"{len(tenant)}:{tenant}{request.request_id}"
                db.execute("SELECT pg_advisory_xact_lock(%s::integer, hashtext(%s))", (REQUEST_ID_LOCK, key))
                db.execute("DELETE FROM create_requests WHERE created_at < %s", (created_at - REQUEST_ID_SECONDS,))
                earlier = self._find_request(db, tenant, request.request_id, created_at)
            if earlier is None:
                row = db.execute(
                    "INSERT INTO graphs (graph_id, tenant, name, definition, summary, created_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s) RETURNING seq",
                    (graph_id, tenant, name, definition, Jsonb(summary), created_at),
                ).fetchone()
                db.cursor().executemany(
                    "INSERT INTO parameters (graph_id, name, dtype, shape, data) VALUES (%s, %s, %s, %s, %s)",
                    [(graph_id, key, *tensor_row(value)) for key, value in parameters.items()],
                )
                if request is not None:
                    db.execute(
                        "INSERT INTO create_requests (tenant, request_id, graph_id, fingerprint, created_at) "
                        "VALUES (%s, %s, %s, %s, %s)",
                        (tenant, request.request_id, graph_id, request.fingerprint, created_at),
                    )
        if earlier is not None:
            raise RequestIdTaken(*earlier)
        assert row is not None
        return StoredGraph(row[0], graph_id, tenant, name, summary, created_at, 0)

    def find_request(self, tenant: str, request_id: str) -> tuple[StoredGraph, str] | None:
        with self._connection("be read") as connection:
            return self._find_request(connection, tenant, request_id, time.time())

    def _find_request(
        self, db: psycopg.Connection[Any], tenant: str, request_id: str, now: float
    ) -> tuple[StoredGraph, str] | None:
        columns = ", ".join(f"graphs.{column}" for column in GRAPH_COLUMNS.split(", "))
        row = (
            db.cursor(binary=True)
            .execute(
                f"SELECT {columns}, create_requests.fingerprint FROM create_requests "
                "JOIN graphs ON graphs.graph_id = create_requests.graph_id "
                "WHERE create_requests.tenant = %s AND create_requests.request_id = %s "
                "AND create_requests.created_at >= %s",
                (tenant, request_id, now - REQUEST_ID_SECONDS),
            )
            .fetchone()
        )
        return None if row is None else (_graph_from_row(row[:-1]), row[-1])

    def count_graphs(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM graphs", ())[0][0])

    def get_graph(self, graph_id: str, tenant: str, with_order: bool = True) -> StoredGraph | None:
        rows = self._read(
            f"SELECT {graph_columns(with_order)} FROM graphs WHERE graph_id = %s AND tenant = %s", (graph_id, tenant)
        )
        return _graph_from_row(rows[0]) if rows else None

    def list_graphs(self, tenant: str, after_seq: int, limit: int, with_order: bool = True) -> list[StoredGraph]:
        rows = self._read(
            f"SELECT {graph_columns(with_order)} FROM graphs WHERE tenant = %s AND seq > %s ORDER BY seq LIMIT %s",
            (tenant, after_seq, limit),
        )
        return [_graph_from_row(row) for row in rows]

    def definition(self, graph_id: str) -> bytes | None:
        rows = self._read("SELECT definition FROM graphs WHERE graph_id = %s", (graph_id,))
        return rows[0][0] if rows else None

    def delete_graph(self, graph_id: str) -> bool:
        with self._transaction(f"delete graph '{graph_id}'") as db:
            return db.execute("DELETE FROM graphs WHERE graph_id = %s", (graph_id,)).rowcount > 0

    # ------------------------------------------------------------ parameters and training state
    def load_checkpoint(self, graph_id: str) -> Checkpoint | None:
        with self._transaction(f"read the checkpoint of graph '{graph_id}'", snapshot=True) as db:
            cursor = db.cursor(binary=True)
            row = cursor.execute("SELECT step FROM graphs WHERE graph_id = %s", (graph_id,)).fetchone()
            if row is None:
                return None
            (step,) = row
            parameter_rows = cursor.execute(
                "SELECT name, dtype, shape, data FROM parameters WHERE graph_id = %s", (graph_id,)
            ).fetchall()
            state_rows = cursor.execute(
                "SELECT name, optimizer, slot, dtype, shape, data FROM optimizer_state WHERE graph_id = %s",
                (graph_id,),
            ).fetchall()
        parameters = {name: tensor_from_row(dtype, shape, data) for name, dtype, shape, data in parameter_rows}
        state: OptimizerState = {}
        for name, optimizer, slot, dtype, shape, data in state_rows:
            state.setdefault(name, (optimizer, {}))[1][slot] = tensor_from_row(dtype, shape, data)
        return Checkpoint(step, parameters, state)

    def save_checkpoint(self, graph_id: str, checkpoint: Checkpoint) -> None:
        with self._transaction(f"save a checkpoint of graph '{graph_id}'") as db:
            _write_checkpoint(db, graph_id, checkpoint)

    # ------------------------------------------------------------ jobs
    def insert_job(self, job: StoredJob) -> StoredJob:
        columns = JOB_COLUMNS.removesuffix(", seq")
        with self._transaction(f"store job '{job.job_id}'") as db:
            row = db.execute(
                f"INSERT INTO jobs ({columns}) VALUES ({', '.join(['%s'] * len(columns.split(', ')))}) RETURNING seq",
                _job_row(job),
            ).fetchone()
        assert row is not None
        return replace(job, seq=row[0])

    def get_job(self, job_id: str, tenant: str) -> StoredJob | None:
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = %s AND tenant = %s", (job_id, tenant))
        return _job_from_row(rows[0]) if rows else None

    def list_jobs(
        self, tenant: str, after_seq: int, limit: int, states: tuple[str, ...] = (), graph_id: str = ""
    ) -> list[StoredJob]:
        conditions, arguments = ["tenant = %s", "seq > %s"], [tenant, after_seq]
        if states:
            conditions.append("state = ANY(%s)")
            arguments.append(list(states))
        if graph_id:
            conditions.append("graph_id = %s")
            arguments.append(graph_id)
        rows = self._read(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE {' AND '.join(conditions)} ORDER BY seq LIMIT %s",
            (*arguments, limit),
        )
        return [_job_from_row(row) for row in rows]

    def unfinished_jobs(self) -> list[StoredJob]:
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('QUEUED', 'RUNNING') ORDER BY seq", ())
        return [_job_from_row(row) for row in rows]

    def save_job(
        self, job: StoredJob, events: tuple[JobEventRow, ...] = (), checkpoint: Checkpoint | None = None
    ) -> None:
        with self._transaction(f"save job '{job.job_id}' at step {job.step}") as db:
            if checkpoint is not None:
                _write_checkpoint(db, job.graph_id, checkpoint)
            db.execute(
                "UPDATE jobs SET state = %s, step = %s, epoch = %s, loss = %s, metrics = %s, error = %s, "
                "started_at = %s, ended_at = %s, start_graph_step = %s WHERE job_id = %s",
                (
                    job.state,
                    job.step,
                    job.epoch,
                    job.loss,
                    json.dumps(job.metrics),
                    job.error,
                    job.started_at,
                    job.ended_at,
                    job.start_graph_step,
                    job.job_id,
                ),
            )
            db.cursor().executemany(
                "INSERT INTO job_events (job_id, step, epoch, loss, learning_rate, metrics) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (job.job_id, e.step, e.epoch, e.loss, e.learning_rate, json.dumps(e.metrics) if e.metrics else None)
                    for e in events
                ],
            )

    def job_events(self, job_id: str, from_step: int, limit: int) -> list[JobEventRow]:
        rows = self._read(
            "SELECT step, epoch, loss, learning_rate, metrics FROM job_events WHERE job_id = %s AND step >= %s "
            "ORDER BY step LIMIT %s",
            (job_id, from_step, limit),
        )
        return [
            JobEventRow(step, epoch, math.nan if loss is None else loss, rate, json.loads(metrics) if metrics else {})
            for step, epoch, loss, rate, metrics in rows
        ]

    # ------------------------------------------------------------ datasets
    def insert_dataset(
        self,
        dataset_id: str,
        tenant: str,
        name: str,
        columns: tuple[ColumnSpec, ...],
        num_examples: int,
        size_bytes: int,
        chunks: Iterable[tuple[int, bytes]],
        sha256: Callable[[], str],
    ) -> StoredDataset:
        """The record goes in after the rows (their foreign key is checked at commit), once `sha256` is known."""
        layout = json.dumps([{"name": c.name, "dtype": c.dtype, "shape": list(c.shape)} for c in columns])
        rows_per_column = [0] * len(columns)

        def numbered() -> Iterator[tuple[str, int, int, bytes]]:
            for column, data in chunks:
                yield dataset_id, column, rows_per_column[column], data
                rows_per_column[column] += 1

        with self._transaction(f"store dataset '{name}'") as db:
            db.cursor().executemany(
                "INSERT INTO dataset_chunks (dataset_id, column_index, chunk_index, data) VALUES (%s, %s, %s, %s)",
                numbered(),
            )
            digest, created_at = sha256(), time.time()
            row = db.execute(
                f"INSERT INTO datasets ({DATASET_COLUMNS.removeprefix('seq, ')}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING seq",
                (dataset_id, tenant, name, layout, num_examples, size_bytes, digest, created_at),
            ).fetchone()
        assert row is not None
        return StoredDataset(row[0], dataset_id, tenant, name, columns, num_examples, size_bytes, digest, created_at)

    def get_dataset(self, dataset_id: str, tenant: str) -> StoredDataset | None:
        rows = self._read(
            f"SELECT {DATASET_COLUMNS} FROM datasets WHERE dataset_id = %s AND tenant = %s", (dataset_id, tenant)
        )
        return _dataset_from_row(rows[0]) if rows else None

    def list_datasets(self, tenant: str, after_seq: int, limit: int) -> list[StoredDataset]:
        rows = self._read(
            f"SELECT {DATASET_COLUMNS} FROM datasets WHERE tenant = %s AND seq > %s ORDER BY seq LIMIT %s",
            (tenant, after_seq, limit),
        )
        return [_dataset_from_row(row) for row in rows]

    def delete_dataset(self, dataset_id: str) -> bool:
        with self._transaction(f"delete dataset '{dataset_id}'") as db:
            return db.execute("DELETE FROM datasets WHERE dataset_id = %s", (dataset_id,)).rowcount > 0

    def dataset_chunks(self, dataset_id: str) -> Iterator[tuple[int, bytes]]:
        """One row per query, so that no connection is held between the rows a caller reads."""
        keys = self._read(
            "SELECT column_index, chunk_index FROM dataset_chunks WHERE dataset_id = %s "
            "ORDER BY column_index, chunk_index",
            (dataset_id,),
        )
        for column, chunk in keys:
            rows = self._read(
                "SELECT data FROM dataset_chunks WHERE dataset_id = %s AND column_index = %s AND chunk_index = %s",
                (dataset_id, column, chunk),
            )
            if not rows:
                return
            yield column, rows[0][0]

    def dataset_hashes(self) -> set[str]:
        return {sha256 for (sha256,) in self._read("SELECT DISTINCT sha256 FROM datasets", ())}


def _graph_from_row(row: tuple) -> StoredGraph:
    seq, graph_id, tenant, name, summary, created_at, step = row
    return StoredGraph(seq, graph_id, tenant, name, summary, created_at, step)


def _write_checkpoint(db: psycopg.Connection[Any], graph_id: str, checkpoint: Checkpoint) -> None:
    """The graph's step, parameters and optimizer state, within the caller's transaction. The graph's
    row is written first: its lock makes concurrent checkpoints of one graph take turns."""
    db.execute("UPDATE graphs SET step = %s WHERE graph_id = %s", (checkpoint.step, graph_id))
    cursor = db.cursor()
    cursor.executemany(
        "INSERT INTO parameters (graph_id, name, dtype, shape, data) VALUES (%s, %s, %s, %s, %s) "
        "ON CONFLICT (graph_id, name) DO UPDATE SET dtype = excluded.dtype, shape = excluded.shape, "
        "data = excluded.data",
        [(graph_id, name, *tensor_row(value)) for name, value in checkpoint.parameters.items()],
    )
    db.execute("DELETE FROM optimizer_state WHERE graph_id = %s", (graph_id,))
    cursor.executemany(
        "INSERT INTO optimizer_state (graph_id, name, optimizer, slot, dtype, shape, data) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        [
            (graph_id, name, optimizer, slot, *tensor_row(array))
            for name, (optimizer, arrays) in checkpoint.optimizer_state.items()
            for slot, array in arrays.items()
        ],
    )
