"""Where graphs, parameters and training state live: one interface (`base.Store`), and SQLite,
the embedded default."""

from chainrule.server.store.base import Checkpoint, OptimizerState, Store, StoredGraph
from chainrule.server.store.sqlite import SqliteStore


def open_store(db: str) -> Store:
    """The store that `--db` names: a SQLite file path."""
    return SqliteStore(db)


__all__ = ["Checkpoint", "OptimizerState", "SqliteStore", "Store", "StoredGraph", "open_store"]
