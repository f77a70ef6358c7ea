"""The tensor wire format shared by server and client: numpy arrays <-> `chainrule.v1.Tensor`.

A Tensor is raw little-endian, row-major bytes plus a dtype and a shape, so decoding is a
zero-copy `np.frombuffer` view of the received bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from chainrule.v1 import tensor_pb2

WIRE_DTYPES: dict[tensor_pb2.DataType.ValueType, np.dtype] = {
    tensor_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DATA_TYPE_BOOL: np.dtype("?"),
}
DTYPE_NAMES: dict[str, tensor_pb2.DataType.ValueType] = {
    "float32": tensor_pb2.DATA_TYPE_FLOAT32,
    "float64": tensor_pb2.DATA_TYPE_FLOAT64,
    "int32": tensor_pb2.DATA_TYPE_INT32,
    "int64": tensor_pb2.DATA_TYPE_INT64,
    "bool": tensor_pb2.DATA_TYPE_BOOL,
}
_WIRE_CODES = {dtype.newbyteorder("="): code for code, dtype in WIRE_DTYPES.items()}


class TensorError(ValueError):
    """A tensor that cannot be encoded or decoded; the message names the tensor."""


class TensorTooLarge(TensorError):
    """A well-formed tensor with more elements than the receiver accepts."""


def dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).name


def wire_dtype(dtype: np.dtype | str) -> tensor_pb2.DataType.ValueType:
    """The DataType code of a numpy dtype, whatever its byte order."""
    code = _WIRE_CODES.get(np.dtype(dtype).newbyteorder("="))
    if code is None:
        raise TensorError(f"dtype {np.dtype(dtype)} is not supported; use one of {', '.join(DTYPE_NAMES)}")
    return code


def _wire_array(value: np.ndarray | float | int | bool, name: str) -> tuple[tensor_pb2.DataType.ValueType, np.ndarray]:
    array = np.asarray(value)
    try:
        code = wire_dtype(array.dtype)
    except TensorError as error:
        raise TensorError(f"{name}: {error}") from None
    return code, np.asarray(array, dtype=WIRE_DTYPES[code])


def encode(value: np.ndarray | float | int | bool, name: str = "tensor") -> tensor_pb2.Tensor:
    code, little_endian = _wire_array(value, name)
    return tensor_pb2.Tensor(dtype=code, shape=little_endian.shape, data=little_endian.tobytes())


def _header(
    tensor: tensor_pb2.Tensor, name: str, max_elements: int | None = None
) -> tuple[np.dtype, tuple[int, ...], int]:
    """The tensor's dtype, shape and element count, checked."""
    dtype = WIRE_DTYPES.get(tensor.dtype)
    if dtype is None:
        label = tensor_pb2.DataType.Name(tensor.dtype) if tensor.dtype in tensor_pb2.DataType.values() else tensor.dtype
        raise TensorError(f"tensor '{name}' has dtype {label}; expected one of {', '.join(DTYPE_NAMES)}")
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise TensorError(f"tensor '{name}' has a negative dimension in shape {list(shape)}")
    count = 1
    for dim in shape:
        count *= dim
    if max_elements is not None and count > max_elements:
        raise TensorTooLarge(f"tensor '{name}' has {count:,} elements, more than the limit of {max_elements:,}")
    return dtype, shape, count


def decode(tensor: tensor_pb2.Tensor, name: str = "tensor", max_elements: int | None = None) -> np.ndarray:
    """A read-only array viewing the tensor's bytes; raises TensorError naming `name`."""
    if tensor.chunk_offset or tensor.more_chunks:
        raise TensorError(f"tensor '{name}' is a chunk (chunk_offset {tensor.chunk_offset}); send whole tensors")
    dtype, shape, count = _header(tensor, name, max_elements)
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorError(
            f"tensor '{name}' has {len(tensor.data)} bytes of data; shape {list(shape)} of "
            f"{dtype_name(dtype)} needs {expected}"
        )
    try:
        array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    except ValueError as error:  # more axes than numpy allows, or empty but with more elements per axis than it indexes
        raise TensorError(f"tensor '{name}' has shape {list(shape)}, which numpy cannot represent: {error}") from None
    if dtype == np.bool_ and count and array.view(np.uint8).max() > 1:
        raise TensorError(f"tensor '{name}' is bool but has bytes other than 0 and 1")
    return array


