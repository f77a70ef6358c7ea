"""Which end-to-end tests of the services run on PostgreSQL as well as on SQLite, and why the others
need not.

A test marked `both_backends` (tests/conftest.py), or in a module whose `pytestmark` is, runs twice:
its `server`, `fresh_server` and `new_db` are first a SQLite file's, then a new database's on the
session's real PostgreSQL (tests/postgres.py). The parametrization is by module, so a module's
servers start once per backend. The store's own suite (test_store, test_cluster_store) runs on both
through `backend_db`.

On both backends, whole modules (ON_BOTH_BACKENDS below):
* test_service, test_training, test_client_e2e: GraphService end to end: create, get, list and page,
  delete, forward and backward, Train streams, SetParameters, graphs and checkpoints after SIGKILL
  and restart, a cancelled stream's commit, concurrent streams on one graph;
* test_datasets, test_datasets_engine: DatasetService end to end and the dataset manager over a store:
  uploads in chunk rows, refused and cancelled uploads leaving no row, paging, deletion and the cache
  entry it frees, tenants, durability across a restart, the cache refilled from the store (whole or
  torn, and corrupt stored bytes found), the store transaction overlapped with the stream;
* test_jobs, test_jobs_queue, test_jobs_reads, test_jobs_crash: JobService end to end: batch order,
  evaluation, cancel, failure, tenants, one trainer per graph, the queue in creation order, watchers
  replaying a job's history, reads of one whole step while a job commits, a job SIGKILLed at random
  moments resuming bit for bit, SIGTERM and resume;
* test_limits_and_errors: names at their limits are stored; names PostgreSQL's text would refuse
  (NUL) must be refused before any store sees them.

On both backends, some tests of a module (the rest are backend-independent):
* test_graph_views: CreateGraph's request_id through a server (a retry finds the first graph, reuse
  for another graph is refused, the longest id, freed by delete, per tenant across a restart). The
  rest is about the size of answers (graph views, StreamParameters, the CLI), which the store does not
  shape; the expiry of ids and racing inserts are the store's own, in test_store on both backends.
* test_security: tenant isolation. Tokens and their reload, TLS and the warning about binds beyond
  loopback are decided before a call reaches the store.

SQLite only, by what they test: SQLite's files themselves (test_crash_safety: integrity of the file
after kills, writes the disk refuses, the file deleted or replaced; the legacy files of
test_store_migrations). PostgreSQL only: the servers sharing one database (test_cluster,
test_failover, test_version_reads) and PostgreSQL's outages (test_postgres_outage).
"""

from __future__ import annotations

import importlib

import pytest

from tests.conftest import BOTH_BACKENDS

ON_BOTH_BACKENDS: dict[str, tuple[str, ...]] = {
    "test_service": (),
    "test_training": (),
    "test_client_e2e": (),
    "test_datasets": (),
    "test_datasets_engine": (),
    "test_jobs": (),
    "test_jobs_queue": (),
    "test_jobs_reads": (),
    "test_jobs_crash": (),
    "test_limits_and_errors": (),
    "test_graph_views": (
        "test_a_retry_with_the_same_request_id_returns_the_first_graph",
        "test_a_request_id_reused_for_another_graph_is_refused",
        "test_a_request_id_at_the_length_limit_is_accepted",
        "test_deleting_the_graph_frees_its_request_id",
        "test_request_ids_belong_to_a_tenant_and_survive_a_restart",
    ),
    "test_security": ("test_tenants_see_only_their_own_graphs",),
}
"""Module -> the tests of it that run on both backends; () for the whole module."""


def marked(item: object) -> bool:
    marks = getattr(item, "pytestmark", [])
    return any(mark.name == BOTH_BACKENDS for mark in (marks if isinstance(marks, list) else [marks]))


@pytest.mark.parametrize("name", ON_BOTH_BACKENDS)
def test_this_docstring_names_the_tests_that_run_on_both_backends(name: str) -> None:
    module = importlib.import_module(f"tests.{name}")
    tests = {attribute for attribute in vars(module) if attribute.startswith("test_")}
    listed = set(ON_BOTH_BACKENDS[name])
    assert listed <= tests, f"{name} has no {sorted(listed - tests)}"
    if not listed:
        assert marked(module), f"{name} is listed whole, but its pytestmark is not {BOTH_BACKENDS}"
    else:
        assert not marked(module), f"{name} is marked whole: list it as ()"
        assert {test for test in tests if marked(getattr(module, test))} == listed
