"""The tensor codec both sides share: byte layout, validation, chunking and reassembly."""

from __future__ import annotations

import numpy as np
import pytest

from chainrule import tensors
from chainrule.v1 import tensor_pb2


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "bool"])
def test_round_trip_keeps_dtype_shape_and_values(dtype: str) -> None:
    value = (np.arange(12).reshape(3, 4) % 3).astype(dtype)
    message = tensors.encode(value)
    assert message.dtype == tensors.DTYPE_NAMES[dtype] and list(message.shape) == [3, 4]
    assert message.data == value.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(tensors.decode(message), value)


def test_scalars_have_an_empty_shape_and_big_endian_input_is_stored_little_endian() -> None:
    assert list(tensors.encode(np.float64(2.5)).shape) == []
    big = np.array([1.0, 2.0], dtype=">f8")
    assert tensors.encode(big).data == np.array([1.0, 2.0], dtype="<f8").tobytes()
    assert list(tensors.encode(np.ones((2, 3))[:, ::2]).shape) == [2, 2]


def test_decode_refuses_malformed_tensors_naming_them() -> None:
    cases = {
        "DATA_TYPE_UNSPECIFIED": tensor_pb2.Tensor(shape=[1], data=b"\0" * 8),
        "negative": tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT64, shape=[-1], data=b""),
        "needs 16": tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT64, shape=[2], data=b"\0" * 8),
        "other than 0 and 1": tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_BOOL, shape=[1], data=b"\x02"),
        "is a chunk": tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_BOOL, shape=[1], data=b"\x01", more_chunks=True),
    }
    for fragment, message in cases.items():
        with pytest.raises(tensors.TensorError, match=fragment) as raised:
            tensors.decode(message, "w")
        assert "'w'" in str(raised.value)
    with pytest.raises(tensors.TensorTooLarge):
        tensors.decode(tensors.encode(np.zeros(11)), "w", max_elements=10)


def chunked(value: np.ndarray, chunk_bytes: int) -> list[tensor_pb2.Tensor]:
    pieces = []
    for chunk in tensors.chunks(value, "g", chunk_bytes):
        piece = tensor_pb2.Tensor()
        chunk.write_to(piece)
        pieces.append(piece)
    return pieces


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "bool"])
def test_chunks_reassemble_exactly(dtype: str) -> None:
    value = (np.arange(1000).reshape(10, 100) % 7 > 2).astype(dtype)
    pieces = chunked(value, 96)
    assert len(pieces) == -(-value.nbytes // 96)
    assert [p.chunk_offset for p in pieces] == list(range(0, value.nbytes, 96))
    assert [p.more_chunks for p in pieces] == [True] * (len(pieces) - 1) + [False]
    assembler = tensors.Assembler()
    results = [assembler.add("g", piece) for piece in pieces]
    assert results[:-1] == [None] * (len(pieces) - 1) and not assembler.pending
    np.testing.assert_array_equal(results[-1], value)
    assert results[-1].dtype == np.dtype(dtype) and results[-1].shape == (10, 100)


def test_small_tensors_are_one_whole_chunk() -> None:
    (piece,) = chunked(np.ones(3), 96)
    assert piece.chunk_offset == 0 and not piece.more_chunks
    np.testing.assert_array_equal(tensors.Assembler().add("g", piece), np.ones(3))


def test_chunks_out_of_order_or_missing_are_refused() -> None:
    pieces = chunked(np.arange(100.0), 96)
    with pytest.raises(tensors.TensorError, match="does not follow"):
        tensors.Assembler().add("g", pieces[1])
    truncated = tensor_pb2.Tensor()
    truncated.CopyFrom(pieces[1])
    truncated.more_chunks = False
    assembler = tensors.Assembler()
    assembler.add("g", pieces[0])
    with pytest.raises(tensors.TensorError, match="ended after"):
        assembler.add("g", truncated)


@pytest.mark.parametrize("size", [0, 1, 50, 1000])
def test_a_chunk_serialized_into_a_message_parses_like_one_built_field_by_field(size: int) -> None:
    from chainrule.v1 import graph_service_pb2 as pb

    value = np.arange(size * 3, dtype=np.float32).reshape(size, 3)
    for chunk in tensors.chunks(value, "g", chunk_bytes=1024):
        head = pb.BackwardResponse(name="g", loss=tensors.encode(np.float64(1.5)))
        expected = pb.BackwardResponse()
        expected.CopyFrom(head)
        chunk.write_to(expected.gradient)
        parsed = pb.BackwardResponse.FromString(chunk.serialized_into(2, head.SerializeToString()))
        assert parsed == expected
