"""The PostgreSQL store: `--db postgresql://...`, the shared database of one or more servers.

The same guarantees as the SQLite store: each write is one transaction; a checkpoint is replaced
whole or not at all; a dataset's bytes go in chunk rows in the transaction that registers it;
tensors are raw little-endian bytes with their dtype and shape. What PostgreSQL adds is a network
between the server and its data, so this store also bounds how long anything waits for it:

* connections come from a psycopg_pool ConnectionPool, checked before use when they may have gone
  bad (see PostgresStore._check), so a connection the database dropped (a restart) is replaced
  instead of failing a call;
* a call waits at most POOL_WAIT_SECONDS for a connection (UNREACHABLE_WAIT_SECONDS once the
  database is known to be down), and a connection attempt at most CONNECT_TIMEOUT_SECONDS: while
  PostgreSQL is down, calls get `Unavailable` within seconds, not after the pool's default 30;
* a connection that hears nothing from PostgreSQL for SILENCE_SECONDS while it waits (for a query,
  a commit, the pool's check) makes the store ask whether the database still answers a new
  connection (within PROBE_SECONDS): a database that does not (its processes stopped, its host
  gone from the network) gets that connection closed and the call Unavailable, where it would
  otherwise wait forever, since the kernel of a stopped process's host keeps its sockets up; a
  database that does answer is only slow, or holding a lock, and the wait goes on;
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
import select
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
import psycopg
from psycopg.abc import PQGen
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from chainrule.server.errors import Unavailable
from chainrule.server.store import location
from chainrule.server.store.base import (
    ENDED_JOB_STATES,
    REQUEST_ID_SECONDS,
    Checkpoint,
    ClaimLost,
    ColumnSpec,
    CreateRequest,
    DatabaseUnusable,
    Fence,
    JobEventRow,
    RequestIdTaken,
    Store,
    StoredDataset,
    StoredGraph,
    StoredJob,
    TrainerLease,
    checkpoint_from_rows,
    dataset_busy,
    job_trainer,
    job_trainers,
    missing_dataset,
    tensor_row,
)
from chainrule.server.store.migrations import migrate_postgres
from chainrule.server.store.sqlite import (
    DATASET_COLUMNS,
    GRAPH_COLUMNS,
    JOB_COLUMNS,
    NEW_JOB_COLUMNS,
    _dataset_from_row,
    _job_from_row,
    _job_row,
    _refuse,
)

log = logging.getLogger("chainrule.server.store")
RV = TypeVar("RV")

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
DEFAULT_POOL_SIZE = 10
"""The connections of a store opened with no `pool_size`; a server sizes its own (--db-pool-size)."""
SILENCE_SECONDS = 2.0
"""How long a connection waits on PostgreSQL without receiving a byte before the store asks whether
the database still answers (a statement may run longer: a database that answers is left to finish it)."""
PROBE_SECONDS = 2
"""How long that question (a new connection) waits for an answer; psycopg counts at least 2 s. With
SILENCE_SECONDS, the longest a call waits on a database that stopped answering, about 4 s, so that it
gets Unavailable within the 5 s it would wait for a connection, as when the database is stopped."""
WAIT_INTERVAL = 0.1
"""How often a waiting connection looks up (psycopg's own default)."""
PROBE_REUSE_SECONDS = 1.0
"""How long one answer serves the other connections asking at the same time."""
FRESH_SECONDS = 1.0
"""How long after a connection last heard from PostgreSQL the pool lends it without a round trip to
check it, if nothing has arrived on its socket since (see PostgresStore._check)."""
KEEPALIVE = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}
"""TCP keepalives and a bound (milliseconds) on data left unacknowledged, so that the kernel drops a
connection to a host that vanished from the network, whether it was idle or sending."""
REQUEST_ID_LOCK = 0x63720002
"""The advisory lock space of CreateGraph request ids (see migrations.MIGRATION_LOCK for the first)."""
ORDER_LOCKS = {"graphs": 0x63720003, "jobs": 0x63720004, "datasets": 0x63720005}
"""Advisory locks that make each table's `seq` commit-ordered (see _in_commit_order)."""
NOW = "extract(epoch FROM clock_timestamp())::double precision"
"""Leases are timed by the database's clock, the one clock every server shares."""
IN_USE = "SELECT 1 FROM jobs WHERE state IN ('QUEUED', 'RUNNING') AND position(%s::bytea IN spec) > 0 LIMIT 1"
"""As sqlite.IN_USE."""
UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
"""Errors that say the database could not be reached or the connection broke, not that it refused the statement."""


