"""Datasets: uploaded once in chunks, stored whole in one transaction, read by jobs from a local
memory-mapped cache. No gRPC here.

An upload writes each chunk straight to its column's place in one temporary file inside the
cache directory and hashes it on the way, so a dataset of any size passes through memory one
chunk at a time. The store gets the record and the bytes (in rows of DATASET_CHUNK_BYTES) in one
transaction, which for a large upload from a fast client begins while the bytes still arrive (see
DatasetUpload), and once it commits the temporary file becomes the cache entry.

The cache is content-addressed: `<sha256>.data` holds every column's bytes concatenated in
column order, exactly the bytes `sha256` hashes, and `open` maps each column out of it
read-only. Entries are verified against their hash once per process before use (a file left
by a crash could be torn), refilled from the store when missing or wrong, and removed when no
stored dataset has their hash any more.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

from chainrule import tensors
from chainrule.server.errors import (
    ChainruleError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    check_name,
    shown,
)
from chainrule.server.store.base import DATASET_CHUNK_BYTES, ColumnSpec, Store, StoredDataset
from chainrule.v1 import dataset_service_pb2, tensor_pb2

log = logging.getLogger("chainrule.server.datasets")
DEFAULT_MAX_DATASET_MB = 4096
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_EXAMPLE_DIMENSIONS = 63
"""numpy arrays have at most 64 axes, and a column's array adds the example axis."""
READ_BYTES = 4 << 20
"""Bytes read at a time when a cached file is hashed again."""
ENTRY_SUFFIX = ".data"
PARTIAL_SUFFIX = ".part"
PAGE_TOKEN_PREFIX = "datasets-after"
OVERLAP_MIN_BYTES = 16 << 20
"""Smaller uploads are stored after their stream ends: overlapping would save too little to matter."""
STORE_BYTES_PER_SECOND = 300e6
"""About how fast the store takes a dataset's bytes (SQLite with its fsyncs, on a loaded machine):
how early an upload's transaction may start to end with its stream."""
STALL_SECONDS = 0.25
"""How long an upload's early transaction waits for the stream's next bytes before it gives up."""


@dataclass(frozen=True)
class ColumnLayout:
    """Where a column's bytes sit in the cache file (and in an upload's temporary file)."""

    spec: ColumnSpec
    dtype: np.dtype
    example_bytes: int
    offset: int
    size: int


def column_layouts(columns: tuple[ColumnSpec, ...], num_examples: int) -> list[ColumnLayout]:
    layouts = []
    offset = 0
    for spec in columns:
        dtype = tensors.WIRE_DTYPES[tensors.DTYPE_NAMES[spec.dtype]]
        example_bytes = int(np.prod(spec.shape, dtype=object)) * dtype.itemsize
        size = num_examples * example_bytes
        layouts.append(ColumnLayout(spec, dtype, example_bytes, offset, size))
        offset += size
    return layouts


@dataclass(frozen=True)
class LocalDataset:
    """A dataset as a job reads it: each column a read-only array of shape (num_examples, *example
    shape) mapped from the local cache, so reading a batch touches only the pages of its examples."""

    dataset_id: str
    sha256: str
    num_examples: int
    columns: dict[str, np.ndarray]


def never_in_use(dataset_id: str) -> bool:
    return False


