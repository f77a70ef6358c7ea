"""Ops that move elements around without computing on them: reshape, transpose."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chainrule.server.ops.registry import Array, Attr, defop
from chainrule.server.shapes import TensorType, reshape_shape, transpose_shape


def reshape(x: Array, shape: Sequence[int]) -> Array:
    return np.reshape(x, tuple(shape))


def transpose(x: Array, perm: Sequence[int] | None = None) -> Array:
    return np.transpose(x, None if perm is None else tuple(perm))


def _transpose_vjp(g: Array, ans: Array, x: Array, perm: Sequence[int] | None = None) -> Array:
    return np.transpose(g, None if perm is None else tuple(np.argsort(perm)))


defop(
    "reshape",
    reshape,
    lambda g, ans, x, shape: np.reshape(g, x.shape),
    infer=lambda x, shape: TensorType(x.dtype, reshape_shape(x.shape, shape)),
    attrs={"shape": Attr("ints", required=True)},
    reads=("",),
)
defop(
    "transpose",
    transpose,
    _transpose_vjp,
    infer=lambda x, perm=None: TensorType(x.dtype, transpose_shape(x.shape, perm)),
    attrs={"perm": Attr("ints")},
    reads=("",),
)
