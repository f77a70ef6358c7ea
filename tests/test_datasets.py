"""DatasetService end to end: real server processes over 127.0.0.1, their databases and cache directories,
on both backends (a SQLite file, then PostgreSQL).

What a test checks on the server's side it reads from the server's own database and files: the chunk
rows in its database (a connection of the test's own), the entries and leftovers in its cache
directory, and the arrays a DatasetManager of the test's own maps after filling its cache from that
database.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import chainrule.client as cr
from chainrule.client.errors import from_rpc_error
from chainrule.server.datasets import DatasetManager
from chainrule.server.store import open_store
from chainrule.v1 import dataset_service_pb2 as pb
from chainrule.v1 import dataset_service_pb2_grpc, tensor_pb2
from tests.database import dataset_cache, query
from tests.server_process import ServerProcess

pytestmark = pytest.mark.both_backends

MIB = 1 << 20
ALICE, BOB, CAROL = "alice-dataset-token", "bob-dataset-token", "carol-dataset-token"
Messages = Iterable[pb.UploadDatasetRequest]


def header(name: str, num_examples: int, **columns: tuple[int, tuple[int, ...]]) -> pb.UploadDatasetRequest:
    declared = [pb.DatasetColumn(name=c, dtype=dtype, shape=shape) for c, (dtype, shape) in columns.items()]
    return pb.UploadDatasetRequest(header=pb.DatasetHeader(name=name, columns=declared, num_examples=num_examples))


def chunk(column: str, data: bytes) -> pb.UploadDatasetRequest:
    return pb.UploadDatasetRequest(chunk=pb.DatasetChunk(column=column, data=data))


def upload(server: ServerProcess, messages: Messages, token: str | None = None) -> pb.Dataset:
    stub = dataset_service_pb2_grpc.DatasetServiceStub(server.channel())
    metadata = [("authorization", f"Bearer {token}")] if token else None
    try:
        return stub.UploadDataset(iter(messages), timeout=60, metadata=metadata)
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None


def refused(server: ServerProcess, messages: Messages) -> cr.ChainruleError:
    with pytest.raises(cr.ChainruleError) as raised:
        upload(server, messages)
    return raised.value


def cache_dir(server: ServerProcess) -> Path:
    return dataset_cache(server.db)


def partials(server: ServerProcess) -> list[Path]:
    return sorted(cache_dir(server).glob("*.part"))


def stored(server: ServerProcess) -> tuple[int, int]:
    """(datasets, chunk rows) in the server's database, read as another process would."""
    [(datasets, rows)] = query(
        server.db, "SELECT (SELECT COUNT(*) FROM datasets), (SELECT COUNT(*) FROM dataset_chunks)"
    )
    return datasets, rows


def stored_columns(server: ServerProcess, dataset_id: str) -> list[bytes]:
    """Each column's bytes, joined from the chunk rows in the server's database."""
    rows = query(
        server.db,
        "SELECT column_index, data FROM dataset_chunks WHERE dataset_id = ? ORDER BY column_index, chunk_index",
        dataset_id,
    )
    columns: dict[int, list[bytes]] = {}
    for index, data in rows:
        columns.setdefault(index, []).append(data)
    return [b"".join(columns[index]) for index in sorted(columns)]


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def assert_nothing_left(server: ServerProcess, before: tuple[int, int]) -> None:
    """No rows beyond those there before, and no temporary files, once the server has cleaned up."""
    wait_until(lambda: not partials(server), "the upload's temporary file is removed")
    assert stored(server) == before


@pytest.fixture(scope="module")
def limited(new_db: Callable[[], str]) -> Iterator[ServerProcess]:
    """2 MiB datasets and 1 MiB messages at most."""
    args = ["--max-dataset-mb", "2", "--max-message-mb", "1"]
    process = ServerProcess(new_db(), args).start()
    yield process
    process.kill()


