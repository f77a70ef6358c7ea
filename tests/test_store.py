"""The store's contract, run unchanged against both backends (SQLite and a real PostgreSQL).

Every test takes `store`, a fresh database of each backend opened through `open_store` as the
server opens `--db`. What one backend guarantees the other must too: each write one transaction
(a write that fails midway changes nothing), tensors back bit for bit with their dtype and shape,
request ids that name one graph however many writers race, datasets whole or absent.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from chainrule.server.errors import Unavailable
from chainrule.server.store import Checkpoint, Store, open_store
from chainrule.server.store.base import (
    REQUEST_ID_SECONDS,
    ColumnSpec,
    CreateRequest,
    JobEventRow,
    RequestIdTaken,
    StoredJob,
)

SUMMARY = {"topological_order": ["x", "w", "y"], "inputs": ["x"], "parameters": ["w"], "state": [], "node_count": 3}


@pytest.fixture
def store(backend_db: str) -> Iterator[Store]:
    opened = open_store(backend_db)
    yield opened
    opened.close()


def add_graph(store: Store, graph_id: str, tenant: str = "", request: CreateRequest | None = None):  # type: ignore[no-untyped-def]
    return store.insert_graph(graph_id, tenant, f"name-{graph_id}", b"definition", SUMMARY, {"w": np.ones(3)}, request)


def assert_same_checkpoint(got: Checkpoint | None, want: Checkpoint) -> None:
    assert got is not None
    assert got.step == want.step
    assert_same_arrays(got.parameters, want.parameters)
    assert sorted(got.optimizer_state) == sorted(want.optimizer_state)
    for name, (kind, slots) in want.optimizer_state.items():
        assert got.optimizer_state[name][0] == kind
        assert_same_arrays(got.optimizer_state[name][1], slots)


def assert_same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Same names, values bit for bit, dtype as stored (little-endian) and shape."""
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        little = value.astype(value.dtype.newbyteorder("<"))
        assert got[name].dtype == little.dtype, name
        assert got[name].shape == value.shape, name
        assert got[name].tobytes() == little.tobytes(), name


# ---------------------------------------------------------------- graphs
def test_graphs_are_stored_listed_in_order_and_deleted_per_tenant(store: Store) -> None:
    first, second, third = (add_graph(store, graph_id) for graph_id in ("g1", "g2", "g3"))
    theirs = add_graph(store, "t1", tenant="acme")
    assert first.seq < second.seq < third.seq < theirs.seq
    assert store.count_graphs() == 4

    assert store.get_graph("g1", "") == first
    assert store.get_graph("g1", "acme") is None, "another tenant's graph is not found"
    assert store.get_graph("g1", "", with_order=False) == replace(
        first, summary={key: value for key, value in SUMMARY.items() if key != "topological_order"}
    )
    assert [g.graph_id for g in store.list_graphs("", 0, 10)] == ["g1", "g2", "g3"]
    assert [g.graph_id for g in store.list_graphs("", first.seq, 1)] == ["g2"]
    assert [g.graph_id for g in store.list_graphs("acme", 0, 10)] == ["t1"]
    assert "topological_order" not in store.list_graphs("", 0, 1, with_order=False)[0].summary
    assert store.definition("g2") == b"definition"

    assert store.delete_graph("g2") is True
    assert store.delete_graph("g2") is False
    assert store.get_graph("g2", "") is None and store.definition("g2") is None
    assert store.load_checkpoint("g2") is None
    assert [g.graph_id for g in store.list_graphs("", 0, 10)] == ["g1", "g3"]
    assert add_graph(store, "g4").seq > theirs.seq, "a deleted graph's seq is never reused"