def graph_columns(with_order: bool) -> str:
    """GRAPH_COLUMNS; without the order, PostgreSQL drops it from the summary's JSONB before sending it."""
    columns = GRAPH_COLUMNS.split(", ")
    if not with_order:
        columns[4] = "summary - 'topological_order'"
    return ", ".join(columns)


class Unanswered(psycopg.OperationalError):
    """PostgreSQL sent nothing for SILENCE_SECONDS and answered no new connection: the store closed the
    connection that waited."""


class PostgresStore(Store):
    """A pool of at most `pool_size` connections to one PostgreSQL database, migrated to the newest
    schema when opened."""

    shared = True

    def __init__(self, url: str, pool_size: int = DEFAULT_POOL_SIZE) -> None:
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
        self._probe_lock = threading.Lock()
        self._probed_at, self._probe_answered = -math.inf, True
        self._pool: ConnectionPool[Any] | None = None
        connection_class = self._connection_class()
        try:
            with connection_class.connect(url, autocommit=True, **self._connect_options) as connection:
                migrate_postgres(connection, self.where)
        except psycopg.Error as error:
            raise DatabaseUnusable(f"cannot use the database {self.where}: {self._text(error)}") from None
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # this store logs outages once, in its own words
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, **self._connect_options},
            connection_class=connection_class,
            check=self._check,
            timeout=POOL_WAIT_SECONDS,
            reconnect_timeout=RECONNECT_SECONDS,
            name="chainrule-store",
            open=True,
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    # ------------------------------------------------------------ connections and errors
    @staticmethod
    def _check(connection: psycopg.Connection[Any]) -> None:
        """The pool's check of a connection before it lends it. psycopg_pool's own check
        (ConnectionPool.check_connection, an empty query) costs a round trip to PostgreSQL on every
        checkout, which on a busy server is one more round trip per call than its queries need. A
        connection goes bad in one of two ways, and neither needs that round trip to be seen:

        * PostgreSQL ended its session (a restart, a crash, a terminated backend): its socket then holds
          the server's goodbye or end of file, which a zero-timeout poll sees without sending anything;
        * PostgreSQL went away without a word (its host gone, frozen): nothing can show that locally, but
          a connection that heard from it less than FRESH_SECONDS ago, back to back calls, is as good as
          the round trip would have found it; one that sat idle longer may have sat through such an
          outage, and is checked with psycopg_pool's query as before.

        Checked or not, a connection that breaks during a call is closed by psycopg and replaced by the
        pool, and a database that goes silent mid-call is caught by _heard."""
        heard_at = getattr(connection, "heard_at", -math.inf)
        if time.monotonic() - heard_at >= FRESH_SECONDS or _has_input(connection):
            ConnectionPool.check_connection(connection)

    def _connection_class(self) -> type[psycopg.Connection[Any]]:
        """Connections that tell the store why connecting failed, for the message of a call that then
        times out waiting (the pool only says it waited), that give up a wait on a database that went
        silent (see _heard), and that note when they last heard from PostgreSQL (`heard_at`, for _check).
        Every wait of a psycopg connection (statements, commits, the pool's check) goes through its `wait`."""
        store = self

        class Connection(psycopg.Connection[Any]):
            heard_at = -math.inf

            @classmethod
            def connect(cls, *args: Any, **kwargs: Any) -> Connection:  # type: ignore[override]
                try:
                    connection = super().connect(*args, **kwargs)
                except psycopg.Error as error:
                    store._last_connect_error = store._text(error)
                    raise
                store._last_connect_error = ""
                connection.heard_at = time.monotonic()
                return connection

            def wait(self, gen: PQGen[RV], interval: float = WAIT_INTERVAL, timeout: float | None = None) -> RV:
                try:
                    done = super().wait(store._heard(gen), interval, timeout)
                except Unanswered:
                    self.pgconn.finish()  # given up mid-exchange: the connection can say nothing more
                    raise
                self.heard_at = time.monotonic()
                return done

        return Connection

    def _heard(self, gen: PQGen[RV]) -> PQGen[RV]:
        """`gen`, the exchange a connection waits on, passed through, except that once it has waited
        SILENCE_SECONDS without a byte, and the database answers no new connection either, it ends with
        Unanswered. psycopg resumes the exchange every WAIT_INTERVAL, with nothing ready when nothing came."""
        heard = time.monotonic()
        try:
            state = next(gen)
            while True:
                ready = yield state
                if ready:
                    heard = time.monotonic()
                elif time.monotonic() - heard >= SILENCE_SECONDS:
                    if not self._answers():
                        raise Unanswered(
                            f"PostgreSQL at {self.where} sent nothing for {SILENCE_SECONDS:g} s and answered no new "
                            f"connection within {PROBE_SECONDS} s (stopped, or cut off): the connection was closed"
                        )
                    heard = time.monotonic()  # only slow: ask again after as long
                state = gen.send(ready)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _answers(self) -> bool:
        """Whether PostgreSQL answers a new connection within PROBE_SECONDS (one attempt at a time, its
        answer shared for PROBE_REUSE_SECONDS). When it does not, the pool's idle connections, which
        would each hang its next check as long, are closed, and the pool connects again in the background."""
        with self._probe_lock:
            if time.monotonic() - self._probed_at >= PROBE_REUSE_SECONDS:
                try:
                    psycopg.connect(self.url, **{**self._connect_options, "connect_timeout": PROBE_SECONDS}).close()
                    answered = True
                except psycopg.errors.ConnectionTimeout:
                    answered = False
                except psycopg.Error:
                    answered = True  # it answered, if only to refuse: what the connection waits for may come
                if not answered:
                    self._last_connect_error = (
                        f"it went silent: a connection heard nothing for {SILENCE_SECONDS:g} s, and a new one no "
                        f"answer within {PROBE_SECONDS} s"
                    )
                    if self._pool is not None:
                        self._pool.drain()
                self._probed_at, self._probe_answered = time.monotonic(), answered
            return self._probe_answered

    def _text(self, error: BaseException) -> str:
        """The error's message on one line, without the URL's password."""
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return location.scrubbed("; ".join(lines) or type(error).__name__, self.url)

    def _wait(self) -> float:
        return UNREACHABLE_WAIT_SECONDS if self._unreachable else POOL_WAIT_SECONDS

    def _problem(self, error: BaseException, waited: float) -> str:
        if isinstance(error, Unanswered):
            return str(error)
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
                seq = _in_commit_order(db, "graphs", "graph_id", graph_id)
        if earlier is not None:
            raise RequestIdTaken(*earlier)
        assert row is not None
        return StoredGraph(seq, graph_id, tenant, name, summary, created_at, 0)

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
            row = cursor.execute("SELECT step, version FROM graphs WHERE graph_id = %s", (graph_id,)).fetchone()
            if row is None:
                return None
            step, version = row
            parameter_rows = cursor.execute(
                "SELECT name, dtype, shape, data FROM parameters WHERE graph_id = %s", (graph_id,)
            ).fetchall()
            state_rows = cursor.execute(
                "SELECT name, optimizer, slot, dtype, shape, data FROM optimizer_state WHERE graph_id = %s",
                (graph_id,),
            ).fetchall()
        return checkpoint_from_rows(step, version, parameter_rows, state_rows)

    def save_checkpoint(self, graph_id: str, checkpoint: Checkpoint, fence: Fence | None = None) -> int:
        with self._transaction(f"save a checkpoint of graph '{graph_id}'") as db:
            return _write_checkpoint(db, graph_id, checkpoint, fence)

    # ------------------------------------------------------------ several servers
    def graph_version(self, graph_id: str, tenant: str) -> int | None:
        rows = self._read("SELECT version FROM graphs WHERE graph_id = %s AND tenant = %s", (graph_id, tenant))
        return int(rows[0][0]) if rows else None

    def acquire_trainer(
        self, graph_id: str, trainer: str, seconds: float | None, replaces: str | None = None
    ) -> TrainerLease | None:
        with self._transaction(f"lease graph '{graph_id}' for training") as db:
            return _take_trainer(db, graph_id, trainer, seconds, replaces)

    def trainer_of(self, graph_id: str) -> str | None:
        rows = self._read(
            f"SELECT CASE WHEN trainer_until < {NOW} THEN '' ELSE trainer END FROM graphs WHERE graph_id = %s",
            (graph_id,),
        )
        return str(rows[0][0]) if rows else None

    def renew_trainers(self, trainer: str, graph_ids: Sequence[str], seconds: float) -> set[str]:
        with self._transaction("renew trainer leases") as db:
            rows = db.execute(
                f"UPDATE graphs SET trainer_until = {NOW} + %s::double precision "
                "WHERE graph_id = ANY(%s) AND trainer = %s RETURNING graph_id",
                (seconds, list(graph_ids), trainer),
            ).fetchall()
        return {graph_id for (graph_id,) in rows}

    def release_trainer(self, graph_id: str, trainer: str) -> None:
        with self._transaction(f"release the trainer lease of graph '{graph_id}'") as db:
            _release_trainer(db, graph_id, trainer)

    def release_all_leases(self) -> None:
        raise NotImplementedError("other servers may hold leases on a PostgreSQL database: they lapse instead")

    # ------------------------------------------------------------ jobs
    def insert_job(self, job: StoredJob, datasets: Sequence[str] = ()) -> StoredJob:
        placeholders = ", ".join(["%s"] * len(NEW_JOB_COLUMNS.split(", ")))
        with self._transaction(f"store job '{job.job_id}'") as db:
            for dataset_id in datasets:  # a delete_dataset waits for this lock, then finds the job
                found = db.execute(
                    "SELECT 1 FROM datasets WHERE dataset_id = %s FOR KEY SHARE", (dataset_id,)
                ).fetchone()
                if found is None:
                    raise missing_dataset(dataset_id)
            db.execute(f"INSERT INTO jobs ({NEW_JOB_COLUMNS}) VALUES ({placeholders})", _job_row(job))
            seq = _in_commit_order(db, "jobs", "job_id", job.job_id)
        return replace(job, seq=seq)

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
        self,
        job: StoredJob,
        events: tuple[JobEventRow, ...] = (),
        checkpoint: Checkpoint | None = None,
        fence: Fence | None = None,
        claim: str | None = None,
    ) -> int | None:
        version = None
        with self._transaction(f"save job '{job.job_id}' at step {job.step}") as db:
            if checkpoint is not None:
                version = _write_checkpoint(db, job.graph_id, checkpoint, fence)
            ended = job.state in ENDED_JOB_STATES
            cursor = db.execute(
                "UPDATE jobs SET state = %s, step = %s, epoch = %s, loss = %s, metrics = %s, error = %s, "
                "started_at = %s, ended_at = %s, start_graph_step = %s, resumes = %s, "
                "claim = CASE WHEN %s THEN '' ELSE claim END, "
                "lease_until = CASE WHEN %s THEN NULL ELSE lease_until END "
                "WHERE job_id = %s AND (%s::text IS NULL OR claim = %s)",
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
                    job.resumes,
                    ended,
                    ended,
                    job.job_id,
                    claim,
                    claim,
                ),
            )
            if claim is not None and cursor.rowcount == 0:
                raise ClaimLost(f"job '{job.job_id}' is no longer held by this server's claim")
            if ended:
                _release_job_trainer(db, job.graph_id, job.job_id)
            db.cursor().executemany(
                "INSERT INTO job_events (job_id, step, epoch, loss, learning_rate, metrics) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (job.job_id, e.step, e.epoch, e.loss, e.learning_rate, json.dumps(e.metrics) if e.metrics else None)
                    for e in events
                ],
            )
        return version

    def claim_job(
        self,
        claim: str,
        worker: str,
        seconds: float | None,
        skip: Collection[str] = (),
        max_replicas: int | None = None,
    ) -> StoredJob | None:
        """FOR UPDATE SKIP LOCKED: servers claiming at the same moment each pass over the jobs the others
        are looking at, instead of waiting for them."""
        candidates = self._read(
            "SELECT job_id, graph_id FROM jobs WHERE state IN ('QUEUED', 'RUNNING') "
            f"AND (claim = '' OR lease_until < {NOW}) AND (%s::integer IS NULL OR replicas <= %s::integer) "
            "ORDER BY state = 'QUEUED', seq",
            (max_replicas, max_replicas),
        )
        candidates = [(job_id, graph_id) for job_id, graph_id in candidates if graph_id not in skip]
        if not candidates:
            return None
        with self._transaction("claim a job") as db:
            for job_id, graph_id in candidates:
                still = db.execute(
                    "SELECT 1 FROM jobs WHERE job_id = %s AND state IN ('QUEUED', 'RUNNING') "
                    f"AND (claim = '' OR lease_until < {NOW}) FOR UPDATE SKIP LOCKED",
                    (job_id,),
                ).fetchone()
                trainer = job_trainer(job_id, claim)
                lease = None if still is None else _take_trainer(db, graph_id, trainer, None, job_trainers(job_id))
                if still is None or (lease is not None and not lease.granted):
                    continue
                row = (
                    db.cursor(binary=True)
                    .execute(
                        f"UPDATE jobs SET claim = %s, worker = %s, lease_until = {NOW} + %s::double precision, "
                        "resumes = resumes + CASE WHEN state = 'RUNNING' THEN 1 ELSE 0 END, status_message = '' "
                        f"WHERE job_id = %s RETURNING {JOB_COLUMNS}",
                        (claim, worker, seconds, job_id),
                    )
                    .fetchone()
                )
                assert row is not None
                return _job_from_row(row)
        return None

    def renew_claims(self, claims: Mapping[str, str], seconds: float) -> dict[str, bool]:
        if not claims:
            return {}
        with self._transaction("renew job claims") as db:
            rows = db.execute(
                f"UPDATE jobs SET lease_until = {NOW} + %s::double precision "
                "FROM unnest(%s::text[], %s::text[]) AS held(job_id, claim) "
                "WHERE jobs.job_id = held.job_id AND jobs.claim = held.claim "
                "RETURNING jobs.job_id, jobs.cancel_requested",
                (seconds, list(claims), list(claims.values())),
            ).fetchall()
        return {job_id: bool(cancel) for job_id, cancel in rows}

    def set_job_status(self, job_id: str, claim: str, message: str) -> None:
        with self._transaction(f"set the status of job '{job_id}'") as db:
            db.execute("UPDATE jobs SET status_message = %s WHERE job_id = %s AND claim = %s", (message, job_id, claim))

    def release_claim(self, job_id: str, claim: str) -> None:
        with self._transaction(f"release job '{job_id}'") as db:
            db.execute(
                "UPDATE jobs SET claim = '', lease_until = NULL WHERE job_id = %s AND claim = %s", (job_id, claim)
            )

    def cancel_job(self, job_id: str, tenant: str, ended_at: float) -> StoredJob | None:
        with self._transaction(f"cancel job '{job_id}'") as db:
            found = (
                db.cursor(binary=True)
                .execute(
                    f"SELECT {JOB_COLUMNS}, {NOW} FROM jobs WHERE job_id = %s AND tenant = %s FOR UPDATE",
                    (job_id, tenant),
                )
                .fetchone()
            )
            if found is None:
                return None
            job, now = _job_from_row(found[:-1]), found[-1]
            if job.state in ENDED_JOB_STATES:
                return job
            if job.claim and (job.lease_until is None or job.lease_until >= now):
                db.execute("UPDATE jobs SET cancel_requested = TRUE WHERE job_id = %s", (job_id,))
                return replace(job, cancel_requested=True)
            db.execute(
                "UPDATE jobs SET state = 'CANCELLED', ended_at = %s, claim = '', lease_until = NULL WHERE job_id = %s",
                (ended_at, job_id),
            )
            _release_job_trainer(db, job.graph_id, job_id)
            return replace(job, state="CANCELLED", ended_at=ended_at, claim="", lease_until=None)

    def dataset_in_use(self, dataset_id: str) -> bool:
        return bool(self._read(IN_USE, (dataset_id.encode(),)))

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
            db.execute(
                f"INSERT INTO datasets ({DATASET_COLUMNS.removeprefix('seq, ')}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (dataset_id, tenant, name, layout, num_examples, size_bytes, digest, created_at),
            )
            seq = _in_commit_order(db, "datasets", "dataset_id", dataset_id)
        return StoredDataset(seq, dataset_id, tenant, name, columns, num_examples, size_bytes, digest, created_at)

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
        """The dataset's row is locked before the jobs are looked at: an insert_job that holds its KEY SHARE
        lock commits first (and its job is seen), or finds the dataset gone."""
        with self._transaction(f"delete dataset '{dataset_id}'") as db:
            if db.execute("SELECT 1 FROM datasets WHERE dataset_id = %s FOR UPDATE", (dataset_id,)).fetchone() is None:
                return False
            if db.execute(IN_USE, (dataset_id.encode(),)).fetchone() is not None:
                raise dataset_busy(dataset_id)
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