@pytest.fixture(scope="module")
def tenants(new_db: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tokens = tmp_path_factory.mktemp("tenants") / "tokens"
    tokens.write_text(f"{ALICE} alice\n{BOB} bob\n{CAROL} carol\n")
    process = ServerProcess(new_db(), ["--auth-tokens", str(tokens)]).start()
    yield process
    process.kill()


# ------------------------------------------------------------ round trips
def test_every_dtype_round_trips_through_the_store_cache_and_memory_map(server: ServerProcess, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    columns = {
        "f32": rng.standard_normal((37, 3, 4)).astype(np.float32),
        "f64": rng.standard_normal((37, 2, 1, 5)),
        "i32": rng.integers(-(2**31), 2**31, (37, 7), dtype=np.int32),
        "i64": rng.integers(-(2**63), 2**63 - 1, (37,), dtype=np.int64),
        "flag": rng.random((37, 2, 3)) < 0.5,
        "nothing": np.zeros((37, 0, 2), np.float32),
    }
    with cr.Client(server.address) as client:
        info = client.upload_dataset("every-dtype", columns)
        assert client.get_dataset(info.dataset_id) == info
    everything = b"".join(array.tobytes() for array in columns.values())
    assert info.name == "every-dtype" and info.num_examples == 37
    assert info.size_bytes == len(everything) == sum(array.nbytes for array in columns.values())
    assert info.sha256 == hashlib.sha256(everything).hexdigest()
    assert [(c.name, c.dtype, c.shape) for c in info.columns] == [
        (name, array.dtype.name, array.shape[1:]) for name, array in columns.items()
    ]
    assert info.create_time is not None

    assert stored_columns(server, info.dataset_id) == [a.tobytes() for a in columns.values() if a.nbytes]
    assert (cache_dir(server) / f"{info.sha256}.data").read_bytes() == everything
    store = open_store(str(server.db))
    local = DatasetManager(store, tmp_path / "cache").open(info.dataset_id)
    store.close()
    assert local.num_examples == 37 and local.sha256 == info.sha256
    for name, array in columns.items():
        mapped = local.columns[name]
        assert mapped.dtype == array.dtype and mapped.shape == array.shape and not mapped.flags.writeable
        np.testing.assert_array_equal(mapped, array)
    assert isinstance(local.columns["f32"], np.memmap)


def test_chunk_boundaries_inside_examples_and_interleaved_columns(server: ServerProcess) -> None:
    x = np.arange(50 * 3, dtype=np.float64).reshape(50, 3)  # 24-byte examples
    y = np.arange(50, dtype=np.int32) * -7
    xb, yb = x.tobytes(), y.tobytes()
    cuts = [0, 7, 20, 21, 500, 777, len(xb)]
    messages = [header("cut", 50, x=(tensor_pb2.DATA_TYPE_FLOAT64, (3,)), y=(tensor_pb2.DATA_TYPE_INT32, ()))]
    for index, (start, end) in enumerate(zip(cuts, cuts[1:], strict=False)):
        messages.append(chunk("x", xb[start:end]))
        messages.append(chunk("y", yb[index * 30 : (index + 1) * 30]))  # 4-byte examples cut at 30 bytes
    messages.append(chunk("y", yb[180:]))
    messages.append(chunk("x", b""))
    dataset = upload(server, messages)
    assert dataset.sha256 == hashlib.sha256(xb + yb).hexdigest()
    assert dataset.size_bytes == len(xb) + len(yb)
    assert stored_columns(server, dataset.dataset_id) == [xb, yb]


def test_list_pages_oldest_first_and_delete_removes_rows_and_the_unshared_cache_entry(tenants: ServerProcess) -> None:
    with cr.Client(tenants.address, token=CAROL) as carol:
        ids = [carol.upload_dataset(f"page-{i}", {"x": np.full((3, 2), i, np.int64)}).dataset_id for i in range(5)]
        twin = carol.upload_dataset("twin", {"y": np.full((3, 2), 4, np.int64)})  # the bytes of page-4
        stub = dataset_service_pb2_grpc.DatasetServiceStub(tenants.channel())
        metadata = [("authorization", f"Bearer {CAROL}")]
        pages, token = [], ""
        while True:
            response = stub.ListDatasets(pb.ListDatasetsRequest(page_size=2, page_token=token), metadata=metadata)
            pages.append([dataset.dataset_id for dataset in response.datasets])
            token = response.next_page_token
            if not token:
                break
        assert pages == [ids[:2], ids[2:4], [ids[4], twin.dataset_id]]
        assert [info.dataset_id for info in carol.list_datasets(page_size=4)] == [*ids, twin.dataset_id]
        for request, reason in (
            (pb.ListDatasetsRequest(page_token="bm90LWEtdG9rZW4="), "BAD_PAGE_TOKEN"),
            (pb.ListDatasetsRequest(page_size=-1), "INVALID"),
        ):
            with pytest.raises(grpc.RpcError) as raised:
                stub.ListDatasets(request, metadata=metadata)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert from_rpc_error(raised.value).reason == reason

        entry = cache_dir(tenants) / f"{twin.sha256}.data"
        carol.delete_dataset(ids[4])
        assert entry.exists(), "twin still has these bytes"
        carol.delete_dataset(twin.dataset_id)
        assert not entry.exists()
        for gone in (ids[4], twin.dataset_id):
            assert stored_columns(tenants, gone) == []
            with pytest.raises(cr.ChainruleError) as raised:
                carol.get_dataset(gone)
            assert raised.value.code == grpc.StatusCode.NOT_FOUND and raised.value.reason == "DATASET_NOT_FOUND"
        with pytest.raises(cr.ChainruleError) as raised:
            carol.delete_dataset(twin.dataset_id)
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
        assert [info.dataset_id for info in carol.list_datasets()] == ids[:4]


def test_tenants_neither_see_nor_find_each_others_datasets(tenants: ServerProcess) -> None:
    with cr.Client(tenants.address, token=ALICE) as alice, cr.Client(tenants.address, token=BOB) as bob:
        mine = alice.upload_dataset("alice-data", {"x": np.ones((4, 2), np.float32)})
        assert mine.dataset_id in [info.dataset_id for info in alice.list_datasets()]
        assert mine.dataset_id not in [info.dataset_id for info in bob.list_datasets()]
        missing = "0" * 32
        for dataset_id in (mine.dataset_id, missing):
            for call in (bob.get_dataset, bob.delete_dataset):
                with pytest.raises(cr.ChainruleError) as raised:
                    call(dataset_id)
                assert raised.value.code == grpc.StatusCode.NOT_FOUND
                assert raised.value.message == f"dataset '{dataset_id}' not found"
        assert alice.get_dataset(mine.dataset_id) == mine


# ------------------------------------------------------------ what is refused, and leaves nothing
F32 = tensor_pb2.DATA_TYPE_FLOAT32
BAD_UPLOADS = {
    "no header": ([chunk("x", b"\0" * 8)], "HEADER_FIRST"),
    "an empty stream": ([], "HEADER_FIRST"),
    "a header twice": ([header("twice", 2, x=(F32, ())), header("twice", 2, x=(F32, ()))], "HEADER_FIRST"),
    "a duplicate column": (
        [
            pb.UploadDatasetRequest(
                header=pb.DatasetHeader(name="dup", num_examples=2, columns=[pb.DatasetColumn(name="x", dtype=F32)] * 2)
            )
        ],
        "DUPLICATE_COLUMN",
    ),
    "an unknown column": ([header("unknown", 2, x=(F32, ())), chunk("z", b"\0" * 8)], "UNKNOWN_COLUMN"),
    "an unknown column with a long unprintable name": (
        [header("unknown", 2, x=(F32, ())), chunk("\a" * 5000, b"\0" * 8)],
        "UNKNOWN_COLUMN",
    ),
    "an unspecified dtype": ([header("dtype0", 2, x=(tensor_pb2.DATA_TYPE_UNSPECIFIED, ()))], "BAD_DTYPE"),
    "an unknown dtype": ([header("dtype99", 2, x=(99, ()))], "BAD_DTYPE"),  # type: ignore[dict-item]
    "a negative dimension": ([header("neg", 2, x=(F32, (3, -1)))], "BAD_SHAPE"),
    "negative num_examples": ([header("negative", -1, x=(F32, ()))], "BAD_NUM_EXAMPLES"),
    "no name": ([header("", 2, x=(F32, ()))], "BAD_NAME"),
    "an unnamed column": ([header("unnamed", 2, **{"": (F32, ())})], "BAD_NAME"),
    "a control character": ([header("bell\a", 2, x=(F32, ()))], "BAD_NAME"),
    "a name too long": ([header("n" * 300, 2, x=(F32, ()))], "NAME_TOO_LONG"),
    "no columns": ([header("empty", 2)], "NO_COLUMNS"),
    "too many bytes": ([header("long", 2, x=(F32, ())), chunk("x", b"\0" * 12)], "COLUMN_TOO_LONG"),
    "too few bytes": ([header("short", 2, x=(F32, ())), chunk("x", b"\0" * 7)], "INCOMPLETE_COLUMN"),
    "a column never sent": (
        [header("unsent", 2, x=(F32, ()), y=(F32, ())), chunk("x", b"\0" * 8)],
        "INCOMPLETE_COLUMN",
    ),
    "bool bytes other than 0 and 1": (
        [header("bool", 2, b=(tensor_pb2.DATA_TYPE_BOOL, ())), chunk("b", b"\x01\x02")],
        "BAD_BOOL",
    ),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_a_bad_header_or_byte_count_is_invalid_argument_and_stores_nothing(server: ServerProcess, case: str) -> None:
    messages, reason = BAD_UPLOADS[case]
    before = stored(server)
    error = refused(server, messages)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.reason == reason, error
    assert "Traceback" not in error.message and "\a" not in error.message and len(error.message) < 1000
    assert_nothing_left(server, before)


def blocking_messages(first: Messages, release: threading.Event) -> Iterator[pb.UploadDatasetRequest]:
    """`first`, then nothing until `release` is set (or 30 s pass), then the end of the stream."""
    yield from first
    release.wait(30)


@pytest.mark.parametrize("megabytes", [1, 40], ids=["stored after the stream", "stored during the stream"])
def test_a_cancelled_upload_leaves_nothing(server: ServerProcess, megabytes: int) -> None:
    """40 MiB from a loopback client (fast) usually starts its store transaction mid-stream, which the
    cancel then rolls back; test_datasets_engine checks that path for certain."""
    size, part = megabytes * MIB, megabytes * MIB * 3 // 5
    data = bytes(range(256)) * (size // 256)
    sent = [chunk("x", data[start : min(start + MIB, part)]) for start in range(0, part, MIB)]
    before = stored(server)
    release = threading.Event()
    stub = dataset_service_pb2_grpc.DatasetServiceStub(server.channel())
    call = stub.UploadDataset.future(
        blocking_messages([header("cancelled", size // 4, x=(F32, ())), *sent], release), timeout=60
    )
    wait_until(lambda: bool(partials(server)), "the server spools the upload")
    time.sleep(0.3)
    call.cancel()
    release.set()
    assert call.cancelled()
    assert_nothing_left(server, before)
    with cr.Client(server.address) as client:  # the store is free again
        info = client.upload_dataset("after-cancel", {"x": np.ones(4)})
        client.delete_dataset(info.dataset_id)
    wait_until(lambda: any("UploadDataset CANCELLED" in line for line in server.log), "the server logs CANCELLED")
    assert not any("Traceback" in line for line in server.log)


@pytest.mark.parametrize("megabytes", [1, 40], ids=["stored after the stream", "stored during the stream"])
def test_a_stream_that_ends_early_leaves_nothing(server: ServerProcess, megabytes: int) -> None:
    size, part = megabytes * MIB, megabytes * MIB * 3 // 5
    before = stored(server)
    messages = [header("early", size // 4, x=(F32, ()))]
    messages += [chunk("x", bytes(min(MIB, part - start))) for start in range(0, part, MIB)]
    error = refused(server, messages)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INCOMPLETE_COLUMN"
    assert f"of its {size:,} bytes" in error.message
    assert_nothing_left(server, before)


def test_a_dataset_over_the_limit_is_refused_at_its_header(limited: ServerProcess) -> None:
    before = stored(limited)
    release = threading.Event()
    messages = blocking_messages([header("huge", 3 * MIB // 4, x=(F32, ()))], release)
    try:
        error = refused(limited, messages)  # answered while the client still holds the stream open
    finally:
        release.set()
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "DATASET_TOO_LARGE"
    assert "--max-dataset-mb" in error.message and f"{3 * MIB:,} bytes" in error.message
    assert_nothing_left(limited, before)


def test_a_chunk_over_the_message_limit_is_refused(limited: ServerProcess) -> None:
    before = stored(limited)
    size = 3 * MIB // 2
    error = refused(limited, [header("big-chunk", size // 4, x=(F32, ())), chunk("x", bytes(size))])
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "CHUNK_TOO_LARGE"
    assert "--max-message-mb" in error.message
    assert_nothing_left(limited, before)
    with cr.Client(limited.address) as client:  # exactly the limit is fine, in 1 MiB chunks
        info = client.upload_dataset("at-the-limit", {"x": np.zeros(2 * MIB // 8)})
        assert info.size_bytes == 2 * MIB


def test_the_service_is_in_health_and_reflection_and_its_calls_logged(server: ServerProcess) -> None:
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service="chainrule.v1.DatasetService"), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = reflection.ServerReflectionInfo(iter([request]), timeout=10)
    listed = [service.name for response in responses for service in response.list_services_response.service]
    assert "chainrule.v1.DatasetService" in listed
    with cr.Client(server.address) as client:
        client.list_datasets()
    wait_until(lambda: any("ListDatasets OK" in line for line in server.log), "the call is logged")


# ------------------------------------------------------------ durability, the command line
def test_a_dataset_is_durable_when_upload_returns(fresh_server: ServerProcess, tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((1000, 8)).astype(np.float32)
    with cr.Client(fresh_server.address) as client:
        info = client.upload_dataset("durable", {"x": x})
    fresh_server.kill()
    leftover = cache_dir(fresh_server) / "upload-0123.part"  # as a server killed mid-upload leaves it
    leftover.write_bytes(b"partial")
    fresh_server.start()
    assert not leftover.exists()
    with cr.Client(fresh_server.address) as client:
        assert client.get_dataset(info.dataset_id) == info
    store = open_store(str(fresh_server.db))
    local = DatasetManager(store, tmp_path / "cache").open(info.dataset_id)
    store.close()
    np.testing.assert_array_equal(local.columns["x"], x)


def test_chainrule_upload_dataset_and_datasets(server: ServerProcess, tmp_path: Path) -> None:
    archive = tmp_path / "digits.npz"
    images, labels = np.arange(60, dtype=np.float32).reshape(10, 2, 3), np.arange(10)
    np.savez(archive, images=images, labels=labels)

    def chainrule(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "chainrule.server.cli", *args, "--address", server.address]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    uploaded = chainrule("upload-dataset", "cli-digits", str(archive))
    assert uploaded.returncode == 0, uploaded.stderr
    first, second, third = uploaded.stdout.splitlines()
    dataset_id = first.split()[1]
    assert first == f"dataset {dataset_id}  cli-digits"
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    assert second == f"10 examples, {images.nbytes + labels.nbytes:,} bytes, sha256 {digest}"
    assert third == "columns: images:float32[2,3] labels:int64[]"

    listed = chainrule("datasets")
    assert listed.returncode == 0, listed.stderr
    header_line, *rows = listed.stdout.splitlines()
    assert header_line.split() == ["DATASET_ID", "NAME", "EXAMPLES", "BYTES", "COLUMNS", "CREATED"]
    row = next(row.split() for row in rows if row.startswith(dataset_id))
    assert row[1:6] == ["cli-digits", "10", str(images.nbytes + labels.nbytes), "images:float32[2,3]", "labels:int64[]"]

    not_npz = tmp_path / "plain.npy"
    np.save(not_npz, images)
    failed = chainrule("upload-dataset", "bad", str(not_npz))
    assert failed.returncode == 1 and failed.stderr.startswith("chainrule: ") and "Traceback" not in failed.stderr
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, x=np.ones(3), y=np.ones(4))
    failed = chainrule("upload-dataset", "uneven", str(uneven))
    assert failed.returncode == 1 and "same number of examples" in failed.stderr


def test_the_client_refuses_what_it_cannot_upload(server: ServerProcess) -> None:
    with cr.Client(server.address) as client:
        for columns, words in (
            ({}, "at least one column"),
            ({"x": np.float32(1)}, "scalar"),
            ({"x": np.ones(3), "y": np.ones(2)}, "same number of examples"),
            ({"x": np.ones(3, np.float16)}, "float16"),
        ):
            with pytest.raises(ValueError, match=words):
                client.upload_dataset("refused", columns)
    big_endian = np.arange(6, dtype=">f8").reshape(3, 2)
    with cr.Client(server.address) as client:
        info = client.upload_dataset("big-endian", {"x": big_endian})
    assert info.sha256 == hashlib.sha256(big_endian.astype("<f8").tobytes()).hexdigest()
