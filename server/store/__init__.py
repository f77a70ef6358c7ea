"""Where graphs, parameters and training state live: one interface (`base.Store`), and two
implementations with the same guarantees: SQLite, the embedded default, and PostgreSQL."""

from chainrule.server.store import location
from chainrule.server.store.base import Checkpoint, DatabaseUnusable, OptimizerState, Store, StoredGraph
from chainrule.server.store.sqlite import SqliteStore

POSTGRES_EXTRA = "pip install 'chainrule[postgres]'"
WATCHER_CONNECTIONS = 2
"""How many reads of the store a server's WatchJob streams make at once, however many watch (see
JobManager._watch_read): a watch of a job another server runs polls the store, and a watch that
replays history reads it, and without a bound enough of them would hold every connection calls need."""
POOL_SPARE_CONNECTIONS = 4
"""A server's PostgreSQL connections beyond those of its calls, jobs and watchers: its heartbeat,
its claims of queued jobs."""


def default_pool_size(max_concurrent_rpcs: int, job_workers: int) -> int:
    """A connection for every call and job that may hold one at once (an upload holds one while its
    stream runs), and the watchers' share, so that none waits for a connection another holds."""
    return max_concurrent_rpcs + job_workers + WATCHER_CONNECTIONS + POOL_SPARE_CONNECTIONS


def open_store(db: str, pool_size: int | None = None) -> Store:
    """The store that `--db` names: a `postgresql://` URL, or else a SQLite file path. PostgreSQL's
    driver is an extra, imported only when a URL asks for it; `pool_size` bounds its connections."""
    if not location.is_postgres_url(db):
        return SqliteStore(db)
    try:
        from chainrule.server.store.postgres import PostgresStore
    except ImportError as error:
        raise DatabaseUnusable(
            f"--db {location.shown(db)} needs PostgreSQL support, which is not installed ({error.name or error}): "
            f"{POSTGRES_EXTRA}"
        ) from None
    return PostgresStore(db) if pool_size is None else PostgresStore(db, pool_size)


__all__ = [
    "Checkpoint",
    "DatabaseUnusable",
    "OptimizerState",
    "SqliteStore",
    "Store",
    "StoredGraph",
    "default_pool_size",
    "open_store",
]