class DatasetManager:
    """Uploads, the tenant-scoped reads and deletes of datasets, and the local cache jobs read from."""

    def __init__(
        self,
        store: Store,
        cache_dir: str | os.PathLike[str],
        *,
        max_dataset_bytes: int = DEFAULT_MAX_DATASET_MB << 20,
        max_chunk_bytes: int | None = None,
        max_name_length: int = 256,
    ) -> None:
        self.store = store
        self.cache_dir = Path(cache_dir)
        self.max_dataset_bytes = max_dataset_bytes
        self.max_chunk_bytes = max_chunk_bytes
        """--max-message-mb: the largest chunk an upload takes (gRPC itself receives a little more)."""
        self.max_name_length = max_name_length
        self.store_bytes_per_second = STORE_BYTES_PER_SECOND
        """STORE_BYTES_PER_SECOND; a test sets it low to start every large upload's transaction early."""
        self.in_use: Callable[[str], bool] = never_in_use
        """Whether a queued or running job uses the dataset; the jobs module sets it. Asked while
        holding `usage_lock`."""
        self.usage_lock = threading.Lock()
        """Held by delete from asking `in_use` to deleting; whoever queues a job holds it from checking
        the job's datasets to queueing it, so a delete never slips in between."""
        self._cache_lock = threading.Lock()
        self._fill_locks: dict[str, threading.Lock] = {}
        self._verified: set[str] = set()
        """Entries hashed (or written) by this process, so known whole."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._sweep()

    # ------------------------------------------------------------ upload
    def upload(self, header: dataset_service_pb2.DatasetHeader, tenant: str = "") -> DatasetUpload:
        """Check the header and start an upload; use it as a context manager, so that however the
        upload ends before `finish` returns, nothing of it is left."""
        columns = self._check_header(header)
        layouts = column_layouts(columns, header.num_examples)
        size = sum(layout.size for layout in layouts)
        if size > self.max_dataset_bytes:
            raise ResourceExhausted(
                f"dataset '{shown(header.name)}' would hold {size:,} bytes ({header.num_examples:,} examples), more "
                f"than the {self.max_dataset_bytes:,} bytes this server accepts (chainrule serve --max-dataset-mb); "
                "nothing was stored",
                reason="DATASET_TOO_LARGE",
                subject="header.num_examples",
            )
        return DatasetUpload(self, tenant, header.name, header.num_examples, layouts)

    def _check_header(self, header: dataset_service_pb2.DatasetHeader) -> tuple[ColumnSpec, ...]:
        if not header.name:
            raise InvalidArgument("header.name is empty; name the dataset", reason="BAD_NAME", subject="header.name")
        check_name(header.name, "header.name", self.max_name_length)
        if not header.columns:
            raise InvalidArgument(
                "header.columns is empty; a dataset needs at least one column",
                reason="NO_COLUMNS",
                subject="header.columns",
            )
        if header.num_examples < 0:
            raise InvalidArgument(
                f"header.num_examples is {header.num_examples}; it must not be negative",
                reason="BAD_NUM_EXAMPLES",
                subject="header.num_examples",
            )
        columns: dict[str, ColumnSpec] = {}
        for index, column in enumerate(header.columns):
            field = f"header.columns[{index}]"
            if not column.name:
                raise InvalidArgument(f"{field}.name is empty; name every column", reason="BAD_NAME", subject=field)
            check_name(column.name, f"{field}.name", self.max_name_length)
            name = shown(column.name)
            if column.name in columns:
                raise InvalidArgument(
                    f"column '{name}' is declared twice in header.columns", reason="DUPLICATE_COLUMN", subject=name
                )
            if column.dtype not in tensors.WIRE_DTYPES:
                known = column.dtype in tensor_pb2.DataType.values()
                label = tensor_pb2.DataType.Name(column.dtype) if known else str(column.dtype)
                raise InvalidArgument(
                    f"column '{name}' has dtype {label}; expected one of {', '.join(tensors.DTYPE_NAMES)}",
                    reason="BAD_DTYPE",
                    subject=name,
                )
            shape = tuple(column.shape)
            if any(dim < 0 for dim in shape):
                raise InvalidArgument(
                    f"column '{name}' has a negative dimension in its example shape {list(shape)}",
                    reason="BAD_SHAPE",
                    subject=name,
                )
            if len(shape) > MAX_EXAMPLE_DIMENSIONS:
                raise InvalidArgument(
                    f"column '{name}' has an example shape of {len(shape)} dimensions; at most "
                    f"{MAX_EXAMPLE_DIMENSIONS} are supported",
                    reason="BAD_SHAPE",
                    subject=name,
                )
            dtype_name = tensors.dtype_name(tensors.WIRE_DTYPES[column.dtype])
            columns[column.name] = ColumnSpec(column.name, dtype_name, shape)
        return tuple(columns.values())

    def _keep(self, partial: Path, stored: StoredDataset) -> None:
        """Make an upload's file, whole and hashed, the cache entry of the dataset just stored."""
        with self._cache_lock:
            try:
                os.replace(partial, self._entry(stored.sha256))
            except OSError as error:  # the dataset is stored; `open` fills the cache from the store instead
                log.warning("dataset %s stored, but not kept in the cache: %s", stored.dataset_id, error)
            else:
                self._verified.add(stored.sha256)

    # ------------------------------------------------------------ reads and deletes
    def get_dataset(self, dataset_id: str, tenant: str = "") -> StoredDataset:
        stored = self.store.get_dataset(dataset_id, tenant) if dataset_id else None
        if stored is None:
            raise _not_found(dataset_id)
        return stored

    def list_datasets(self, page_size: int, page_token: str, tenant: str = "") -> tuple[list[StoredDataset], str]:
        """One page of the tenant's datasets, oldest first, and the token of the next page ("" after the last)."""
        if page_size < 0:
            raise InvalidArgument(f"page_size is {page_size}; it must not be negative", subject="page_size")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        rows = self.store.list_datasets(tenant, _decode_page_token(page_token), limit + 1)
        page = rows[:limit]
        return page, _encode_page_token(page[-1].seq) if len(rows) > limit else ""

    def delete_dataset(self, dataset_id: str, tenant: str = "") -> None:
        stored = self.get_dataset(dataset_id, tenant)
        with self.usage_lock:
            if self.in_use(dataset_id):
                raise FailedPrecondition(
                    f"dataset '{shown(dataset_id)}' is used by a queued or running job; cancel the job or let it "
                    "end, then delete the dataset",
                    reason="DATASET_IN_USE",
                    subject=dataset_id,
                )
            if not self.store.delete_dataset(dataset_id):
                raise _not_found(dataset_id)
        with self._cache_lock:
            if stored.sha256 not in self.store.dataset_hashes():
                self._verified.discard(stored.sha256)
                self._entry(stored.sha256).unlink(missing_ok=True)

    # ------------------------------------------------------------ the local cache
    def open(self, dataset_id: str, tenant: str = "") -> LocalDataset:
        """The dataset's columns mapped read-only from the local cache, which is filled from the store
        first when it lacks the dataset (streamed to a file, never held in memory whole) and checked
        against the dataset's sha256."""
        stored = self.get_dataset(dataset_id, tenant)
        path = self._entry(stored.sha256)
        with self._cache_lock:
            fill_lock = self._fill_locks.setdefault(stored.sha256, threading.Lock())
        with fill_lock:
            if stored.sha256 not in self._verified:
                if not self._entry_is_whole(path, stored):
                    self._fill(stored, path)
                self._verified.add(stored.sha256)
            columns: dict[str, np.ndarray] = {}
            for layout in column_layouts(stored.columns, stored.num_examples):
                shape = (stored.num_examples, *layout.spec.shape)
                column: np.ndarray
                if layout.size:
                    column = np.memmap(path, dtype=layout.dtype, mode="r", offset=layout.offset, shape=shape)
                else:  # mmap cannot map nothing
                    column = np.zeros(shape, layout.dtype)
                    column.flags.writeable = False
                columns[layout.spec.name] = column
        return LocalDataset(stored.dataset_id, stored.sha256, stored.num_examples, columns)

    def _entry(self, sha256: str) -> Path:
        return self.cache_dir / f"{sha256}{ENTRY_SUFFIX}"

    def _partial(self, kind: str) -> tuple[Path, int]:
        """A new temporary file, open and locked for as long as this process has it open: servers on one
        machine and database share the cache, and a starting one sweeps only unlocked temporary files.
        A sweep may remove the file between its creation and its locking: then it is made again."""
        while True:
            path = self.cache_dir / f"{kind}-{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                return path, fd
            os.close(fd)

    def _entry_is_whole(self, path: Path, stored: StoredDataset) -> bool:
        """Whether a cache file this process did not write has the dataset's size and hash."""
        try:
            with path.open("rb") as file:
                if os.fstat(file.fileno()).st_size != stored.size_bytes:
                    return False
                digest = hashlib.sha256()
                while piece := file.read(READ_BYTES):
                    digest.update(piece)
        except FileNotFoundError:
            return False
        return digest.hexdigest() == stored.sha256

    def _fill(self, stored: StoredDataset, path: Path) -> None:
        """Stream the dataset's rows from the store into a temporary file, check it, then move it into place."""
        layouts = column_layouts(stored.columns, stored.num_examples)
        written = [0] * len(layouts)
        digest = hashlib.sha256()
        try:
            partial, fd = self._partial("fill")
        except OSError as error:
            raise _cache_error(self.cache_dir, error, "") from None
        try:
            with os.fdopen(fd, "wb") as file:
                for column, data in self.store.dataset_chunks(stored.dataset_id):
                    layout = layouts[column]
                    if written[column] + len(data) > layout.size:
                        break
                    _write_at(file.fileno(), data, layout.offset + written[column])
                    digest.update(data)
                    written[column] += len(data)
                name = shown(stored.dataset_id)
                if written != [layout.size for layout in layouts]:
                    if self.store.get_dataset(stored.dataset_id, stored.tenant) is None:
                        raise NotFound(f"dataset '{name}' was deleted", reason="DATASET_NOT_FOUND", subject=name)
                    raise DataLoss(
                        f"dataset '{name}': the store holds {sum(written):,} bytes of it where its record says "
                        f"{stored.size_bytes:,}",
                        reason="DATASET_CORRUPT",
                        subject=name,
                    )
                if digest.hexdigest() != stored.sha256:
                    raise DataLoss(
                        f"dataset '{name}': the bytes in the store hash to {digest.hexdigest()}, not to its sha256 "
                        f"{stored.sha256}",
                        reason="DATASET_CORRUPT",
                        subject=name,
                    )
                with self._cache_lock:
                    if stored.sha256 not in self.store.dataset_hashes():
                        raise NotFound(f"dataset '{name}' was deleted", reason="DATASET_NOT_FOUND", subject=name)
                    os.replace(partial, path)
        except OSError as error:
            raise _cache_error(self.cache_dir, error, "") from None
        finally:
            partial.unlink(missing_ok=True)

    def _sweep(self) -> None:
        """Remove what a process killed during an upload or a fill left, and entries of datasets since deleted.
        Servers on one machine and database share the cache: a temporary file another one is writing is
        locked (see _partial; the lock goes with its process) and spared, and the directory is listed
        before the wanted hashes are read, so that an entry kept for a dataset stored meanwhile is wanted."""
        paths = list(self.cache_dir.iterdir())
        wanted = self.store.dataset_hashes()
        for path in paths:
            if path.suffix == PARTIAL_SUFFIX:
                _remove_abandoned(path)
            elif path.suffix == ENTRY_SUFFIX and path.stem not in wanted:
                log.info("removing %s from the dataset cache", path.name)
                path.unlink(missing_ok=True)


