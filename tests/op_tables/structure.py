"""Gradient rows of the structure, reduction and einsum ops (server/ops/structure.py, reductions.py, linalg.py).

A row's float arguments are drawn from the domains of tests.test_gradients; int arguments (indices,
and shape-like arguments given as run-time tensors) are written out. Rows whose shape-like
arguments are tensors have outputs of sizes the shape rules leave unknown.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tests.gradcheck import Array, AttrLike, OpCase
from tests.test_gradients import Domain, Shape, distinct, draw, nonzero, real

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)


def ints(*values: int, dtype: type = np.int64) -> Array:
    return np.array(values, dtype=dtype)


def case(op: str, label: str, *args: tuple[Domain, Shape] | Array, **attrs: AttrLike | None) -> OpCase:
    """A row; each argument is (domain, shape) for a drawn float tensor, or an array used as it is."""
    case_id = f"{op}[{label}]"
    values = [
        arg if isinstance(arg, np.ndarray) else draw(f"{case_id}:{i}", [arg[0]], [arg[1]])[0]
        for i, arg in enumerate(args)
    ]
    return OpCase(case_id, op, tuple(values), attrs)


CONCAT = [
    case("concat", "2x3,2x1,2x2,axis=1", (real, (2, 3)), (real, (2, 1)), (real, (2, 2)), axis=1),
    case("concat", "1x2x3,2x2x3,axis=-3", (real, (1, 2, 3)), (real, (2, 2, 3)), axis=-3),
    case("concat", "one-operand", (real, (3,)), axis=0),
    case("concat", "with-empty", (real, (2, 0)), (real, (2, 2)), axis=-1),
]

SLICE = [
    case("slice", "leading-axes", (real, (2, 3, 4)), starts=[0, 1], ends=[2, 3]),
    case(
        "slice", "negative-steps", (real, (2, 3, 4)), starts=[-1, 3], ends=[INT64_MIN, 0], axes=[2, 1], steps=[-2, -1]
    ),
    case("slice", "int64-max-end", (real, (2, 3, 4)), starts=[1], ends=[INT64_MAX], axes=[-1], steps=[2]),
    case("slice", "clamped-out-of-range", (real, (3, 4)), starts=[-10, 2], ends=[10, 100], axes=[0, 1]),
    case("slice", "empty", (real, (3, 4)), starts=[2], ends=[1], axes=[0]),
    case("slice", "tensors-starts-ends", (real, (2, 3, 4)), ints(1, -3), ints(3, 4), axes=[2, 1]),
    case(
        "slice",
        "tensors-all-int32",
        (real, (2, 3, 4)),
        ints(-1, 0, dtype=np.int32),
        ints(-5, 2, dtype=np.int32),
        ints(2, 0, dtype=np.int32),
        ints(-1, 1, dtype=np.int32),
    ),
]

SPLIT = [
    case("split", "sizes,index=1,axis=-1", (real, (2, 4)), splits=[1, 3], index=1, axis=-1),
    case("split", "num_outputs=3,uneven,last", (real, (2, 7)), num_outputs=3, index=2, axis=1),
    case("split", "num_outputs=2,first", (real, (4, 3)), num_outputs=2, index=0),
    case("split", "sizes-tensor,index=-1", (real, (5, 2)), ints(2, 3), index=-1),
]

GATHER = [
    case("gather", "repeats-and-negative", (real, (4, 3)), ints(3, 0, 3, -1)),
    case("gather", "int32,2-D,axis=1", (real, (2, 3, 4)), ints(0, 2, -1, 1, dtype=np.int32).reshape(2, 2), axis=1),
    case("gather", "scalar-index,axis=-1", (real, (3, 4)), np.array(-2), axis=-1),
    case("gather", "no-indices", (real, (2, 3)), np.zeros(0, np.int64)),
    case("gather_elements", "axis=1,repeats", (real, (3, 4)), ints(0, -1, 3, 3, 1, 0).reshape(3, 2), axis=1),
    case("gather_elements", "smaller-index", (real, (2, 3, 4)), ints(0, 3, 2, -4, 1, 1).reshape(1, 3, 2), axis=2),
    case("gather_elements", "axis=0,longer", (real, (3, 2)), ints(2, 0, 1, 1, 0, -1, 2, 2, 0, 0).reshape(5, 2)),
]

RESHAPING = [
    case("squeeze", "all-ones", (real, (1, 3, 1, 2))),
    case("squeeze", "axes=[-2]", (real, (1, 3, 1, 2)), axes=[-2]),
    case("squeeze", "axes-tensor", (real, (1, 3, 1, 2)), ints(0, 2)),
    case("unsqueeze", "axes=[0,-1]", (real, (3, 2)), axes=[0, -1]),
    case("unsqueeze", "scalar", (real, ()), axes=[0]),
    case("unsqueeze", "axes-tensor", (real, (3, 2)), ints(2, 0)),
    case("expand", "3x1->2x3x4", (real, (3, 1)), shape=[2, 1, 4]),
    case("expand", "both-ways", (real, (2, 1)), shape=[3]),
    case("expand", "shape-tensor", (real, (3, 1)), ints(2, 3, 1)),
    case("tile", "2x3,repeats=[2,1]", (real, (2, 3)), repeats=[2, 1]),
    case("tile", "vector", (real, (2,)), repeats=[3]),
    case("tile", "zero-repeat", (real, (2, 3)), repeats=[0, 2]),
    case("tile", "repeats-tensor", (real, (2, 3)), ints(1, 2)),
    case("flatten", "axis=1", (real, (2, 3, 4))),
    case("flatten", "axis=0", (real, (2, 3, 4)), axis=0),
    case("flatten", "axis=3", (real, (2, 3, 4)), axis=3),
    case("flatten", "axis=-1", (real, (2, 3, 4)), axis=-1),
    case("reshape", "shape-tensor", (real, (2, 3, 4)), ints(4, -1)),
    case("reshape", "allowzero=0", (real, (2, 3, 4)), shape=[0, -1], allowzero=0),
    case("transpose", "negative-perm", (real, (2, 3, 4)), perm=[-1, 0, -2]),
]

PAD = [
    case("pad", "constant", (real, (2, 3)), pads=[1, 0, 2, 1], value=0.5),
    case("pad", "constant,crop", (real, (3, 4)), pads=[-1, 2, 0, -2]),
    case("pad", "reflect", (real, (2, 3, 4)), pads=[0, 0, 2, 0, 0, 3], mode="reflect"),
    case("pad", "reflect,twice-over", (real, (2, 3)), pads=[0, 5, 0, 4], mode="reflect"),
    case("pad", "edge", (real, (2, 3, 4)), pads=[0, 2, 1, 0, 1, 3], mode="edge"),
    case("pad", "edge,crop", (real, (3, 4)), pads=[2, -1, -1, 2], mode="edge"),
    case("pad", "wrap", (real, (2, 3, 4)), pads=[0, 1, 0, 0, 0, 2], mode="wrap"),
    case("pad", "tensors-with-value", (real, (2, 3)), ints(1, 0, 0, 2), (real, ())),
]

CUMSUM = [
    case("cumsum", "axis=1", (real, (2, 3, 4)), axis=1),
    case("cumsum", "exclusive", (real, (2, 3, 4)), axis=-1, exclusive=True),
    case("cumsum", "reverse", (real, (2, 3, 4)), axis=0, reverse=True),
    case("cumsum", "exclusive,reverse", (real, (5,)), exclusive=True, reverse=True),
    case("cumsum", "axis-tensor", (real, (2, 3)), np.array(-1)),
]

EINSUM = [
    case("einsum", "matmul", (real, (2, 3)), (real, (3, 4)), equation="ij,jk->ik"),
    case("einsum", "trace", (real, (3, 3)), equation="ii->"),
    case("einsum", "diagonal", (real, (3, 3)), equation="ii->i"),
    case("einsum", "repeated-and-kept", (real, (2, 2, 3)), equation="iij->ji"),
    case("einsum", "ellipsis-batches", (real, (2, 1, 2, 3)), (real, (4, 3, 2)), equation="...ij,...jk->...ik"),
    case("einsum", "implicit", (real, (2, 2, 3)), (real, (2, 3, 2)), equation="bij,bjk"),
    case("einsum", "implicit-ellipsis", (real, (4, 2, 3)), (real, (3,)), equation="...j, j"),
    case("einsum", "outer", (real, (3,)), (real, (4,)), equation="i,j->ij"),
    case("einsum", "private-letter", (real, (2, 3)), (real, (2,)), equation="ij,i->i"),
    case("einsum", "broadcast-size-1", (real, (1, 3)), (real, (2, 3)), equation="ij,ij->ij"),
    case("einsum", "three-operands", (real, (2, 3)), (real, (3, 1)), (real, (2, 4)), equation="ij,jk,kl->il"),
    case("einsum", "transpose", (real, (2, 3, 4)), equation="abc->cab"),
]

REDUCTION_AXES: list[tuple[Sequence[int] | None, bool]] = [(None, False), ([1], False), ([-1, 0], True)]
REDUCTION_DOMAINS: dict[str, Domain] = {
    "reduce_prod": nonzero,
    "reduce_min": distinct,
    "reduce_l1": nonzero,
    "reduce_l2": real,
    "reduce_sum_square": real,
}
REDUCTIONS = [
    case(op, f"axes={axes},keepdims={keepdims}", (domain, (2, 3, 4)), axes=axes, keepdims=keepdims)
    for op, domain in REDUCTION_DOMAINS.items()
    for axes, keepdims in REDUCTION_AXES
] + [
    case("reduce_prod", "one-zero,two-zeros", np.array([[0.5, 0.0, 2.0], [0.0, 0.0, 3.0], [1.5, -2.0, 0.5]]), axes=[1]),
    case("reduce_min", "scalar", (real, ())),
    *(case(op, "axes-tensor", (domain, (2, 3)), ints(-1), keepdims=True) for op, domain in REDUCTION_DOMAINS.items()),
    case("sum", "axes-tensor", (real, (2, 3, 4)), ints(0, -1)),
    case("mean", "axes-tensor,keepdims", (real, (2, 3, 4)), ints(1), keepdims=True),
    case("max", "empty-axes-tensor-is-all", (distinct, (2, 3)), np.zeros(0, np.int64)),
    case("logsumexp", "axes-tensor", (real, (2, 3)), ints(-1, dtype=np.int32)),
]

CASES: list[OpCase] = [*CONCAT, *SLICE, *SPLIT, *GATHER, *RESHAPING, *PAD, *CUMSUM, *EINSUM, *REDUCTIONS]
NOT_DIFFERENTIABLE = {"shape", "one_hot", "argmax", "argmin"}
