"""Static shape and dtype rules, working on partly known shapes.

A shape is a tuple whose entries are sizes or None (unknown size), or None altogether
(unknown rank). The same rules check a graph when it is created, with what its inputs
declare, and a request before it runs, with the shapes actually fed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Dim = int | None
Shape = tuple[Dim, ...] | None


class ShapeError(ValueError):
    """Arguments or attrs an op cannot take; the graph layer adds the node's name."""

    reason = "SHAPE_MISMATCH"


class DtypeError(ShapeError):
    """Argument dtypes an op cannot take (bool - bool, neg of bool, an integer to a negative power)."""

    reason = "DTYPE_MISMATCH"


@dataclass(frozen=True)
class TensorType:
    dtype: np.dtype | None
    shape: Shape

    @property
    def is_known(self) -> bool:
        return self.shape is not None and all(dim is not None for dim in self.shape)


def describe(shape: Shape) -> str:
    if shape is None:
        return "[...]"
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


def float_result(dtype: np.dtype | None) -> np.dtype | None:
    """The dtype of a float-valued function of `dtype`: floats stay, everything else becomes float64."""
    if dtype is None:
        return None
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def broadcast_shapes(a: Shape, b: Shape) -> Shape:
    if a is None or b is None:
        return None
    rank = max(len(a), len(b))
    padded_a = (1,) * (rank - len(a)) + a
    padded_b = (1,) * (rank - len(b)) + b
    out: list[Dim] = []
    for x, y in zip(padded_a, padded_b, strict=True):
        if x == 1:
            out.append(y)
        elif y == 1 or x == y:
            out.append(x)
        elif x is None:
            out.append(y)
        elif y is None:
            out.append(x)
        else:
            raise ShapeError(f"shapes {describe(a)} and {describe(b)} cannot be broadcast together")
    return tuple(out)


def same_shape(a: Shape, b: Shape, a_name: str, b_name: str) -> None:
    if a is None or b is None:
        return
    compatible = len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))
    if not compatible:
        raise ShapeError(f"{a_name} {describe(a)} and {b_name} {describe(b)} must have the same shape")


def _dims_match(x: Dim, y: Dim) -> bool:
    return x is None or y is None or x == y


def matmul_shape(a: Shape, b: Shape) -> Shape:
    if a is not None and len(a) == 0 or b is not None and len(b) == 0:
        raise ShapeError("matmul needs operands with at least one axis; use mul for scalars")
    if a is None or b is None:
        return None
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    if not _dims_match(a2[-1], b2[-2]):
        raise ShapeError(f"matmul inner dimensions differ: {describe(a)} @ {describe(b)} ({a2[-1]} != {b2[-2]})")
    batch = broadcast_shapes(a2[:-2], b2[:-2])
    assert batch is not None
    out = (*batch, a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def normalize_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ShapeError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def normalize_axes(axes: Sequence[int] | None, rank: int) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(rank))
    normalized = tuple(sorted(normalize_axis(axis, rank) for axis in axes))
    if len(set(normalized)) != len(normalized):
        raise ShapeError(f"axes {list(axes)} name the same axis twice")
    return normalized


def reduce_shape(shape: Shape, axes: Sequence[int] | None, keepdims: bool) -> Shape:
    if shape is None:
        return None
    reduced = normalize_axes(axes, len(shape))
    if keepdims:
        return tuple(1 if axis in reduced else dim for axis, dim in enumerate(shape))
    return tuple(dim for axis, dim in enumerate(shape) if axis not in reduced)


def reshape_shape(shape: Shape, target: Sequence[int]) -> Shape:
    if sum(1 for dim in target if dim == -1) > 1:
        raise ShapeError(f"reshape target {list(target)} has more than one -1")
    if any(dim < -1 for dim in target):
        raise ShapeError(f"reshape target {list(target)} has a negative size")
    known = 1
    for dim in target:
        if dim != -1:
            known *= dim
    if shape is None or any(dim is None for dim in shape):
        return tuple(None if dim == -1 else dim for dim in target)
    size = 1
    for dim in shape:
        size *= dim  # type: ignore[operator]
    if -1 in target:
        if known == 0 or size % known:
            raise ShapeError(f"cannot reshape {describe(shape)} ({size} elements) to {list(target)}")
        return tuple(size // known if dim == -1 else dim for dim in target)
    if known != size:
        raise ShapeError(f"cannot reshape {describe(shape)} ({size} elements) to {list(target)} ({known} elements)")
    return tuple(target)


def transpose_shape(shape: Shape, perm: Sequence[int] | None) -> Shape:
    if perm is not None and sorted(perm) != list(range(len(perm))):
        raise ShapeError(f"perm {list(perm)} is not a permutation of 0..{len(perm) - 1}")
    if shape is None:
        return None
    if perm is None:
        return tuple(reversed(shape))
    if len(perm) != len(shape):
        raise ShapeError(f"perm {list(perm)} has {len(perm)} entries for a tensor of rank {len(shape)}")
    return tuple(shape[axis] for axis in perm)