def test_checkpoints_keep_every_dtype_and_shape_bit_for_bit_and_replace_the_optimizer_state(store: Store) -> None:
    add_graph(store, "g")
    assert_same_checkpoint(store.load_checkpoint("g"), Checkpoint(0, {"w": np.ones(3)}, {}))
    parameters = {
        "w": np.array([np.pi, -0.0, np.inf, np.nan]),
        "f32": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        "big_endian": np.arange(4, dtype=">f8"),
        "i64": np.array([-(2**62), 2**62], dtype=np.int64),
        "i32": np.arange(3, dtype=np.int32),
        "flags": np.array([True, False]),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 3)),
    }
    adam = {"m": np.full(4, 0.1), "v": np.full(4, 0.2), "t": np.array(3.0)}
    checkpoint = Checkpoint(7, parameters, {"w": ("adam", adam), "f32": ("sgd", {"velocity": np.ones((2, 3), "f4")})})
    store.save_checkpoint("g", checkpoint)
    assert_same_checkpoint(store.load_checkpoint("g"), checkpoint)
    assert store.get_graph("g", "").step == 7  # type: ignore[union-attr]

    later = Checkpoint(8, {**parameters, "w": np.zeros(4)}, {"w": ("sgd", {"velocity": np.ones(4)})})
    store.save_checkpoint("g", later)
    assert_same_checkpoint(store.load_checkpoint("g"), later)


class Unwritable:
    """Stands where an array should be; fails when the store converts it, midway through a write."""

    @property
    def dtype(self) -> np.dtype:
        raise RuntimeError("the write failed here")


@pytest.mark.parametrize("failing", ["parameters", "optimizer state"])
def test_a_checkpoint_that_fails_midway_changes_nothing(store: Store, failing: str) -> None:
    add_graph(store, "g")
    committed = Checkpoint(2, {"w": np.arange(3.0)}, {"w": ("sgd", {"velocity": np.ones(3)})})
    store.save_checkpoint("g", committed)
    # The step is written first, the parameters next, the optimizer state last.
    broken = (
        Checkpoint(3, {"w": np.zeros(3), "v": Unwritable()}, {})  # type: ignore[dict-item]
        if failing == "parameters"
        else Checkpoint(3, {"w": np.zeros(3)}, {"w": ("adam", {"m": Unwritable()})})  # type: ignore[dict-item]
    )
    with pytest.raises(RuntimeError, match="the write failed here"):
        store.save_checkpoint("g", broken)
    assert_same_checkpoint(store.load_checkpoint("g"), committed)
    assert store.get_graph("g", "").step == 2  # type: ignore[union-attr]


def test_a_checkpoint_of_a_deleted_graph_is_refused(store: Store) -> None:
    add_graph(store, "g")
    store.delete_graph("g")
    with pytest.raises(Unavailable) as raised:
        store.save_checkpoint("g", Checkpoint(1, {"w": np.zeros(3)}, {}))
    assert "could not save a checkpoint of graph 'g'" in raised.value.message
    assert store.load_checkpoint("g") is None