def _has_input(connection: psycopg.Connection[Any]) -> bool:
    """Whether anything arrived on an idle connection's socket (what PostgreSQL sends a session unasked
    is mostly that it is over; anything at all earns the round trip), or the connection is closed."""
    try:
        socket = connection.fileno()
    except psycopg.OperationalError:
        return True
    poll = select.poll()
    poll.register(socket, select.POLLIN)
    return bool(poll.poll(0))


def _graph_from_row(row: tuple) -> StoredGraph:
    seq, graph_id, tenant, name, summary, created_at, step, version = row
    return StoredGraph(seq, graph_id, tenant, name, summary, created_at, step, version)


def _in_commit_order(db: psycopg.Connection[Any], table: str, key_column: str, key: str) -> int:
    """Give the row just inserted a new `seq` at the end of its transaction, under a lock held until the
    commit: so seq values become visible in increasing order. Identity values are drawn when rows are
    inserted, and transactions that insert at the same time commit in any order, so a listing paged
    by seq could otherwise pass a value whose row commits a moment later, and never show it."""
    db.execute("SELECT pg_advisory_xact_lock(%s::bigint)", (ORDER_LOCKS[table],))
    row = db.execute(f"UPDATE {table} SET seq = DEFAULT WHERE {key_column} = %s RETURNING seq", (key,)).fetchone()
    assert row is not None
    return int(row[0])


