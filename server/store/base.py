"""What the engine needs from a store, and the records it exchanges with one.

Every implementation keeps the same guarantees: each write is one transaction, so a process
killed at any moment leaves each graph either as it was before a write or as it is after it
(never half-created, never a mix of two steps), and a write the database refuses raises
`Unavailable` having changed nothing. Tensors are stored as raw little-endian bytes with their
dtype and shape, like the wire format.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chainrule.server.errors import FailedPrecondition, NotFound, shown

OptimizerState = dict[str, tuple[str, dict[str, np.ndarray]]]
"""Per parameter: the optimizer kind that wrote the state, and its named arrays."""

REQUEST_ID_SECONDS = 24 * 60 * 60
"""How long a CreateGraph request_id keeps naming the graph it created (AIP-155 asks for a retry window)."""


@dataclass(frozen=True)
class StoredGraph:
    seq: int
    graph_id: str
    tenant: str
    name: str
    summary: dict
    created_at: float
    step: int
    version: int = 0
    """Bumped by every checkpoint written: what a server's live copy of the graph is checked against."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    parameters: dict[str, np.ndarray]
    """Trained parameters and `state` nodes (running statistics) alike."""
    optimizer_state: OptimizerState
    version: int = 0
    """The graph's version when read (load_checkpoint); ignored when written."""


@dataclass(frozen=True)
class CreateRequest:
    """A CreateGraph's request_id, and a fingerprint of its graph that tells a retry from a reuse."""

    request_id: str
    fingerprint: str


DATASET_CHUNK_BYTES = 4 << 20
"""A dataset column's bytes per stored row: rows few enough to insert quickly, each small enough to
read on its own, so a dataset is never held in memory whole (nor, later, in one PostgreSQL bytea)."""


@dataclass(frozen=True)
class ColumnSpec:
    """One column of a dataset: the wire dtype's name (float32, float64, int32, int64, bool) and
    the shape of one example."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StoredDataset:
    seq: int
    dataset_id: str
    tenant: str
    name: str
    columns: tuple[ColumnSpec, ...]
    num_examples: int
    size_bytes: int
    sha256: str
    """Hex SHA-256 of every column's bytes concatenated in column order; keys the local cache."""
    created_at: float


JOB_STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
ENDED_JOB_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass(frozen=True)
class StoredJob:
    """A training job's row: its spec (a serialized chainrule.v1.JobSpec) and its progress."""

    job_id: str
    tenant: str
    graph_id: str
    spec: bytes
    state: str
    """One of JOB_STATES."""
    total_steps: int
    created_at: float
    step: int = 0
    epoch: int = 0
    loss: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    start_graph_step: int = 0
    """The graph's step when the job first started: the graph is at start_graph_step + step."""
    seq: int = 0
    worker: str = ""
    """The server running the job now, or that ran it last (host:port of its gRPC address)."""
    resumes: int = 0
    """How many times the job was taken up again after its run stopped short of its end."""
    claim: str = ""
    """The token of the run that holds the job now; empty while no server runs it."""
    lease_until: float | None = None
    """When the claim lapses unless its server renews it (seconds since the epoch, the database's clock)."""
    cancel_requested: bool = False
    """CancelJob asked the server running the job to stop it."""
    replicas: int = 1
    """JobSpec.replicas (at least 1), kept beside the spec so that claim_job passes over the jobs a
    server cannot run (replicas need a server started with --ray-address)."""
    status_message: str = ""
    """What the job waits for while it cannot go on (its Ray cluster, say), in words; empty otherwise."""


@dataclass(frozen=True)
class JobEventRow:
    """One step of a job as history keeps it; `metrics` is empty except on evaluation steps."""

    step: int
    epoch: int
    loss: float
    learning_rate: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Fence:
    """What a checkpoint write requires, so that a server whose copy of a graph is out of date, or
    that is no longer its trainer, cannot overwrite what others committed: the graph's trainer lease
    free, lapsed or held by `trainer`, and the graph still at `version`."""

    trainer: str
    version: int


@dataclass(frozen=True)
class TrainerLease:
    """The outcome of acquire_trainer: whether `holder` (the one asking, or the one in the way) holds the
    graph's trainer lease, and the graph's version then."""

    granted: bool
    holder: str
    version: int


