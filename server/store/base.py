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
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

OptimizerState = dict[str, tuple[str, dict[str, np.ndarray]]]
"""Per parameter: the optimizer kind that wrote the state, and its named arrays."""


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


def tensor_row(array: np.ndarray) -> tuple[str, str, bytes]:
    little = np.asarray(array, dtype=array.dtype.newbyteorder("<"))
    return little.dtype.str, json.dumps(list(little.shape)), little.tobytes()


def tensor_from_row(dtype: str, shape: str, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape))


class Store(ABC):
    """Graphs, their current parameters, optimizer state and step."""

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
    ) -> StoredGraph: ...

    @abstractmethod
    def count_graphs(self) -> int: ...

    @abstractmethod
    def get_graph(self, graph_id: str, tenant: str) -> StoredGraph | None: ...

    @abstractmethod
    def list_graphs(self, tenant: str, after_seq: int, limit: int) -> list[StoredGraph]:
        """The tenant's graphs with seq > after_seq, oldest first."""

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
