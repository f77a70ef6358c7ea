"""The dataset manager in process, on both backends (a real SQLite file, then a real PostgreSQL, each
opened with open_store as the server opens --db): the in-use hook, the local cache and its refill
from the store, uploads whose store transaction starts during the stream, and what a restart cleans up."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from chainrule import tensors
from chainrule.server.datasets import STALL_SECONDS, DatasetManager, StoreWriteStopped
from chainrule.server.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from chainrule.server.store import Store, open_store
from chainrule.server.store.base import StoredDataset
from chainrule.v1 import dataset_service_pb2 as pb
from tests.database import query

MIB = 1 << 20

pytestmark = pytest.mark.both_backends


@pytest.fixture
def db(new_db: Callable[[], str]) -> str:
    return new_db()


@pytest.fixture
def store(db: str) -> Iterator[Store]:
    opened = open_store(db)
    yield opened
    opened.close()


@pytest.fixture
def manager(store: Store, tmp_path: Path) -> DatasetManager:
    return DatasetManager(store, tmp_path / "cache")


def header_of(name: str, columns: dict[str, np.ndarray]) -> pb.DatasetHeader:
    return pb.DatasetHeader(
        name=name,
        columns=[
            pb.DatasetColumn(name=column, dtype=tensors.wire_dtype(array.dtype), shape=array.shape[1:])
            for column, array in columns.items()
        ],
        num_examples=len(next(iter(columns.values()))),
    )


def put(manager: DatasetManager, name: str, columns: dict[str, np.ndarray], tenant: str = "") -> StoredDataset:
    with manager.upload(header_of(name, columns), tenant) as upload:
        for column, array in columns.items():
            raw = array.tobytes()
            for start in range(0, len(raw), MIB):
                upload.append(column, raw[start : start + MIB])
        return upload.finish()


def test_delete_is_refused_while_the_in_use_hook_says_a_job_uses_the_dataset(manager: DatasetManager) -> None:
    dataset = put(manager, "busy", {"x": np.ones((3, 2))})
    asked: list[str] = []

    def in_use(dataset_id: str) -> bool:
        asked.append(dataset_id)
        assert manager.usage_lock.locked(), "asked under the usage lock"
        return True

    manager.in_use = in_use
    with pytest.raises(FailedPrecondition) as refused:
        manager.delete_dataset(dataset.dataset_id)
    assert refused.value.reason == "DATASET_IN_USE" and refused.value.subject == dataset.dataset_id
    assert "queued or running job" in refused.value.message
    assert asked == [dataset.dataset_id]
    assert manager.get_dataset(dataset.dataset_id) == dataset
    manager.in_use = lambda dataset_id: False
    manager.delete_dataset(dataset.dataset_id)
    with pytest.raises(NotFound):
        manager.get_dataset(dataset.dataset_id)


def test_open_fills_a_missing_cache_entry_from_the_store_and_maps_it_read_only(
    store: Store, manager: DatasetManager, tmp_path: Path
) -> None:
    x = np.random.default_rng(0).standard_normal((3000, 7, 11)).astype(np.float32)  # 3 chunk rows of 4 MiB
    y = np.arange(3000, dtype=np.int64)
    dataset = put(manager, "fill", {"x": x, "y": y}, tenant="alice")
    elsewhere = DatasetManager(store, tmp_path / "another-cache")  # another server sharing the database
    local = elsewhere.open(dataset.dataset_id, "alice")
    assert (tmp_path / "another-cache" / f"{dataset.sha256}.data").stat().st_size == x.nbytes + y.nbytes
    for name, array in (("x", x), ("y", y)):
        assert isinstance(local.columns[name], np.memmap) and not local.columns[name].flags.writeable
        np.testing.assert_array_equal(local.columns[name], array)
    with pytest.raises(NotFound):
        elsewhere.open(dataset.dataset_id, "bob")


def test_a_torn_cache_entry_is_found_and_refilled_and_corrupt_stored_bytes_are_data_loss(
    db: str, store: Store, manager: DatasetManager, tmp_path: Path
) -> None:
    x = np.arange(1000, dtype=np.float64).reshape(250, 4)
    dataset = put(manager, "torn", {"x": x})
    entry = tmp_path / "cache" / f"{dataset.sha256}.data"
    entry.write_bytes(bytes(x.nbytes))  # the right size, the wrong bytes: as a power cut may leave a file
    restarted = DatasetManager(store, tmp_path / "cache")
    np.testing.assert_array_equal(restarted.open(dataset.dataset_id).columns["x"], x)
    assert entry.read_bytes() == x.tobytes()

    zeros = bytes(x.nbytes)  # its one chunk row's length
    query(db, "UPDATE dataset_chunks SET data = ? WHERE dataset_id = ?", zeros, dataset.dataset_id)
    entry.unlink()
    with pytest.raises(DataLoss) as lost:
        DatasetManager(store, tmp_path / "cache").open(dataset.dataset_id)
    assert lost.value.reason == "DATASET_CORRUPT" and dataset.sha256 in lost.value.message
    assert not list((tmp_path / "cache").iterdir()), "the refill's temporary file is removed"


def test_chunks_of_later_columns_may_come_first(manager: DatasetManager) -> None:
    x = np.arange(40, dtype=np.int32).reshape(10, 4)
    y = np.linspace(0, 1, 30).reshape(10, 3)
    flag = np.arange(10) % 2 == 0
    header = header_of("interleaved", {"x": x, "y": y, "flag": flag})
    with manager.upload(header) as upload:
        upload.append("flag", flag.tobytes()[:3])
        upload.append("y", y.tobytes()[:100])
        upload.append("x", x.tobytes()[:50])
        upload.append("flag", flag.tobytes()[3:])
        upload.append("y", y.tobytes()[100:])
        upload.append("x", x.tobytes()[50:])
        dataset = upload.finish()
    assert dataset.sha256 == hashlib.sha256(x.tobytes() + y.tobytes() + flag.tobytes()).hexdigest()
    local = manager.open(dataset.dataset_id)
    for name, array in (("x", x), ("y", y), ("flag", flag)):
        np.testing.assert_array_equal(local.columns[name], array)


def test_a_stream_that_stalls_mid_transaction_gives_the_store_back_and_is_stored_at_its_end(
    store: Store, manager: DatasetManager
) -> None:
    manager.store_bytes_per_second = 1.0  # so slow that the transaction starts as soon as it may
    x = np.random.default_rng(2).standard_normal(6 * MIB).astype(np.float32)  # 24 MiB
    raw = x.tobytes()
    with manager.upload(header_of("stall", {"x": x})) as upload:
        for start in range(0, 16 * MIB, MIB):
            upload.append("x", raw[start : start + MIB])
        assert upload._writer is not None
        time.sleep(STALL_SECONDS * 3)
        assert store.list_datasets("", 0, 10) == [], "the store answers again once the transaction gave up"
        assert isinstance(upload._written, StoreWriteStopped)
        for start in range(16 * MIB, len(raw), MIB):
            upload.append("x", raw[start : start + MIB])
        dataset = upload.finish()
    assert dataset.sha256 == hashlib.sha256(raw).hexdigest()
    np.testing.assert_array_equal(manager.open(dataset.dataset_id).columns["x"], x)


def test_a_transaction_started_during_the_stream_commits_with_it_or_rolls_back_with_it(
    db: str, manager: DatasetManager, tmp_path: Path
) -> None:
    manager.store_bytes_per_second = 1.0
    x = np.arange(5 * MIB, dtype=np.float64)  # 40 MiB
    raw = x.tobytes()
    with pytest.raises(RuntimeError), manager.upload(header_of("failing", {"x": x})) as upload:
        for start in range(0, 24 * MIB, MIB):
            upload.append("x", raw[start : start + MIB])
        assert upload._writer is not None
        raise RuntimeError("the stream broke")
    assert not upload._writer.is_alive() and isinstance(upload._written, StoreWriteStopped)
    assert manager.store.list_datasets("", 0, 10) == [] and not list((tmp_path / "cache").iterdir())

    dataset = put(manager, "overlapped", {"x": x})
    assert dataset.sha256 == hashlib.sha256(raw).hexdigest() and dataset.size_bytes == x.nbytes
    assert [d.dataset_id for d in manager.store.list_datasets("", 0, 10)] == [dataset.dataset_id]
    rows = query(db, "SELECT length(data) FROM dataset_chunks ORDER BY chunk_index")
    assert [length for (length,) in rows] == [4 * MIB] * 10


def test_empty_datasets_and_columns(manager: DatasetManager) -> None:
    none = put(manager, "none", {"x": np.zeros((0, 3), np.float32), "y": np.zeros((0,), np.int64)})
    assert none.size_bytes == 0 and none.sha256 == hashlib.sha256(b"").hexdigest()
    local = manager.open(none.dataset_id)
    assert local.num_examples == 0 and local.columns["x"].shape == (0, 3)
    hollow = put(manager, "hollow", {"x": np.zeros((5, 0)), "y": np.ones((5, 1), bool)})
    local = manager.open(hollow.dataset_id)
    assert local.columns["x"].shape == (5, 0) and local.columns["y"].all()


def test_a_restart_removes_leftovers_and_entries_of_deleted_datasets(
    store: Store, manager: DatasetManager, tmp_path: Path
) -> None:
    kept = put(manager, "kept", {"x": np.ones((4, 4))})
    gone = put(manager, "gone", {"x": np.zeros((4, 4))})
    cache = tmp_path / "cache"
    store.delete_dataset(gone.dataset_id)  # as if the server died before removing its entry
    (cache / "upload-0123.part").write_bytes(b"half an upload")
    (cache / "notes.txt").write_text("not ours")
    DatasetManager(store, cache)
    assert sorted(path.name for path in cache.iterdir()) == [f"{kept.sha256}.data", "notes.txt"]


def test_the_upload_header_is_checked_before_anything_is_written(manager: DatasetManager, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as refused:
        manager.upload(pb.DatasetHeader(name="x" * 300, columns=[pb.DatasetColumn(name="c", dtype=1)]))
    assert refused.value.reason == "NAME_TOO_LONG"
    with pytest.raises(InvalidArgument) as refused:
        manager.upload(pb.DatasetHeader(name="deep", columns=[pb.DatasetColumn(name="c", dtype=1, shape=[1] * 64)]))
    assert refused.value.reason == "BAD_SHAPE"
    assert not list((tmp_path / "cache").iterdir())