def job_trainer(job_id: str, claim: str) -> str:
    """The trainer lease a job holds from its first claim until it ends. A RUNNING job keeps its graph
    while no server runs it; the server that claims it next takes the lease over under its own
    claim, which fences out the writes of the server that ran it before."""
    return f"{job_trainers(job_id)}{claim}"


def job_trainers(job_id: str) -> str:
    """What every one of the job's trainer leases starts with."""
    return f"job/{job_id}/"


def stream_trainer(instance: str, process: str, worker: str) -> str:
    """The trainer lease the Train streams of one server process share, renewed by its heartbeat:
    `process` says where that process runs (see engine.this_process), `worker` its gRPC address."""
    return f"streams/{instance}/{process}/{worker}"


def stream_process(holder: str) -> str:
    """The `process` of a stream_trainer lease; "" for any other."""
    kind, _, rest = holder.partition("/")
    return rest.split("/")[1] if kind == "streams" and rest.count("/") >= 2 else ""


class TrainerBusy(Exception):
    """Another trainer holds the graph's lease (`holder`, as job_trainer or stream_trainer name it)."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"the graph's trainer lease is held by {holder}")
        self.holder = holder


class VersionMoved(Exception):
    """The graph's stored version is no longer the one a write was based on."""

    def __init__(self, version: int) -> None:
        super().__init__(f"the graph is at version {version}")
        self.version = version


class ClaimLost(Exception):
    """The job's claim is no longer the writer's: another server took the job over (or it was cancelled
    while its lease had lapsed). Nothing of the write was stored."""


class RequestIdTaken(Exception):
    """insert_graph's request_id already names a graph of the tenant: the one `graph`, created from `fingerprint`."""

    def __init__(self, graph: StoredGraph, fingerprint: str) -> None:
        super().__init__(f"request_id already names graph '{graph.graph_id}'")
        self.graph = graph
        self.fingerprint = fingerprint


class DatabaseUnusable(Exception):
    """The database `--db` names cannot be used at all (unreachable or refusing us at startup, a schema
    newer than this server knows, a driver not installed): one line saying why, for the operator."""


def missing_dataset(dataset_id: str) -> NotFound:
    return NotFound(f"dataset '{shown(dataset_id)}' not found", reason="DATASET_NOT_FOUND", subject=dataset_id)


def dataset_busy(dataset_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"dataset '{shown(dataset_id)}' is used by a queued or running job; cancel the job or let it end, then "
        "delete the dataset",
        reason="DATASET_IN_USE",
        subject=dataset_id,
    )


def deleted_graph(graph_id: str) -> NotFound:
    return NotFound(f"graph '{graph_id}' was deleted", reason="GRAPH_NOT_FOUND", subject=graph_id)


def tensor_row(array: np.ndarray) -> tuple[str, str, bytes]:
    little = np.asarray(array, dtype=array.dtype.newbyteorder("<"))
    return little.dtype.str, json.dumps(list(little.shape)), little.tobytes()


def tensor_from_row(dtype: str, shape: str, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape))


def checkpoint_from_rows(
    step: int, version: int, parameter_rows: Iterable[Sequence[Any]], state_rows: Iterable[Sequence[Any]]
) -> Checkpoint:
    """A checkpoint from its rows as both backends select them: parameters (name, dtype, shape, data),
    optimizer state (name, optimizer, slot, dtype, shape, data)."""
    parameters = {name: tensor_from_row(dtype, shape, data) for name, dtype, shape, data in parameter_rows}
    state: OptimizerState = {}
    for name, optimizer, slot, dtype, shape, data in state_rows:
        state.setdefault(name, (optimizer, {}))[1][slot] = tensor_from_row(dtype, shape, data)
    return Checkpoint(step, parameters, state, version)


