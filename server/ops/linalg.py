"""Matrix products."""

from __future__ import annotations

import numpy as np

from chainrule.server.ops.elementwise import joint_dtype
from chainrule.server.ops.registry import Array, defop, unbroadcast
from chainrule.server.shapes import TensorType, matmul_shape


def _matmul_a(g: Array, ans: Array, a: Array, b: Array) -> Array:
    if a.ndim == b.ndim == 2:
        return g @ b.T
    g2, a2, b2 = _as_matrices(g, a, b)
    return unbroadcast(g2 @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)


def _matmul_b(g: Array, ans: Array, a: Array, b: Array) -> Array:
    if a.ndim == b.ndim == 2:
        return a.T @ g
    g2, a2, b2 = _as_matrices(g, a, b)
    return unbroadcast(a2.swapaxes(-1, -2) @ g2, b2.shape).reshape(b.shape)


def _as_matrices(g: Array, a: Array, b: Array) -> tuple[Array, Array, Array]:
    """Restore the axes numpy's matmul drops for 1-D operands, so one formula serves every case."""
    g = np.asarray(g)
    if a.ndim == 1:
        a = a[np.newaxis, :]
        g = np.expand_dims(g, -2) if b.ndim > 1 else g[np.newaxis]
    if b.ndim == 1:
        b = b[:, np.newaxis]
        g = np.expand_dims(g, -1)
    return g, a, b


def _matmul_type(a: TensorType, b: TensorType) -> TensorType:
    return TensorType(joint_dtype(a, b), matmul_shape(a.shape, b.shape))


defop("matmul", np.matmul, _matmul_a, _matmul_b, infer=_matmul_type, reads=("y", "x"))