class StoreWriteStopped(Exception):
    """Ends an upload's early store transaction, rolling it back: the stream failed, or went quiet."""


class DatasetUpload:
    """One upload in progress: `append` chunks, then `finish`. Leaving its `with` block any other
    way (an error, a cancelled stream, a stream that ended early) leaves nothing behind.

    Storing a dataset takes about as long as receiving it, so a large upload from a fast client
    opens its store transaction before the stream ends, on a thread of its own, when the rate the
    bytes come at says the rest will arrive within the time the store needs for the whole: the
    two then overlap, and the store's lock is held about as long as a transaction after the stream
    would hold it. A stream that goes quiet while the transaction waits for its bytes rolls it back
    (after STALL_SECONDS) so that the store is free again, and the dataset is stored after the
    stream's end instead.
    """

    def __init__(
        self, manager: DatasetManager, tenant: str, name: str, num_examples: int, layouts: list[ColumnLayout]
    ) -> None:
        self.manager = manager
        self.tenant = tenant
        self.name = name
        self.num_examples = num_examples
        self.layouts = layouts
        self.size = sum(layout.size for layout in layouts)
        self.dataset_id = uuid.uuid4().hex
        self._index = {layout.spec.name: index for index, layout in enumerate(layouts)}
        self._received = [0] * len(layouts)
        self._received_total = 0
        self._started = time.perf_counter()
        self._digest = hashlib.sha256()
        self._hashed_column = 0
        """Every column before this one is hashed whole, and this one up to what it received."""
        self._sha256 = ""
        """Set once the stream ended with every column whole."""
        self._progress = threading.Condition()
        """Notified by every chunk written, by the stream's end and by its failure."""
        self._failed = False
        self._writer: threading.Thread | None = None
        self._written: StoredDataset | BaseException | None = None
        try:
            self.path, self._fd = manager._partial("upload")
        except OSError as error:
            raise _cache_error(manager.cache_dir, error) from None
        try:
            if self.size:  # the room for every byte, claimed up front; and no block allocation as they arrive
                os.posix_fallocate(self._fd, 0, self.size)
        except OSError as error:
            os.close(self._fd)
            self.path.unlink(missing_ok=True)
            raise _cache_error(manager.cache_dir, error) from None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._writer is not None:
            with self._progress:
                self._failed = not self._sha256
                self._progress.notify_all()
            self._writer.join()
        os.close(self._fd)
        self.path.unlink(missing_ok=True)  # gone already when the cache keeps it

    def append(self, column: str, data: bytes) -> None:
        """Add `data` to the end of the column's bytes received so far."""
        index = self._index.get(column)
        if index is None:
            declared = ", ".join(f"'{shown(name)}'" for name in self._index)
            raise InvalidArgument(
                f"a chunk names column '{shown(column)}', which the header does not declare (it declares "
                f"{declared}); nothing was stored",
                reason="UNKNOWN_COLUMN",
                subject=shown(column),
            )
        layout = self.layouts[index]
        limit = self.manager.max_chunk_bytes
        if limit is not None and len(data) > limit:
            raise ResourceExhausted(
                f"a chunk of column '{shown(column)}' has {len(data):,} bytes, more than the {limit:,} of one message "
                "(chainrule serve --max-message-mb); send smaller chunks (the clients send 1 MiB); nothing was stored",
                reason="CHUNK_TOO_LARGE",
                subject=shown(column),
            )
        received = self._received[index]
        if received + len(data) > layout.size:
            raise InvalidArgument(
                f"column '{shown(column)}' got {received + len(data):,} bytes, more than its {layout.size:,} "
                f"({self._describe(layout)}); nothing was stored",
                reason="COLUMN_TOO_LONG",
                subject=shown(column),
            )
        if layout.dtype == np.bool_ and data and np.frombuffer(data, np.uint8).max() > 1:
            raise InvalidArgument(
                f"column '{shown(column)}' is bool but has bytes other than 0 and 1; nothing was stored",
                reason="BAD_BOOL",
                subject=shown(column),
            )
        try:
            _write_at(self._fd, data, layout.offset + received)
        except OSError as error:
            raise _cache_error(self.manager.cache_dir, error) from None
        with self._progress:
            self._received[index] = received + len(data)
            self._received_total += len(data)
            self._progress.notify_all()
        if index == self._hashed_column:
            self._digest.update(data)
            self._hash_ahead()
        if self._writer is None and self._store_now():
            self._writer = threading.Thread(target=self._write, name=f"store-{self.dataset_id}", daemon=True)
            self._writer.start()

    def _hash_ahead(self) -> None:
        """Move the hash on past every complete column, into what later columns already received
        (read back from the file: chunks of different columns may interleave)."""
        while self._hashed_column + 1 < len(self.layouts):
            layout = self.layouts[self._hashed_column]
            if self._received[self._hashed_column] < layout.size:
                return
            self._hashed_column += 1
            following = self.layouts[self._hashed_column]
            for start in range(0, self._received[self._hashed_column], READ_BYTES):
                length = min(READ_BYTES, self._received[self._hashed_column] - start)
                self._digest.update(os.pread(self._fd, length, following.offset + start))

    def _store_now(self) -> bool:
        """Whether the rest of the stream, at the rate it has come so far, arrives within the time the
        store takes for the whole dataset."""
        received = self._received_total
        if self.size < OVERLAP_MIN_BYTES or received < DATASET_CHUNK_BYTES:
            return False
        rate = received / max(time.perf_counter() - self._started, 1e-9)
        return (self.size - received) / rate <= self.size / self.manager.store_bytes_per_second

    def _write(self) -> None:
        """The early store transaction, on its own thread; `finish` reads its outcome."""
        try:
            self._written = self._insert(self._arriving_rows())
        except BaseException as error:  # StoreWriteStopped, or the store's own refusal
            self._written = error

    def _insert(self, rows: Iterator[tuple[int, bytes]]) -> StoredDataset:
        return self.manager.store.insert_dataset(
            self.dataset_id,
            self.tenant,
            self.name,
            tuple(layout.spec for layout in self.layouts),
            self.num_examples,
            self.size,
            rows,
            lambda: self._sha256,
        )

    def _arriving_rows(self) -> Iterator[tuple[int, bytes]]:
        """The chunk rows as their bytes arrive, then nothing more once the stream has ended whole;
        StoreWriteStopped when the stream fails or sends nothing for STALL_SECONDS."""
        inserted = [0] * len(self.layouts)
        while True:
            with self._progress:
                while True:
                    ready = [
                        index
                        for index, layout in enumerate(self.layouts)
                        if inserted[index] < layout.size
                        and self._received[index] >= min(inserted[index] + DATASET_CHUNK_BYTES, layout.size)
                    ]
                    if ready or self._sha256 or self._failed:
                        break
                    if not self._progress.wait(STALL_SECONDS):
                        raise StoreWriteStopped(f"the stream sent nothing for {STALL_SECONDS:g} s")
                if self._failed:
                    raise StoreWriteStopped("the stream failed")
            if not ready:
                return
            for index in ready:
                layout = self.layouts[index]
                length = min(DATASET_CHUNK_BYTES, layout.size - inserted[index])
                yield index, os.pread(self._fd, length, layout.offset + inserted[index])
                inserted[index] += length

    @property
    def complete(self) -> bool:
        """Whether every column has all its bytes."""
        return all(received == layout.size for layout, received in zip(self.layouts, self._received, strict=True))

    def finish(self) -> StoredDataset:
        """Store the dataset, durably, once every column is complete."""
        for layout, received in zip(self.layouts, self._received, strict=True):
            if received != layout.size:
                raise InvalidArgument(
                    f"the stream ended with column '{shown(layout.spec.name)}' at {received:,} of its "
                    f"{layout.size:,} bytes ({self._describe(layout)}); nothing was stored",
                    reason="INCOMPLETE_COLUMN",
                    subject=shown(layout.spec.name),
                )
        with self._progress:
            self._sha256 = self._digest.hexdigest()
            self._progress.notify_all()
        stored: StoredDataset | BaseException | None = None
        if self._writer is not None:
            self._writer.join()
            stored = self._written
            if isinstance(stored, BaseException) and not isinstance(stored, StoreWriteStopped):
                raise stored
        if not isinstance(stored, StoredDataset):
            stored = self._insert(self.rows())
        self.manager._keep(self.path, stored)
        return stored

    def rows(self) -> Iterator[tuple[int, bytes]]:
        """The dataset's chunk rows, read back from the file one at a time as the store inserts them."""
        for index, layout in enumerate(self.layouts):
            for start in range(0, layout.size, DATASET_CHUNK_BYTES):
                yield index, os.pread(self._fd, min(DATASET_CHUNK_BYTES, layout.size - start), layout.offset + start)

    def _describe(self, layout: ColumnLayout) -> str:
        spec = layout.spec
        return f"{self.num_examples:,} examples of {spec.dtype} {list(spec.shape)}, {layout.example_bytes:,} bytes each"


