"""The embedded SQLite store, the default: one file beside the server, nothing else to run."""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import NoReturn

import numpy as np

from chainrule.server.errors import Unavailable
from chainrule.server.store.base import (
    ENDED_JOB_STATES,
    REQUEST_ID_SECONDS,
    Checkpoint,
    ClaimLost,
    ColumnSpec,
    CreateRequest,
    Fence,
    JobEventRow,
    RequestIdTaken,
    Store,
    StoredDataset,
    StoredGraph,
    StoredJob,
    TrainerBusy,
    TrainerLease,
    VersionMoved,
    checkpoint_from_rows,
    dataset_busy,
    deleted_graph,
    job_trainer,
    job_trainers,
    missing_dataset,
    tensor_row,
)
from chainrule.server.store.migrations import migrate_sqlite

GRAPH_COLUMNS = "seq, graph_id, tenant, name, summary, created_at, step, version"
NEW_JOB_COLUMNS = (
    "job_id, tenant, graph_id, spec, state, total_steps, created_at, step, epoch, loss, metrics, error, "
    "started_at, ended_at, start_graph_step, replicas"
)
"""What insert_job writes."""
JOB_COLUMNS = f"{NEW_JOB_COLUMNS}, seq, worker, resumes, claim, lease_until, cancel_requested, status_message"
DATASET_COLUMNS = "seq, dataset_id, tenant, name, columns, num_examples, size_bytes, sha256, created_at"
IN_USE = "SELECT 1 FROM jobs WHERE state IN ('QUEUED', 'RUNNING') AND instr(spec, ?) > 0 LIMIT 1"
"""Whether an unfinished job uses a dataset: its id (the parameter, as bytes) appears in the job's serialized
spec, where JobSpec.dataset_id and Evaluation.dataset_id hold it. Ids are random 32-digit hex strings, so
nothing else in a spec holds one by chance; the jobs not ended are few, so the scan is short."""
log = logging.getLogger("chainrule.server.store")
AUTOCHECKPOINT_PAGES = 1000
"""SQLite's default: a commit that leaves the WAL longer than this checkpoints it."""
WAL_FLUSH_SECONDS = 0.05
PAGE_BYTES = 65536
"""The page size of new database files, SQLite's largest: the store is mostly BLOBs (parameters, graph
definitions, dataset rows of 4 MiB), which SQLite keeps in chains of overflow pages and writes to the
WAL a page at a time. Storing 256 MiB of a dataset took 0.45 s of CPU with 4 KiB pages and 0.3 s with
these, and its checkpoint 0.2 s against 0.1 s."""


def graph_columns(with_order: bool, table: str = "graphs") -> str:
    """GRAPH_COLUMNS of `table`; without the order, SQLite drops it from the summary's JSON before
    Python parses it, which is most of the summary of a large graph."""
    columns = [f"{table}.{column}" for column in GRAPH_COLUMNS.split(", ")]
    if not with_order:
        columns[4] = f"json_remove({table}.summary, '$.topological_order')"
    return ", ".join(columns)


