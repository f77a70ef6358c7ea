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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

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


@dataclass(frozen=True)
class Checkpoint:
    step: int
    parameters: dict[str, np.ndarray]
    """Trained parameters and `state` nodes (running statistics) alike."""
    optimizer_state: OptimizerState


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


@dataclass(frozen=True)
class JobEventRow:
    """One step of a job as history keeps it; `metrics` is empty except on evaluation steps."""

    step: int
    epoch: int
    loss: float
    learning_rate: float
    metrics: dict[str, float] = field(default_factory=dict)


class RequestIdTaken(Exception):
    """insert_graph's request_id already names a graph of the tenant: the one `graph`, created from `fingerprint`."""

    def __init__(self, graph: StoredGraph, fingerprint: str) -> None:
        super().__init__(f"request_id already names graph '{graph.graph_id}'")
        self.graph = graph
        self.fingerprint = fingerprint


class DatabaseUnusable(Exception):
    """The database `--db` names cannot be used at all (unreachable or refusing us at startup, a schema
    newer than this server knows, a driver not installed): one line saying why, for the operator."""


def tensor_row(array: np.ndarray) -> tuple[str, str, bytes]:
    little = np.asarray(array, dtype=array.dtype.newbyteorder("<"))
    return little.dtype.str, json.dumps(list(little.shape)), little.tobytes()


def tensor_from_row(dtype: str, shape: str, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape))


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
        """The graph's committed step, parameters and optimizer state, read in one transaction;
        None when the graph is gone (deleted since it was looked up)."""

    @abstractmethod
    def save_checkpoint(self, graph_id: str, checkpoint: Checkpoint) -> None:
        """Replace the graph's step, parameters and optimizer state in one transaction."""

    # ------------------------------------------------------------ jobs
    @abstractmethod
    def insert_job(self, job: StoredJob) -> StoredJob:
        """Store a new job; returns it with its `seq` (creation order)."""

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
        self, job: StoredJob, events: tuple[JobEventRow, ...] = (), checkpoint: Checkpoint | None = None
    ) -> None:
        """In one transaction: the job's graph checkpoint (when given), the job's row, and its new
        history events, so history never runs ahead of the parameters it describes."""

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
    def delete_dataset(self, dataset_id: str) -> bool: ...

    @abstractmethod
    def dataset_chunks(self, dataset_id: str) -> Iterator[tuple[int, bytes]]:
        """The dataset's chunk rows as (column index, data), columns in order and each column's rows
        in order, read one at a time. Ends early if the dataset is deleted meanwhile."""

    @abstractmethod
    def dataset_hashes(self) -> set[str]:
        """The sha256 of every stored dataset, of every tenant: the cache entries still wanted."""