# ---------------------------------------------------------------- CreateGraph request ids
def test_a_request_id_names_one_graph_per_tenant_until_it_expires(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = CreateRequest("req-1", "fingerprint-a")
    first = add_graph(store, "g1", request=request)
    assert store.find_request("", "req-1") == (first, "fingerprint-a")
    assert store.find_request("acme", "req-1") is None

    with pytest.raises(RequestIdTaken) as raised:
        add_graph(store, "g2", request=CreateRequest("req-1", "fingerprint-b"))
    assert (raised.value.graph, raised.value.fingerprint) == (first, "fingerprint-a")
    assert store.get_graph("g2", "") is None and store.count_graphs() == 1, "nothing of the retry is stored"
    theirs = add_graph(store, "t1", tenant="acme", request=request)
    assert store.find_request("acme", "req-1") == (theirs, "fingerprint-a")

    later = time.time() + REQUEST_ID_SECONDS + 60
    monkeypatch.setattr(time, "time", lambda: later)
    assert store.find_request("", "req-1") is None, "expired"
    again = add_graph(store, "g3", request=CreateRequest("req-1", "fingerprint-c"))
    assert store.find_request("", "req-1") == (again, "fingerprint-c")
    store.delete_graph("g3")
    assert store.find_request("", "req-1") is None, "its graph is gone"


def test_racing_inserts_with_one_request_id_store_one_graph(store: Store) -> None:
    outcomes: dict[str, str] = {}
    start = threading.Barrier(6)

    def insert(graph_id: str) -> None:
        start.wait()
        try:
            add_graph(store, graph_id, request=CreateRequest("same", "fingerprint"))
            outcomes[graph_id] = "stored"
        except RequestIdTaken as taken:
            outcomes[graph_id] = f"taken by {taken.graph.graph_id}"

    threads = [threading.Thread(target=insert, args=(f"g{index}",)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (winner,) = [graph_id for graph_id, outcome in outcomes.items() if outcome == "stored"]
    assert sorted(outcomes.values()) == ["stored"] + [f"taken by {winner}"] * 5
    assert store.count_graphs() == 1


# ---------------------------------------------------------------- jobs
def new_job(job_id: str, graph_id: str = "g", tenant: str = "", state: str = "QUEUED") -> StoredJob:
    return StoredJob(job_id, tenant, graph_id, b"\x08\x01spec", state, 100, time.time())


def test_jobs_are_stored_filtered_paged_and_their_history_kept(store: Store) -> None:
    add_graph(store, "g")
    add_graph(store, "h")
    first = store.insert_job(new_job("j1"))
    second = store.insert_job(new_job("j2", graph_id="h", state="RUNNING"))
    theirs = store.insert_job(new_job("t1", tenant="acme"))
    assert 0 < first.seq < second.seq < theirs.seq
    assert store.get_job("j1", "") == first
    assert store.get_job("j1", "acme") is None
    assert [job.job_id for job in store.list_jobs("", 0, 10)] == ["j1", "j2"]
    assert [job.job_id for job in store.list_jobs("", first.seq, 10)] == ["j2"]
    assert [job.job_id for job in store.list_jobs("", 0, 1)] == ["j1"]
    assert [job.job_id for job in store.list_jobs("", 0, 10, states=("RUNNING", "FAILED"))] == ["j2"]
    assert [job.job_id for job in store.list_jobs("", 0, 10, graph_id="g")] == ["j1"]
    assert [job.job_id for job in store.unfinished_jobs()] == ["j1", "j2", "t1"]

    running = replace(first, state="RUNNING", step=2, epoch=1, loss=math.nan, metrics={"accuracy": 0.5})
    events = (JobEventRow(1, 1, 0.75, 0.1), JobEventRow(2, 1, math.nan, 0.05, {"accuracy": 0.5}))
    checkpoint = Checkpoint(2, {"w": np.full(3, 0.5)}, {"w": ("sgd", {"velocity": np.ones(3)})})
    store.save_job(running, events, checkpoint)
    stored = store.get_job("j1", "")
    assert stored is not None and math.isnan(stored.loss)
    assert replace(stored, loss=0.0) == replace(running, loss=0.0)
    assert_same_checkpoint(store.load_checkpoint("g"), checkpoint)
    history = store.job_events("j1", 0, 10)
    assert [(e.step, e.epoch, e.learning_rate, e.metrics) for e in history] == [
        (1, 1, 0.1, {}),
        (2, 1, 0.05, {"accuracy": 0.5}),
    ]
    assert history[0].loss == 0.75 and math.isnan(history[1].loss)
    assert [e.step for e in store.job_events("j1", 2, 10)] == [2]
    assert [e.step for e in store.job_events("j1", 0, 1)] == [1]

    ended = replace(running, state="SUCCEEDED", ended_at=time.time())
    store.save_job(ended)
    assert store.get_job("j1", "") is not None and store.get_job("j1", "").state == "SUCCEEDED"  # type: ignore[union-attr]
    assert [job.job_id for job in store.unfinished_jobs()] == ["j2", "t1"]


def test_a_job_save_the_database_refuses_changes_nothing(store: Store) -> None:
    add_graph(store, "g")
    job = store.insert_job(new_job("j1", state="RUNNING"))
    committed = Checkpoint(1, {"w": np.arange(3.0)}, {})
    store.save_job(replace(job, step=1), (JobEventRow(1, 1, 0.5, 0.1),), committed)
    with pytest.raises(Unavailable) as raised:  # step 1's event again: the history's key refuses it, last
        store.save_job(
            replace(job, step=2), (JobEventRow(2, 1, 0.4, 0.1), JobEventRow(1, 1, 0.3, 0.1)), Checkpoint(2, {}, {})
        )
    assert "could not save job 'j1' at step 2" in raised.value.message
    assert "nothing was written" in raised.value.message
    assert store.get_job("j1", "").step == 1  # type: ignore[union-attr]
    assert [(e.step, e.loss) for e in store.job_events("j1", 0, 10)] == [(1, 0.5)]
    assert_same_checkpoint(store.load_checkpoint("g"), committed)


# ---------------------------------------------------------------- datasets
COLUMNS = (ColumnSpec("x", "float32", (2,)), ColumnSpec("y", "int64", ()))


def test_datasets_keep_their_chunk_rows_in_order_and_delete_with_them(store: Store) -> None:
    rows = [(0, b"x0" * 8), (0, b"x1" * 8), (1, b"y0" * 4), (0, b"x2" * 8), (1, b"y1" * 4)]
    digest = hashlib.sha256(b"".join(data for _, data in rows)).hexdigest()
    asked: list[str] = []

    def sha256() -> str:
        asked.append(digest)
        return digest

    stored = store.insert_dataset("d1", "", "points", COLUMNS, 6, 64, iter(rows), sha256)
    assert asked == [digest]
    assert (stored.dataset_id, stored.columns, stored.num_examples, stored.size_bytes, stored.sha256) == (
        "d1",
        COLUMNS,
        6,
        64,
        digest,
    )
    assert store.get_dataset("d1", "") == stored
    assert store.get_dataset("d1", "acme") is None
    other = store.insert_dataset("d2", "", "more", COLUMNS[:1], 1, 8, iter([(0, b"z" * 8)]), lambda: "f" * 64)
    assert other.seq > stored.seq
    assert [d.dataset_id for d in store.list_datasets("", 0, 10)] == ["d1", "d2"]
    assert [d.dataset_id for d in store.list_datasets("", stored.seq, 10)] == ["d2"]
    assert list(store.dataset_chunks("d1")) == [
        (0, b"x0" * 8),
        (0, b"x1" * 8),
        (0, b"x2" * 8),
        (1, b"y0" * 4),
        (1, b"y1" * 4),
    ]
    assert store.dataset_hashes() == {digest, "f" * 64}

    assert store.delete_dataset("d1") is True
    assert store.delete_dataset("d1") is False
    assert store.get_dataset("d1", "") is None
    assert list(store.dataset_chunks("d1")) == []
    assert store.dataset_hashes() == {"f" * 64}


def test_a_dataset_whose_bytes_stop_arriving_leaves_nothing(store: Store) -> None:
    def rows() -> Iterator[tuple[int, bytes]]:
        yield 0, b"a" * 1000
        yield 0, b"b" * 1000
        raise ConnectionError("the upload stream broke")

    with pytest.raises(ConnectionError):
        store.insert_dataset("d1", "", "broken", COLUMNS, 100, 2400, rows(), lambda: "0" * 64)
    assert store.get_dataset("d1", "") is None
    assert list(store.dataset_chunks("d1")) == []
    assert store.dataset_hashes() == set()
    assert store.insert_dataset("d1", "", "whole", COLUMNS[:1], 1, 8, iter([(0, b"c" * 8)]), lambda: "1" * 64).seq > 0
