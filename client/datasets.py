"""Datasets on the server: what the client reports about one, and the UploadDataset stream of a set of arrays."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from chainrule import tensors
from chainrule.v1 import dataset_service_pb2 as pb

CHUNK_BYTES = 1 << 20
"""Bytes per DatasetChunk: small messages keep the stream flowing and fit any server's message limit."""


@dataclass(frozen=True)
class DatasetColumn:
    """One column: its dtype name ("float32", "int64", ...) and the shape of one example."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset stored on the server (chainrule.v1.Dataset).

    `sha256` is the hex SHA-256 of every column's little-endian bytes concatenated in column
    order, so `hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()` checks an upload.
    """

    dataset_id: str
    name: str
    columns: tuple[DatasetColumn, ...]
    num_examples: int
    size_bytes: int
    sha256: str
    create_time: datetime | None

    @classmethod
    def from_proto(cls, message: pb.Dataset) -> DatasetInfo:
        return cls(
            dataset_id=message.dataset_id,
            name=message.name,
            columns=tuple(
                DatasetColumn(c.name, tensors.dtype_name(tensors.WIRE_DTYPES[c.dtype]), tuple(c.shape))
                for c in message.columns
            ),
            num_examples=message.num_examples,
            size_bytes=message.size_bytes,
            sha256=message.sha256,
            create_time=message.create_time.ToDatetime(UTC) if message.HasField("create_time") else None,
        )


def upload_arrays(columns: Mapping[str, npt.ArrayLike]) -> dict[str, np.ndarray]:
    """The columns as C-ordered little-endian arrays of wire dtypes (copied only when they are not
    already), checked to share their first dimension, the number of examples."""
    if not columns:
        raise ValueError("a dataset needs at least one column")
    arrays: dict[str, np.ndarray] = {}
    for name, value in columns.items():
        array = np.asarray(value)
        if array.ndim == 0:
            raise ValueError(f"column '{name}' is a scalar; every column needs a first axis, one entry per example")
        code = tensors.wire_dtype(array.dtype)
        arrays[name] = np.ascontiguousarray(array, dtype=tensors.WIRE_DTYPES[code])
    counts = {name: len(array) for name, array in arrays.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"'{name}' {count:,}" for name, count in counts.items())
        raise ValueError(f"every column needs the same number of examples (first dimension); got {listed}")
    return arrays


def upload_requests(
    name: str, arrays: Mapping[str, np.ndarray], sent: Callable[[int], object] = lambda size: None
) -> Iterator[bytes]:
    """The serialized UploadDatasetRequests: the header, then every column's bytes in CHUNK_BYTES
    chunks, column after column; `sent` is told each chunk's size as gRPC takes it."""
    header = pb.DatasetHeader(
        name=name,
        columns=[
            pb.DatasetColumn(name=column, dtype=tensors.wire_dtype(array.dtype), shape=array.shape[1:])
            for column, array in arrays.items()
        ],
        num_examples=len(next(iter(arrays.values()))),
    )
    yield pb.UploadDatasetRequest(header=header).SerializeToString()
    for column, array in arrays.items():
        raw = array.reshape(-1).view(np.uint8).data
        for start in range(0, len(raw), CHUNK_BYTES):
            data = raw[start : start + CHUNK_BYTES]
            yield chunk_request(column, data)
            sent(len(data))


def chunk_request(column: str, data: memoryview) -> bytes:
    """The serialized UploadDatasetRequest of one DatasetChunk, written around `data` in one copy
    (building the message and serializing it copies a chunk three times, a tenth of a second per
    256 MiB). Protobuf's canonical encoding: fields in number order, lengths as varints."""
    name = column.encode()
    head = _length_delimited(COLUMN_FIELD, len(name)) + name + _length_delimited(DATA_FIELD, len(data))
    return b"".join((_length_delimited(CHUNK_FIELD, len(head) + len(data)), head, data))


CHUNK_FIELD = pb.UploadDatasetRequest.DESCRIPTOR.fields_by_name["chunk"].number
COLUMN_FIELD = pb.DatasetChunk.DESCRIPTOR.fields_by_name["column"].number
DATA_FIELD = pb.DatasetChunk.DESCRIPTOR.fields_by_name["data"].number
UPLOAD_METHOD = f"/{pb.DESCRIPTOR.services_by_name['DatasetService'].full_name}/UploadDataset"


def _length_delimited(field_number: int, length: int) -> bytes:
    """The tag (wire type 2) and varint length of a bytes, string or message field."""
    encoded = bytearray()
    for value in (field_number << 3 | 2, length):
        while value > 0x7F:
            encoded.append(value & 0x7F | 0x80)
            value >>= 7
        encoded.append(value)
    return bytes(encoded)