class SqliteStore(Store):
    """One SQLite file in WAL mode, fsynced at every commit; one connection, serialized by a lock."""

    _large_writes = 0
    """Writes under way whose commits leave the checkpoint to a thread of its own (see _checkpoint_after)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute(f"PRAGMA page_size={PAGE_BYTES}")  # takes effect only in a new file, before WAL mode
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        try:
            migrate_sqlite(self._db, path)  # the tables are in migrations.py
        except BaseException:
            self._db.close()
            raise
        self._file = None if path in ("", ":memory:") else _identity(path)
        """(device, inode) of the file opened: what `path` must keep naming for writes to last."""
        self.lost = ""
        """Why writes are refused for good, once the file was found deleted or replaced."""

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """One atomic write; a refused write (read-only file, full disk, a deleted database file)
        becomes UNAVAILABLE."""
        with self._lock:
            if self._file_gone():
                raise Unavailable(
                    f"the graph store could not {action}: {self.lost}; nothing was written", reason="STORE_LOST"
                )
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:  # SQLite may have rolled back already (a full disk, an I/O error)
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise Unavailable(
                    f"the graph store could not {action}: {error}; nothing was written", reason="STORE_UNAVAILABLE"
                ) from None

    def _file_gone(self) -> bool:
        """Whether `path` no longer names the file the connection has open. SQLite goes on writing
        to a deleted file, and a restart would open whatever `path` then names, so every write from
        now on would be lost; say so once (on_lost) and refuse them."""
        if self.lost:
            return True
        if self._file is None or _identity(self.path) == self._file:
            return False
        self.lost = f"the database file '{self.path}' was deleted or replaced while the server runs"
        if self.on_lost is not None:
            self.on_lost(self.lost)
        return True

    def _read(self, query: str, arguments: tuple) -> list[tuple]:
        """Reads go on from the open file once it is gone, but tell on_lost as soon as they notice."""
        with self._lock:
            self._file_gone()
            try:
                return self._db.execute(query, arguments).fetchall()
            except sqlite3.Error as error:
                raise Unavailable(f"the graph store could not be read: {error}", reason="STORE_UNAVAILABLE") from None

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
                db.execute("DELETE FROM create_requests WHERE created_at < ?", (created_at - REQUEST_ID_SECONDS,))
                earlier = self._find_request(db, tenant, request.request_id, created_at)
            if earlier is None:
                cursor = db.execute(
                    "INSERT INTO graphs (graph_id, tenant, name, definition, summary, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (graph_id, tenant, name, definition, json.dumps(summary), created_at),
                )
                db.executemany(
                    "INSERT INTO parameters (graph_id, name, dtype, shape, data) VALUES (?, ?, ?, ?, ?)",
                    [(graph_id, key, *tensor_row(value)) for key, value in parameters.items()],
                )
                if request is not None:
                    db.execute(
                        "INSERT INTO create_requests (tenant, request_id, graph_id, fingerprint, created_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (tenant, request.request_id, graph_id, request.fingerprint, created_at),
                    )
        if earlier is not None:
            raise RequestIdTaken(*earlier)
        assert cursor.lastrowid is not None
        return StoredGraph(cursor.lastrowid, graph_id, tenant, name, summary, created_at, 0)

    def find_request(self, tenant: str, request_id: str) -> tuple[StoredGraph, str] | None:
        with self._lock:
            try:
                return self._find_request(self._db, tenant, request_id, time.time())
            except sqlite3.Error as error:
                raise Unavailable(f"the graph store could not be read: {error}", reason="STORE_UNAVAILABLE") from None

    def _find_request(
        self, db: sqlite3.Connection, tenant: str, request_id: str, now: float
    ) -> tuple[StoredGraph, str] | None:
        row = db.execute(
            f"SELECT {graph_columns(True)}, create_requests.fingerprint FROM create_requests "
            "JOIN graphs ON graphs.graph_id = create_requests.graph_id "
            "WHERE create_requests.tenant = ? AND create_requests.request_id = ? AND create_requests.created_at >= ?",
            (tenant, request_id, now - REQUEST_ID_SECONDS),
        ).fetchone()
        return None if row is None else (self._graph_from_row(row[:-1]), row[-1])

    def count_graphs(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM graphs", ())[0][0])

    def get_graph(self, graph_id: str, tenant: str, with_order: bool = True) -> StoredGraph | None:
        rows = self._read(
            f"SELECT {graph_columns(with_order)} FROM graphs WHERE graph_id = ? AND tenant = ?",
            (graph_id, tenant),
        )
        return self._graph_from_row(rows[0]) if rows else None

    def list_graphs(self, tenant: str, after_seq: int, limit: int, with_order: bool = True) -> list[StoredGraph]:
        rows = self._read(
            f"SELECT {graph_columns(with_order)} FROM graphs WHERE tenant = ? AND seq > ? ORDER BY seq LIMIT ?",
            (tenant, after_seq, limit),
        )
        return [self._graph_from_row(row) for row in rows]

    @staticmethod
    def _graph_from_row(row: tuple) -> StoredGraph:
        seq, graph_id, tenant, name, summary, created_at, step, version = row
        return StoredGraph(seq, graph_id, tenant, name, json.loads(summary), created_at, step, version)

    def definition(self, graph_id: str) -> bytes | None:
        rows = self._read("SELECT definition FROM graphs WHERE graph_id = ?", (graph_id,))
        return rows[0][0] if rows else None

    def delete_graph(self, graph_id: str) -> bool:
        with self._transaction(f"delete graph '{graph_id}'") as db:
            return db.execute("DELETE FROM graphs WHERE graph_id = ?", (graph_id,)).rowcount > 0

    # ------------------------------------------------------------ parameters and training state
    def load_checkpoint(self, graph_id: str) -> Checkpoint | None:
        """The graph's committed step, parameters and optimizer state, read in one transaction;
        None when the graph is gone (deleted since it was looked up)."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
                try:
                    row = self._db.execute(
                        "SELECT step, version FROM graphs WHERE graph_id = ?", (graph_id,)
                    ).fetchone()
                    if row is None:
                        return None
                    step, version = row
                    parameter_rows = self._db.execute(
                        "SELECT name, dtype, shape, data FROM parameters WHERE graph_id = ?", (graph_id,)
                    ).fetchall()
                    state_rows = self._db.execute(
                        "SELECT name, optimizer, slot, dtype, shape, data FROM optimizer_state WHERE graph_id = ?",
                        (graph_id,),
                    ).fetchall()
                finally:
                    self._db.execute("COMMIT")
            except sqlite3.Error as error:
                raise Unavailable(f"the graph store could not be read: {error}", reason="STORE_UNAVAILABLE") from None
        return checkpoint_from_rows(step, version, parameter_rows, state_rows)

    def save_checkpoint(self, graph_id: str, checkpoint: Checkpoint, fence: Fence | None = None) -> int:
        with self._transaction(f"save a checkpoint of graph '{graph_id}'") as db:
            return _write_checkpoint(db, graph_id, checkpoint, fence)

    # ------------------------------------------------------------ several servers
    def graph_version(self, graph_id: str, tenant: str) -> int | None:
        rows = self._read("SELECT version FROM graphs WHERE graph_id = ? AND tenant = ?", (graph_id, tenant))
        return int(rows[0][0]) if rows else None

    def acquire_trainer(
        self, graph_id: str, trainer: str, seconds: float | None, replaces: str | None = None
    ) -> TrainerLease | None:
        with self._transaction(f"lease graph '{graph_id}' for training") as db:
            return _take_trainer(db, graph_id, trainer, seconds, time.time(), replaces)

    def trainer_of(self, graph_id: str) -> str | None:
        rows = self._read("SELECT trainer, trainer_until FROM graphs WHERE graph_id = ?", (graph_id,))
        if not rows:
            return None
        trainer, until = rows[0]
        return "" if until is not None and until < time.time() else str(trainer)

    def renew_trainers(self, trainer: str, graph_ids: Sequence[str], seconds: float) -> set[str]:
        renewed = set()
        with self._transaction("renew trainer leases") as db:
            until = time.time() + seconds
            for graph_id in graph_ids:
                cursor = db.execute(
                    "UPDATE graphs SET trainer_until = ? WHERE graph_id = ? AND trainer = ?", (until, graph_id, trainer)
                )
                if cursor.rowcount:
                    renewed.add(graph_id)
        return renewed

    def release_trainer(self, graph_id: str, trainer: str) -> None:
        with self._transaction(f"release the trainer lease of graph '{graph_id}'") as db:
            _release_trainer(db, graph_id, trainer)

    def release_all_leases(self) -> None:
        with self._transaction("release the leases of a previous run") as db:
            db.execute("UPDATE jobs SET claim = '', lease_until = NULL WHERE claim != ''")
            db.execute("UPDATE graphs SET trainer = '', trainer_until = NULL WHERE trainer_until IS NOT NULL")

    # ------------------------------------------------------------ jobs
    def insert_job(self, job: StoredJob, datasets: Sequence[str] = ()) -> StoredJob:
        with self._transaction(f"store job '{job.job_id}'") as db:
            for dataset_id in datasets:
                if db.execute("SELECT 1 FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone() is None:
                    raise missing_dataset(dataset_id)
            cursor = db.execute(
                f"INSERT INTO jobs ({NEW_JOB_COLUMNS}) VALUES ({', '.join('?' * len(NEW_JOB_COLUMNS.split(', ')))})",
                _job_row(job),
            )
        assert cursor.lastrowid is not None
        return replace(job, seq=cursor.lastrowid)

    def get_job(self, job_id: str, tenant: str) -> StoredJob | None:
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ? AND tenant = ?", (job_id, tenant))
        return _job_from_row(rows[0]) if rows else None

    def list_jobs(
        self, tenant: str, after_seq: int, limit: int, states: tuple[str, ...] = (), graph_id: str = ""
    ) -> list[StoredJob]:
        conditions, arguments = ["tenant = ?", "seq > ?"], [tenant, after_seq]
        if states:
            conditions.append(f"state IN ({', '.join('?' * len(states))})")
            arguments += states
        if graph_id:
            conditions.append("graph_id = ?")
            arguments.append(graph_id)
        rows = self._read(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE {' AND '.join(conditions)} ORDER BY seq LIMIT ?",
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
                "UPDATE jobs SET state = ?, step = ?, epoch = ?, loss = ?, metrics = ?, error = ?, started_at = ?, "
                "ended_at = ?, start_graph_step = ?, resumes = ?, "
                "claim = CASE WHEN ? THEN '' ELSE claim END, lease_until = CASE WHEN ? THEN NULL ELSE lease_until END "
                "WHERE job_id = ? AND (? IS NULL OR claim = ?)",
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
            db.executemany(
                "INSERT INTO job_events (job_id, step, epoch, loss, learning_rate, metrics) VALUES (?, ?, ?, ?, ?, ?)",
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
        """Candidates are read first, outside a write transaction, so that idle servers looking at an
        empty queue every second take no write lock."""
        candidates = self._read(
            "SELECT job_id, graph_id FROM jobs WHERE state IN ('QUEUED', 'RUNNING') "
            "AND (claim = '' OR lease_until < ?) AND (? IS NULL OR replicas <= ?) ORDER BY state = 'QUEUED', seq",
            (time.time(), max_replicas, max_replicas),
        )
        candidates = [(job_id, graph_id) for job_id, graph_id in candidates if graph_id not in skip]
        if not candidates:
            return None
        with self._transaction("claim a job") as db:
            now = time.time()
            for job_id, graph_id in candidates:
                still = db.execute(
                    "SELECT 1 FROM jobs WHERE job_id = ? AND state IN ('QUEUED', 'RUNNING') "
                    "AND (claim = '' OR lease_until < ?)",
                    (job_id, now),
                ).fetchone()
                trainer = job_trainer(job_id, claim)
                lease = None if still is None else _take_trainer(db, graph_id, trainer, None, now, job_trainers(job_id))
                if still is None or (lease is not None and not lease.granted):
                    continue
                db.execute(
                    "UPDATE jobs SET claim = ?, worker = ?, lease_until = ?, resumes = resumes + (state = 'RUNNING'), "
                    "status_message = '' WHERE job_id = ?",
                    (claim, worker, None if seconds is None else now + seconds, job_id),
                )
                row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                return _job_from_row(row)
        return None

    def renew_claims(self, claims: Mapping[str, str], seconds: float) -> dict[str, bool]:
        held = {}
        with self._transaction("renew job claims") as db:
            until = time.time() + seconds
            for job_id, claim in claims.items():
                row = db.execute(
                    "UPDATE jobs SET lease_until = ? WHERE job_id = ? AND claim = ? RETURNING cancel_requested",
                    (until, job_id, claim),
                ).fetchall()
                if row:
                    held[job_id] = bool(row[0][0])
        return held

    def set_job_status(self, job_id: str, claim: str, message: str) -> None:
        with self._transaction(f"set the status of job '{job_id}'") as db:
            db.execute("UPDATE jobs SET status_message = ? WHERE job_id = ? AND claim = ?", (message, job_id, claim))

    def release_claim(self, job_id: str, claim: str) -> None:
        with self._transaction(f"release job '{job_id}'") as db:
            db.execute("UPDATE jobs SET claim = '', lease_until = NULL WHERE job_id = ? AND claim = ?", (job_id, claim))

    def cancel_job(self, job_id: str, tenant: str, ended_at: float) -> StoredJob | None:
        with self._transaction(f"cancel job '{job_id}'") as db:
            row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = ? AND tenant = ?", (job_id, tenant))
            found = row.fetchone()
            if found is None:
                return None
            job = _job_from_row(found)
            if job.state in ENDED_JOB_STATES:
                return job
            if job.claim and (job.lease_until is None or job.lease_until >= time.time()):
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job_id,))
                return replace(job, cancel_requested=True)
            db.execute(
                "UPDATE jobs SET state = 'CANCELLED', ended_at = ?, claim = '', lease_until = NULL WHERE job_id = ?",
                (ended_at, job_id),
            )
            _release_job_trainer(db, job.graph_id, job_id)
            return replace(job, state="CANCELLED", ended_at=ended_at, claim="", lease_until=None)

    def dataset_in_use(self, dataset_id: str) -> bool:
        return bool(self._read(IN_USE, (dataset_id.encode(),)))

    def job_events(self, job_id: str, from_step: int, limit: int) -> list[JobEventRow]:
        rows = self._read(
            "SELECT step, epoch, loss, learning_rate, metrics FROM job_events WHERE job_id = ? AND step >= ? "
            "ORDER BY step LIMIT ?",
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

        with self._checkpoint_after(), self._wal_flushed_early(), self._transaction(f"store dataset '{name}'") as db:
            db.executemany(
                "INSERT INTO dataset_chunks (dataset_id, column_index, chunk_index, data) VALUES (?, ?, ?, ?)",
                numbered(),
            )
            digest, created_at = sha256(), time.time()
            cursor = db.execute(
                f"INSERT INTO datasets ({DATASET_COLUMNS.removeprefix('seq, ')}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (dataset_id, tenant, name, layout, num_examples, size_bytes, digest, created_at),
            )
        assert cursor.lastrowid is not None
        return StoredDataset(
            cursor.lastrowid, dataset_id, tenant, name, columns, num_examples, size_bytes, digest, created_at
        )

    def get_dataset(self, dataset_id: str, tenant: str) -> StoredDataset | None:
        rows = self._read(
            f"SELECT {DATASET_COLUMNS} FROM datasets WHERE dataset_id = ? AND tenant = ?", (dataset_id, tenant)
        )
        return _dataset_from_row(rows[0]) if rows else None

    def list_datasets(self, tenant: str, after_seq: int, limit: int) -> list[StoredDataset]:
        rows = self._read(
            f"SELECT {DATASET_COLUMNS} FROM datasets WHERE tenant = ? AND seq > ? ORDER BY seq LIMIT ?",
            (tenant, after_seq, limit),
        )
        return [_dataset_from_row(row) for row in rows]

    def delete_dataset(self, dataset_id: str) -> bool:
        with self._checkpoint_after(), self._transaction(f"delete dataset '{dataset_id}'") as db:
            if db.execute(IN_USE, (dataset_id.encode(),)).fetchone() is not None:
                raise dataset_busy(dataset_id)
            return db.execute("DELETE FROM datasets WHERE dataset_id = ?", (dataset_id,)).rowcount > 0

    def dataset_chunks(self, dataset_id: str) -> Iterator[tuple[int, bytes]]:
        keys = self._read(
            "SELECT column_index, chunk_index FROM dataset_chunks WHERE dataset_id = ? "
            "ORDER BY column_index, chunk_index",
            (dataset_id,),
        )
        for column, chunk in keys:
            rows = self._read(
                "SELECT data FROM dataset_chunks WHERE dataset_id = ? AND column_index = ? AND chunk_index = ?",
                (dataset_id, column, chunk),
            )
            if not rows:
                return
            yield column, rows[0][0]

    def dataset_hashes(self) -> set[str]:
        return {sha256 for (sha256,) in self._read("SELECT DISTINCT sha256 FROM datasets", ())}

    @contextmanager
    def _checkpoint_after(self) -> Iterator[None]:
        """For a write of hundreds of MB (a dataset's bytes): its commit leaves copying them from the WAL
        into the database to a checkpoint on a connection and thread of their own, instead of SQLite's
        automatic checkpoint at the commit, which would hold the caller and the store's lock as long
        again as the write itself."""
        if self.path in ("", ":memory:"):
            yield
            return
        with self._lock:
            self._large_writes += 1
            self._db.execute("PRAGMA wal_autocheckpoint=0")
        try:
            yield
        finally:
            with self._lock:
                self._large_writes -= 1
                if not self._large_writes:
                    self._db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
            threading.Thread(target=self._checkpoint, name="store-checkpoint", daemon=True).start()

    @contextmanager
    def _wal_flushed_early(self) -> Iterator[None]:
        """Flush the WAL to disk every WAL_FLUSH_SECONDS while a large write fills it, so that its commit's
        fsync finds little left to write: that fsync waited for a whole dataset's bytes to reach the disk,
        a tenth of a second or more per 256 MiB after the last of them arrived."""
        if self.path in ("", ":memory:"):
            yield
            return
        done = threading.Event()

        def flush() -> None:
            try:
                wal = os.open(f"{self.path}-wal", os.O_RDONLY)
            except OSError:
                return
            try:
                while not done.wait(WAL_FLUSH_SECONDS):
                    os.fdatasync(wal)
            except OSError:  # the commit's own fsync reports what matters
                pass
            finally:
                os.close(wal)

        flusher = threading.Thread(target=flush, name="store-wal-flush", daemon=True)
        flusher.start()
        try:
            yield
        finally:
            done.set()
            flusher.join()

    def _checkpoint(self) -> None:
        """A passive checkpoint: it copies what it can without waiting for (or blocking) readers and writers."""
        try:
            connection = sqlite3.connect(f"file:{urllib.parse.quote(self.path)}?mode=rw", uri=True)  # never creates it
            try:
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                connection.close()
        except sqlite3.Error as error:  # the next automatic checkpoint does it instead
            log.warning("background checkpoint of %s failed: %s", self.path, error)


def _dataset_from_row(row: tuple) -> StoredDataset:
    seq, dataset_id, tenant, name, layout, num_examples, size_bytes, sha256, created_at = row
    columns = tuple(ColumnSpec(c["name"], c["dtype"], tuple(c["shape"])) for c in json.loads(layout))
    return StoredDataset(seq, dataset_id, tenant, name, columns, num_examples, size_bytes, sha256, created_at)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def _write_checkpoint(db: sqlite3.Connection, graph_id: str, checkpoint: Checkpoint, fence: Fence | None) -> int:
    """The graph's step, parameters and optimizer state, within the caller's transaction; its new version.
    Without a fence, a deleted graph's parameters fail their foreign key."""
    if fence is None:
        rows = db.execute(
            "UPDATE graphs SET step = ?, version = version + 1 WHERE graph_id = ? RETURNING version",
            (checkpoint.step, graph_id),
        ).fetchall()
    else:
        rows = db.execute(
            "UPDATE graphs SET step = ?, version = version + 1 WHERE graph_id = ? AND version = ? "
            "AND (trainer IN ('', ?) OR trainer_until < ?) RETURNING version",
            (checkpoint.step, graph_id, fence.version, fence.trainer, time.time()),
        ).fetchall()
        if not rows:
            found = db.execute(
                "SELECT version, trainer, trainer_until FROM graphs WHERE graph_id = ?", (graph_id,)
            ).fetchone()
            _refuse(graph_id, fence, found, time.time())
    db.executemany(
        "INSERT OR REPLACE INTO parameters (graph_id, name, dtype, shape, data) VALUES (?, ?, ?, ?, ?)",
        [(graph_id, name, *tensor_row(value)) for name, value in checkpoint.parameters.items()],
    )
    db.execute("DELETE FROM optimizer_state WHERE graph_id = ?", (graph_id,))
    db.executemany(
        "INSERT INTO optimizer_state (graph_id, name, optimizer, slot, dtype, shape, data) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (graph_id, name, optimizer, slot, *tensor_row(array))
            for name, (optimizer, arrays) in checkpoint.optimizer_state.items()
            for slot, array in arrays.items()
        ],
    )
    return int(rows[0][0]) if rows else 0


def _refuse(graph_id: str, fence: Fence, found: tuple | None, now: float) -> NoReturn:
    """Why a fenced checkpoint write matched no row: `found` is the graph's (version, trainer, trainer_until),
    None when it is gone."""
    if found is None:
        raise deleted_graph(graph_id)
    version, trainer, until = found
    if trainer not in ("", fence.trainer) and (until is None or until >= now):
        raise TrainerBusy(trainer)
    raise VersionMoved(version)


def _take_trainer(
    db: sqlite3.Connection, graph_id: str, trainer: str, seconds: float | None, now: float, replaces: str | None = None
) -> TrainerLease | None:
    """Take the graph's trainer lease if it is free, lapsed, already `trainer`'s, or one that starts with
    `replaces` (a job's lease under an earlier claim)."""
    until = None if seconds is None else now + seconds
    rows = db.execute(
        "UPDATE graphs SET trainer = ?, trainer_until = ? WHERE graph_id = ? "
        "AND (trainer IN ('', ?) OR trainer_until < ? OR substr(trainer, 1, length(?)) = ?) RETURNING version",
        (trainer, until, graph_id, trainer, now, replaces, replaces),
    ).fetchall()
    if rows:
        return TrainerLease(True, trainer, rows[0][0])
    found = db.execute("SELECT trainer, version FROM graphs WHERE graph_id = ?", (graph_id,)).fetchone()
    return None if found is None else TrainerLease(False, *found)


def _release_trainer(db: sqlite3.Connection, graph_id: str, trainer: str) -> None:
    db.execute(
        "UPDATE graphs SET trainer = '', trainer_until = NULL WHERE graph_id = ? AND trainer = ?", (graph_id, trainer)
    )


def _release_job_trainer(db: sqlite3.Connection, graph_id: str, job_id: str) -> None:
    """Free the graph of the job's lease, under whichever claim it holds it."""
    prefix = job_trainers(job_id)
    db.execute(
        "UPDATE graphs SET trainer = '', trainer_until = NULL WHERE graph_id = ? AND substr(trainer, 1, length(?)) = ?",
        (graph_id, prefix, prefix),
    )


def _job_row(job: StoredJob) -> tuple:
    return (
        job.job_id,
        job.tenant,
        job.graph_id,
        job.spec,
        job.state,
        job.total_steps,
        job.created_at,
        job.step,
        job.epoch,
        job.loss,
        json.dumps(job.metrics),
        job.error,
        job.started_at,
        job.ended_at,
        job.start_graph_step,
        job.replicas,
    )


def _job_from_row(row: tuple) -> StoredJob:
    """A NaN loss comes back from SQLite as NULL."""
    *head, loss, metrics, error, started, ended, start_graph_step, replicas, seq, worker = row[:-5]
    resumes, claim, until, cancel, status_message = row[-5:]
    return StoredJob(
        *head,
        loss=math.nan if loss is None else loss,
        metrics=json.loads(metrics),
        error=error,
        started_at=started,
        ended_at=ended,
        start_graph_step=start_graph_step,
        seq=seq,
        worker=worker,
        resumes=resumes,
        claim=claim,
        lease_until=until,
        cancel_requested=bool(cancel),
        replicas=replicas,
        status_message=status_message,
    )