def encode_named(values: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]) -> list[tensor_pb2.NamedTensor]:
    items = values.items() if isinstance(values, Mapping) else values
    return [tensor_pb2.NamedTensor(name=name, tensor=encode(value, name)) for name, value in items]


CHUNK_BYTES = 1 << 20
"""Tensors with more data than this travel in several chunks in server-to-client streams."""


@dataclass(frozen=True)
class Chunk:
    """One piece of a tensor for a server-to-client stream; `data` views the array it came from."""

    dtype: tensor_pb2.DataType.ValueType
    shape: tuple[int, ...]
    data: memoryview
    offset: int
    more: bool

    def _header(self) -> tensor_pb2.Tensor:
        tensor = tensor_pb2.Tensor(dtype=self.dtype, shape=self.shape)
        if self.offset or self.more:
            tensor.chunk_offset = self.offset
            tensor.more_chunks = self.more
        return tensor

    def write_to(self, tensor: tensor_pb2.Tensor) -> None:
        tensor.MergeFrom(self._header())
        tensor.data = self.data.tobytes()

    def serialized_into(self, field_number: int, head: bytes) -> bytes:
        """`head`, a serialized message, with this chunk appended as its Tensor field `field_number`.

        Protobuf parsers merge fields however they are ordered, so the message never has to be
        built: the chunk's bytes are copied once, from the array straight into the result.
        """
        rest = self._header().SerializeToString()
        data_header = _length_delimited(TENSOR_DATA_FIELD, len(self.data))
        tensor_length = len(rest) + len(data_header) + len(self.data)
        return b"".join((head, _length_delimited(field_number, tensor_length), rest, data_header, self.data))


TENSOR_DATA_FIELD = tensor_pb2.Tensor.DESCRIPTOR.fields_by_name["data"].number


def _varint(value: int) -> bytes:
    encoded = bytearray()
    while value > 0x7F:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _length_delimited(field_number: int, length: int) -> bytes:
    """The tag (wire type 2) and length prefix of a bytes or message field."""
    return _varint(field_number << 3 | 2) + _varint(length)


def chunks(
    value: np.ndarray | float | int | bool, name: str = "tensor", chunk_bytes: int = CHUNK_BYTES
) -> Iterator[Chunk]:
    """The tensor as one Chunk when small enough, else its chunks in order (see Tensor in tensor.proto).

    Chunks view the array, so a large gradient is never held twice in full.
    """
    code, array = _wire_array(value, name)
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
    total = len(raw)
    if total <= chunk_bytes:
        yield Chunk(code, array.shape, raw, 0, False)
        return
    for offset in range(0, total, chunk_bytes):
        yield Chunk(code, array.shape, raw[offset : offset + chunk_bytes], offset, offset + chunk_bytes < total)


class Assembler:
    """Joins chunked tensors back together, keyed by name, as their chunks arrive in order.

    The first chunk sizes the whole array, and every chunk is copied into it once.
    """

    def __init__(self) -> None:
        self._partial: dict[str, tuple[np.ndarray, memoryview, int]] = {}

    @property
    def pending(self) -> bool:
        return bool(self._partial)

    def add(self, name: str, piece: tensor_pb2.Tensor) -> np.ndarray | None:
        """The decoded tensor once its last chunk has arrived, else None."""
        if not piece.chunk_offset and not piece.more_chunks and name not in self._partial:
            return decode(piece, name)
        if name not in self._partial:
            dtype, shape, _ = _header(piece, name)
            array = np.empty(shape, dtype)
            self._partial[name] = (array, array.reshape(-1).view(np.uint8).data, 0)
        array, view, received = self._partial[name]
        data = piece.data
        if piece.chunk_offset != received or received + len(data) > len(view):
            raise TensorError(
                f"tensor '{name}': chunk of {len(data)} bytes at offset {piece.chunk_offset} does not follow the "
                f"{received} bytes received of {len(view)}"
            )
        view[received : received + len(data)] = data
        received += len(data)
        if piece.more_chunks:
            self._partial[name] = (array, view, received)
            return None
        del self._partial[name]
        if received != len(view):
            raise TensorError(f"tensor '{name}' ended after {received} of its {len(view)} bytes")
        if array.dtype == np.bool_ and array.size and array.view(np.uint8).max() > 1:
            raise TensorError(f"tensor '{name}' is bool but has bytes other than 0 and 1")
        return array