def _not_found(dataset_id: str) -> NotFound:
    return NotFound(f"dataset '{shown(dataset_id)}' not found", reason="DATASET_NOT_FOUND", subject=dataset_id)


def _remove_abandoned(path: Path) -> None:
    """Remove a temporary file of the cache unless a process holds its lock (see DatasetManager._partial)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another server's upload or fill
        log.info("removing %s from the dataset cache", path.name)
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _cache_error(cache_dir: Path, error: OSError, outcome: str = "; nothing was stored") -> ChainruleError:
    """RESOURCE_EXHAUSTED for a full disk, UNAVAILABLE for any other refusal."""
    message = f"the dataset cache {cache_dir} could not be written: {error.strerror or error}{outcome}"
    if error.errno == errno.ENOSPC:
        return ResourceExhausted(message, reason="CACHE_FULL")
    return Unavailable(message, reason="CACHE_UNAVAILABLE")


def _encode_page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{PAGE_TOKEN_PREFIX}:{seq}".encode()).decode()


def _decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        prefix, seq = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        if prefix == PAGE_TOKEN_PREFIX and seq.isdigit() and int(seq) < 2**63:  # SQLite integers are 64-bit
            return int(seq)
    except (ValueError, UnicodeError):
        pass
    raise InvalidArgument("page_token is not one this server issued", reason="BAD_PAGE_TOKEN", subject="page_token")
