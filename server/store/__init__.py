"""Where graphs, parameters and training state live: one interface (`base.Store`), and two
implementations with the same guarantees: SQLite, the embedded default, and PostgreSQL."""

from chainrule.server.store import location
from chainrule.server.store.base import Checkpoint, DatabaseUnusable, OptimizerState, Store, StoredGraph
from chainrule.server.store.sqlite import SqliteStore

POSTGRES_EXTRA = "pip install 'chainrule[postgres]'"


def open_store(db: str) -> Store:
    """The store that `--db` names: a `postgresql://` URL, or else a SQLite file path. PostgreSQL's
    driver is an extra, imported only when a URL asks for it."""
    if not location.is_postgres_url(db):
        return SqliteStore(db)
    try:
        from chainrule.server.store.postgres import PostgresStore
    except ImportError as error:
        raise DatabaseUnusable(
            f"--db {location.shown(db)} needs PostgreSQL support, which is not installed ({error.name or error}): "
            f"{POSTGRES_EXTRA}"
        ) from None
    return PostgresStore(db)


__all__ = [
    "Checkpoint",
    "DatabaseUnusable",
    "OptimizerState",
    "SqliteStore",
    "Store",
    "StoredGraph",
    "open_store",
]
