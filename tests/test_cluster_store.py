"""The store's side of several servers on one database, run against both backends: graph versions
and the fences of checkpoint writes, trainer leases, job claims (order, waiting for a graph,
lapsing, fencing, cancels) and datasets held by the jobs that use them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from chainrule.server.errors import FailedPrecondition, NotFound
from chainrule.server.store import Checkpoint, Store, open_store
from chainrule.server.store.base import ClaimLost, ColumnSpec, Fence, TrainerBusy, VersionMoved, job_trainer
from tests.test_store import add_graph, new_job


@pytest.fixture
def store(backend_db: str) -> Iterator[Store]:
    opened = open_store(backend_db)
    yield opened
    opened.close()


def checkpoint(step: int) -> Checkpoint:
    return Checkpoint(step, {"w": np.full(3, float(step))}, {})


def test_checkpoints_bump_the_version_and_a_fenced_write_needs_the_lease_and_the_version(store: Store) -> None:
    add_graph(store, "g")
    assert store.graph_version("g", "") == 0 and store.graph_version("g", "acme") is None
    assert store.save_checkpoint("g", checkpoint(1)) == 1
    assert store.save_checkpoint("g", checkpoint(2), Fence("streams/a", 1)) == 2
    loaded = store.load_checkpoint("g")
    assert loaded is not None and (loaded.step, loaded.version) == (2, 2)
    assert store.get_graph("g", "") is not None and store.get_graph("g", "").version == 2  # type: ignore[union-attr]

    with pytest.raises(VersionMoved):  # written on what version 1 held: another writer came in between
        store.save_checkpoint("g", checkpoint(3), Fence("streams/a", 1))
    lease = store.acquire_trainer("g", "streams/b", 60)
    assert lease is not None and lease.granted and lease.version == 2
    with pytest.raises(TrainerBusy) as busy:
        store.save_checkpoint("g", checkpoint(3), Fence("streams/a", 2))
    assert busy.value.holder == "streams/b"
    assert store.save_checkpoint("g", checkpoint(3), Fence("streams/b", 2)) == 3
    assert store.load_checkpoint("g").step == 3  # type: ignore[union-attr]
    store.delete_graph("g")
    with pytest.raises(NotFound, match="graph 'g' was deleted"):
        store.save_checkpoint("g", checkpoint(4), Fence("streams/b", 3))


def test_a_trainer_lease_is_held_renewed_released_and_lapses(store: Store) -> None:
    add_graph(store, "g")
    assert store.acquire_trainer("missing", "streams/a", 60) is None
    assert store.acquire_trainer("g", "streams/a", 0.3).granted  # type: ignore[union-attr]
    refused = store.acquire_trainer("g", "streams/b", 60)
    assert refused is not None and not refused.granted and refused.holder == "streams/a"
    assert store.trainer_of("g") == "streams/a" and store.trainer_of("missing") is None
    assert store.renew_trainers("streams/a", ["g"], 0.3) == {"g"}
    assert store.renew_trainers("streams/b", ["g"], 0.3) == set()
    time.sleep(0.5)  # lapsed: anyone may take it
    assert store.trainer_of("g") == ""
    assert store.acquire_trainer("g", "streams/b", 60).granted  # type: ignore[union-attr]
    assert store.renew_trainers("streams/a", ["g"], 60) == set()
    store.release_trainer("g", "streams/a")  # not its lease: nothing changes
    assert store.trainer_of("g") == "streams/b"
    assert store.acquire_trainer("g", "streams/c", 60, replaces="streams/b").granted  # type: ignore[union-attr]
    store.release_trainer("g", "streams/c")
    assert store.trainer_of("g") == ""


def test_jobs_are_claimed_in_creation_order_running_ones_first_one_per_graph(store: Store) -> None:
    for graph_id in ("g", "h", "k"):
        add_graph(store, graph_id)
    first = store.insert_job(new_job("j1", "g"))
    store.insert_job(new_job("j2", "g"))
    store.insert_job(new_job("j3", "h"))
    claimed = store.claim_job("c1", "server-a:1", 60)
    assert claimed is not None and claimed.job_id == "j1" and (claimed.claim, claimed.worker) == ("c1", "server-a:1")
    assert claimed.resumes == 0 and store.trainer_of("g") == job_trainer("j1", "c1")
    assert store.claim_job("c2", "server-b:2", 60).job_id == "j3"  # type: ignore[union-attr]  # j2 waits for g
    assert store.claim_job("c3", "server-b:2", 60) is None
    assert store.claim_job("c3", "server-b:2", 60, skip={"k"}) is None

    store.save_job(replace(first, state="SUCCEEDED", step=5, ended_at=time.time()), claim="c1")
    assert store.trainer_of("g") == "" and store.get_job("j1", "").claim == ""  # type: ignore[union-attr]
    store.insert_job(new_job("j4", "k"))
    store.insert_job(new_job("j5", "k", state="RUNNING"))  # left running by a server that stopped
    store.acquire_trainer("k", job_trainer("j5", ""), None)
    resumed = store.claim_job("c4", "server-a:1", 60)
    assert resumed is not None and resumed.job_id == "j5" and resumed.resumes == 1, "running jobs go first"
    assert store.trainer_of("k") == job_trainer("j5", "c4")
    assert store.claim_job("c5", "server-a:1", 60, skip={"k"}).job_id == "j2"  # type: ignore[union-attr]
    assert store.claim_job("c6", "server-a:1", 60) is None  # j4 waits for j5's graph


def test_jobs_of_more_replicas_than_a_server_runs_wait_for_one_that_can(store: Store) -> None:
    """A server without Ray (max_replicas 1) passes over replicated jobs, queued or left running, and
    takes the next job it can run; a server with Ray takes them, their status message cleared."""
    for graph_id in ("g", "h", "k"):
        add_graph(store, graph_id)
    store.insert_job(replace(new_job("left", "g", state="RUNNING"), replicas=2))  # its Ray server gone
    store.insert_job(replace(new_job("queued", "h"), replicas=4))
    store.insert_job(new_job("plain", "k"))
    assert store.get_job("queued", "").replicas == 4  # type: ignore[union-attr]
    assert store.claim_job("c1", "plain:1", 60, max_replicas=1).job_id == "plain"  # type: ignore[union-attr]
    assert store.claim_job("c2", "plain:1", 60, max_replicas=1) is None
    assert store.claim_job("c2", "small-ray:2", 60, max_replicas=2).job_id == "left"  # type: ignore[union-attr]
    store.set_job_status("left", "c2", "waiting for the Ray cluster")
    store.set_job_status("left", "other", "not its claim: nothing changes")
    assert store.get_job("left", "").status_message == "waiting for the Ray cluster"  # type: ignore[union-attr]
    store.release_claim("left", "c2")
    resumed = store.claim_job("c3", "ray:3", 60)
    assert resumed is not None and (resumed.job_id, resumed.status_message) == ("left", "")
    assert store.claim_job("c4", "ray:3", 60, max_replicas=1024).job_id == "queued"  # type: ignore[union-attr]


def test_a_lapsed_claim_is_taken_over_and_fences_out_its_old_holder(store: Store) -> None:
    add_graph(store, "g")
    job = store.insert_job(new_job("j1", "g"))
    old = store.claim_job("old", "server-a:1", 0.3)
    assert old is not None
    store.save_job(replace(job, state="RUNNING", step=1), claim="old")
    assert store.renew_claims({"j1": "old"}, 0.3) == {"j1": False}
    assert store.claim_job("new", "server-b:2", 60) is None  # still held
    time.sleep(0.5)
    new = store.claim_job("new", "server-b:2", 60)
    assert new is not None and (new.worker, new.resumes, new.step) == ("server-b:2", 1, 1)
    assert store.renew_claims({"j1": "old"}, 60) == {}
    with pytest.raises(ClaimLost):  # the old holder's commit, checkpoint and all, is refused
        store.save_job(replace(job, state="RUNNING", step=9), checkpoint=checkpoint(9), claim="old")
    with pytest.raises(TrainerBusy):  # and so is a checkpoint under its graph lease
        store.save_checkpoint("g", checkpoint(9), Fence(job_trainer("j1", "old"), 0))
    assert store.get_job("j1", "").step == 1 and store.load_checkpoint("g").step == 0  # type: ignore[union-attr]
    version = store.save_job(
        replace(job, state="RUNNING", step=2),
        checkpoint=checkpoint(2),
        fence=Fence(job_trainer("j1", "new"), 0),
        claim="new",
    )
    assert version == 1 and store.load_checkpoint("g").step == 2  # type: ignore[union-attr]


def test_a_cancel_ends_an_unheld_job_at_once_and_asks_the_holder_of_a_held_one(store: Store) -> None:
    add_graph(store, "g")
    add_graph(store, "h")
    store.insert_job(new_job("held", "g"))
    store.insert_job(new_job("queued", "h"))
    assert store.claim_job("c1", "server-a:1", 60).job_id == "held"  # type: ignore[union-attr]
    assert store.cancel_job("held", "acme", time.time()) is None
    asked = store.cancel_job("held", "", time.time())
    assert asked is not None and asked.state == "QUEUED" and asked.cancel_requested
    assert store.renew_claims({"held": "c1"}, 60) == {"held": True}
    ended = store.cancel_job("queued", "", time.time())
    assert ended is not None and ended.state == "CANCELLED" and store.get_job("queued", "").state == "CANCELLED"  # type: ignore[union-attr]
    assert store.cancel_job("queued", "", time.time()).state == "CANCELLED"  # type: ignore[union-attr]

    store.insert_job(new_job("left", "h", state="RUNNING"))  # its server gone, its graph still its
    store.acquire_trainer("h", job_trainer("left", "gone"), None)
    assert store.cancel_job("left", "", time.time()).state == "CANCELLED"  # type: ignore[union-attr]
    assert store.trainer_of("h") == ""


def test_servers_claiming_at_once_each_get_a_job_of_their_own(store: Store) -> None:
    for index in range(6):
        add_graph(store, f"g{index}")
        store.insert_job(new_job(f"j{index}", f"g{index}"))
    start = threading.Barrier(6)
    claimed: list[str] = []

    def claim(index: int) -> None:
        start.wait()
        while (job := store.claim_job(f"c{index}", f"server:{index}", 60)) is not None:
            claimed.append(job.job_id)
            return

    threads = [threading.Thread(target=claim, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == len(set(claimed))
    claimed += [job.job_id for job in iter(lambda: store.claim_job("late", "server:9", 60), None)]
    assert sorted(claimed) == [f"j{index}" for index in range(6)]


def test_a_dataset_a_job_uses_is_not_deleted(store: Store) -> None:
    add_graph(store, "g")
    columns = (ColumnSpec("x", "float64", (2,)),)
    store.insert_dataset("d1", "", "data", columns, 1, 16, [(0, bytes(16))], lambda: "ab" * 32)
    with pytest.raises(NotFound, match="dataset 'd2' not found"):
        store.insert_job(new_job("j0", "g"), ["d1", "d2"])
    job = store.insert_job(replace(new_job("j1", "g"), spec=b"\x2a\x02d1"), ["d1"])
    assert store.dataset_in_use("d1") and not store.dataset_in_use("d2")
    with pytest.raises(FailedPrecondition) as refused:
        store.delete_dataset("d1")
    assert refused.value.reason == "DATASET_IN_USE" and store.get_dataset("d1", "") is not None
    store.save_job(replace(job, state="CANCELLED", ended_at=time.time()))
    assert not store.dataset_in_use("d1") and store.delete_dataset("d1")