class Store(ABC):
    """Graphs, their current parameters, optimizer state and step."""

    on_lost: Callable[[str], None] | None = None
    """Called once, with the reason, when the store finds that what it writes can no longer last
    (its database file was deleted or replaced); from then on it refuses every write. The server
    turns its health NOT_SERVING."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
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
        """Store a graph; with `request`, its request_id too, in the same transaction. If the tenant's
        request_id already names a graph (see find_request), nothing is stored and RequestIdTaken is
        raised. Request ids older than REQUEST_ID_SECONDS are forgotten."""

    @abstractmethod
    def find_request(self, tenant: str, request_id: str) -> tuple[StoredGraph, str] | None:
        """The graph the tenant's request_id created within REQUEST_ID_SECONDS, with its request's
        fingerprint; None once it expired or the graph was deleted."""

    @abstractmethod
    def count_graphs(self) -> int: ...

    @abstractmethod
    def get_graph(self, graph_id: str, tenant: str, with_order: bool = True) -> StoredGraph | None:
        """`with_order` False leaves `topological_order` out of the summary (it grows with the graph)."""

    @abstractmethod
    def list_graphs(self, tenant: str, after_seq: int, limit: int, with_order: bool = True) -> list[StoredGraph]:
        """The tenant's graphs with seq > after_seq, oldest first; `with_order` as in get_graph."""

    @abstractmethod
    def definition(self, graph_id: str) -> bytes | None: ...

    @abstractmethod
    def delete_graph(self, graph_id: str) -> bool: ...

    @abstractmethod
    def load_checkpoint(self, graph_id: str) -> Checkpoint | None:
        """The graph's committed step, parameters, optimizer state and version, read in one transaction;
        None when the graph is gone (deleted since it was looked up)."""

    @abstractmethod
    def save_checkpoint(self, graph_id: str, checkpoint: Checkpoint, fence: Fence | None = None) -> int:
        """Replace the graph's step, parameters and optimizer state in one transaction, bumping its
        version; the new version. With a `fence` that the graph no longer meets, nothing is written:
        NotFound (GRAPH_NOT_FOUND) when it is gone, TrainerBusy or VersionMoved."""

    # ------------------------------------------------------------ several servers
    shared = False
    """Whether other server processes may use the same database at the same time (PostgreSQL): then
    what a server keeps in memory of a graph is a cache, checked against the stored version."""

    @abstractmethod
    def graph_version(self, graph_id: str, tenant: str) -> int | None:
        """The graph's version (one indexed read); None when the tenant has no such graph."""

    @abstractmethod
    def acquire_trainer(
        self, graph_id: str, trainer: str, seconds: float | None, replaces: str | None = None
    ) -> TrainerLease | None:
        """Make `trainer` the graph's one trainer, unless another holds the lease and it has not lapsed
        (or is `replaces`, one known to be dead): for `seconds` from now (renewed by renew_trainers), or
        until released when None. None when the graph is gone."""

    @abstractmethod
    def trainer_of(self, graph_id: str) -> str | None:
        """Who holds the graph's trainer lease ("" when it is free or lapsed); None when the graph is gone."""

    @abstractmethod
    def renew_trainers(self, trainer: str, graph_ids: Sequence[str], seconds: float) -> set[str]:
        """Extend `trainer`'s leases on these graphs by `seconds` from now; the graphs whose lease it still held."""

    @abstractmethod
    def release_trainer(self, graph_id: str, trainer: str) -> None:
        """Free the graph's trainer lease if `trainer` holds it."""

    @abstractmethod
    def release_all_leases(self) -> None:
        """Forget every claim on jobs and every Train stream's lease: for a server that knows it is its
        database's only one (SQLite), at startup, when whatever held them was its own previous run.
        Jobs' leases on their graphs stay: a job that was running holds its graph until it ends."""

    # ------------------------------------------------------------ jobs
    @abstractmethod
    def insert_job(self, job: StoredJob, datasets: Sequence[str] = ()) -> StoredJob:
        """Store a new job; returns it with its `seq` (creation order). The `datasets` it uses must exist
        (else NotFound, DATASET_NOT_FOUND): checked in the same transaction, so that a concurrent
        delete_dataset either sees the job or leaves it nothing to use."""

    @abstractmethod
    def claim_job(
        self,
        claim: str,
        worker: str,
        seconds: float | None,
        skip: Collection[str] = (),
        max_replicas: int | None = None,
    ) -> StoredJob | None:
        """Claim the job to run next, if any: the oldest of the RUNNING jobs that no server holds (their
        claims released or lapsed), else of the QUEUED ones, whose graph's trainer lease it can take
        (or that lost its graph); skipping what other servers are claiming at the same moment. The
        job is held under `claim` for `seconds` (renew_claims; None: until released or the job ends),
        `worker` names the server, a RUNNING one counts a resume, its status message is cleared, and
        its graph's lease is the job's (job_trainer) until the job ends. Jobs on the graphs in `skip`
        wait (graphs trained by streams the store does not know of), and so do jobs of more than
        `max_replicas` replicas (None: any number), for a server that can run them."""

    @abstractmethod
    def renew_claims(self, claims: Mapping[str, str], seconds: float) -> dict[str, bool]:
        """Extend these claims (job id -> claim) by `seconds` from now; for each job whose claim still
        holds it, whether a cancel was requested."""

    @abstractmethod
    def set_job_status(self, job_id: str, claim: str, message: str) -> None:
        """Set the status message of a job `claim` holds (what it waits for; empty: nothing); nothing
        if the claim no longer holds it."""

    @abstractmethod
    def release_claim(self, job_id: str, claim: str) -> None:
        """Let another server take the job up (a server stopping); nothing if `claim` no longer holds it."""

    @abstractmethod
    def cancel_job(self, job_id: str, tenant: str, ended_at: float) -> StoredJob | None:
        """End the job CANCELLED now if no server holds it (queued, or its claim lapsed), freeing its
        graph; else ask the server running it to (cancel_requested). The job as it is then; None when
        the tenant has no such job."""

    @abstractmethod
    def dataset_in_use(self, dataset_id: str) -> bool:
        """Whether a QUEUED or RUNNING job of any tenant trains on the dataset or evaluates on it."""

    @abstractmethod
    def get_job(self, job_id: str, tenant: str) -> StoredJob | None: ...

    @abstractmethod
    def list_jobs(
        self, tenant: str, after_seq: int, limit: int, states: tuple[str, ...] = (), graph_id: str = ""
    ) -> list[StoredJob]:
        """The tenant's jobs with seq > after_seq, oldest first; empty filters match every job."""

    @abstractmethod
    def unfinished_jobs(self) -> list[StoredJob]:
        """Every tenant's QUEUED and RUNNING jobs, oldest first: what a starting server takes up again."""

    @abstractmethod
    def save_job(
        self,
        job: StoredJob,
        events: tuple[JobEventRow, ...] = (),
        checkpoint: Checkpoint | None = None,
        fence: Fence | None = None,
        claim: str | None = None,
    ) -> int | None:
        """In one transaction: the job's graph checkpoint (when given, under `fence` as in save_checkpoint),
        the job's row, and its new history events, so history never runs ahead of the parameters it
        describes; the graph's new version when a checkpoint was written. With `claim`, ClaimLost
        and nothing written unless that claim still holds the job. A job saved in an ended state
        gives its graph's lease and its claim up in the same transaction."""

    @abstractmethod
    def job_events(self, job_id: str, from_step: int, limit: int) -> list[JobEventRow]:
        """The job's stored events with step >= from_step, by step, at most `limit`."""

    @abstractmethod
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
        """Store a dataset: every chunk row (column index, at most DATASET_CHUNK_BYTES of the column's
        bytes; each column's rows in order) and its record in one transaction, so it is there whole or
        not at all. `chunks` is read inside the transaction, and may block while its bytes arrive (an
        exception from it rolls everything back); `sha256` is asked once `chunks` is exhausted."""

    @abstractmethod
    def get_dataset(self, dataset_id: str, tenant: str) -> StoredDataset | None: ...

    @abstractmethod
    def list_datasets(self, tenant: str, after_seq: int, limit: int) -> list[StoredDataset]:
        """The tenant's datasets with seq > after_seq, oldest first."""

    @abstractmethod
    def delete_dataset(self, dataset_id: str) -> bool:
        """False when there is no such dataset; FailedPrecondition (DATASET_IN_USE), nothing deleted, while
        a queued or running job uses it (see dataset_in_use), checked in the same transaction."""

    @abstractmethod
    def dataset_chunks(self, dataset_id: str) -> Iterator[tuple[int, bytes]]:
        """The dataset's chunk rows as (column index, data), columns in order and each column's rows
        in order, read one at a time. Ends early if the dataset is deleted meanwhile."""

    @abstractmethod
    def dataset_hashes(self) -> set[str]:
        """The sha256 of every stored dataset, of every tenant: the cache entries still wanted."""