def _take_trainer(
    db: psycopg.Connection[Any], graph_id: str, trainer: str, seconds: float | None, replaces: str | None = None
) -> TrainerLease | None:
    """As sqlite._take_trainer."""
    row = db.execute(
        f"UPDATE graphs SET trainer = %s, trainer_until = {NOW} + %s::double precision WHERE graph_id = %s "
        f"AND (trainer IN ('', %s) OR trainer_until < {NOW} OR starts_with(trainer, %s)) RETURNING version",
        (trainer, seconds, graph_id, trainer, replaces),
    ).fetchone()
    if row is not None:
        return TrainerLease(True, trainer, row[0])
    found = db.execute("SELECT trainer, version FROM graphs WHERE graph_id = %s", (graph_id,)).fetchone()
    return None if found is None else TrainerLease(False, *found)


def _release_trainer(db: psycopg.Connection[Any], graph_id: str, trainer: str) -> None:
    db.execute(
        "UPDATE graphs SET trainer = '', trainer_until = NULL WHERE graph_id = %s AND trainer = %s", (graph_id, trainer)
    )


def _release_job_trainer(db: psycopg.Connection[Any], graph_id: str, job_id: str) -> None:
    """As sqlite._release_job_trainer."""
    db.execute(
        "UPDATE graphs SET trainer = '', trainer_until = NULL WHERE graph_id = %s AND starts_with(trainer, %s)",
        (graph_id, job_trainers(job_id)),
    )


def _write_checkpoint(db: psycopg.Connection[Any], graph_id: str, checkpoint: Checkpoint, fence: Fence | None) -> int:
    """The graph's step, parameters and optimizer state, within the caller's transaction; its new version.
    The graph's row is written first: its lock makes concurrent checkpoints of one graph take turns.
    Without a fence, a deleted graph's parameters fail their foreign key."""
    if fence is None:
        row = db.execute(
            "UPDATE graphs SET step = %s, version = version + 1 WHERE graph_id = %s RETURNING version",
            (checkpoint.step, graph_id),
        ).fetchone()
    else:
        row = db.execute(
            "UPDATE graphs SET step = %s, version = version + 1 WHERE graph_id = %s AND version = %s "
            f"AND (trainer IN ('', %s) OR trainer_until < {NOW}) RETURNING version",
            (checkpoint.step, graph_id, fence.version, fence.trainer),
        ).fetchone()
        if row is None:
            found = db.execute(
                f"SELECT version, trainer, trainer_until, {NOW} FROM graphs WHERE graph_id = %s", (graph_id,)
            ).fetchone()
            _refuse(graph_id, fence, None if found is None else found[:3], 0.0 if found is None else found[3])
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
    return 0 if row is None else int(row[0])
