"""The tensor wire format shared by server and client: numpy arrays <-> `chainrule.v1.Tensor`.

A Tensor is raw little-endian, row-major bytes plus a dtype and a shape, so decoding is a
zero-copy `np.frombuffer` view of the received bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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


def encode(value: np.ndarray | float | int | bool, name: str = "tensor") -> tensor_pb2.Tensor:
    array = np.asarray(value)
    try:
        code = wire_dtype(array.dtype)
    except TensorError as error:
        raise TensorError(f"{name}: {error}") from None
    little_endian = np.asarray(array, dtype=WIRE_DTYPES[code])
    return tensor_pb2.Tensor(dtype=code, shape=little_endian.shape, data=little_endian.tobytes())


def decode(tensor: tensor_pb2.Tensor, name: str = "tensor", max_elements: int | None = None) -> np.ndarray:
    """A read-only array viewing the tensor's bytes; raises TensorError naming `name`."""
    if tensor.chunk_offset or tensor.more_chunks:
        raise TensorError(f"tensor '{name}' is a chunk (chunk_offset {tensor.chunk_offset}); send whole tensors")
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


def split(tensor: tensor_pb2.Tensor, chunk_bytes: int = CHUNK_BYTES) -> list[tensor_pb2.Tensor]:
    """The tensor itself when small enough, else its chunks in order (see Tensor in tensor.proto)."""
    data = tensor.data
    if len(data) <= chunk_bytes:
        return [tensor]
    view = memoryview(data)
    return [
        tensor_pb2.Tensor(
            dtype=tensor.dtype,
            shape=tensor.shape,
            data=bytes(view[offset : offset + chunk_bytes]),
            chunk_offset=offset,
            more_chunks=offset + chunk_bytes < len(data),
        )
        for offset in range(0, len(data), chunk_bytes)
    ]


class Assembler:
    """Joins chunked tensors back together, keyed by name, as their chunks arrive in order."""

    def __init__(self) -> None:
        self._partial: dict[str, tuple[tensor_pb2.Tensor, bytearray]] = {}

    @property
    def pending(self) -> bool:
        return bool(self._partial)

    def add(self, name: str, piece: tensor_pb2.Tensor) -> np.ndarray | None:
        """The decoded tensor once its last chunk has arrived, else None."""
        if not piece.chunk_offset and not piece.more_chunks and name not in self._partial:
            return decode(piece, name)
        first, data = self._partial.setdefault(name, (piece, bytearray()))
        if piece.chunk_offset != len(data):
            raise TensorError(f"tensor '{name}': chunk at offset {piece.chunk_offset} arrived after {len(data)} bytes")
        data += piece.data
        if piece.more_chunks:
            return None
        del self._partial[name]
        whole = tensor_pb2.Tensor(dtype=first.dtype, shape=first.shape, data=bytes(data))
        return decode(whole, name)
