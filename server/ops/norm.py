"""Normalizations along axes: softmax and log-softmax (batch, layer, group and instance norms join them)."""

from __future__ import annotations

import numpy as np

from chainrule.server.ops.elementwise import float_type
from chainrule.server.ops.registry import Array, Attr, defop
from chainrule.server.shapes import TensorType, normalize_axis


def softmax(x: Array, axis: int = -1) -> Array:
    exps = np.exp(x - x.max(axis=axis, keepdims=True))
    return exps / exps.sum(axis=axis, keepdims=True)


def log_softmax(x: Array, axis: int = -1) -> Array:
    """x - logsumexp(x) with the max shifted out first, so ±1000 neither overflows nor underflows."""
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _softmax_vjp(g: Array, ans: Array, x: Array, axis: int = -1) -> Array:
    return ans * (g - (g * ans).sum(axis=axis, keepdims=True))


def _log_softmax_vjp(g: Array, ans: Array, x: Array, axis: int = -1) -> Array:
    return g - np.exp(ans) * g.sum(axis=axis, keepdims=True)


def _axis_type(x: TensorType, axis: int = -1) -> TensorType:
    if x.shape is not None:
        normalize_axis(axis, len(x.shape))
    return float_type(x)


AXIS_ATTRS = {"axis": Attr("i", default=-1)}
defop("softmax", softmax, _softmax_vjp, infer=_axis_type, attrs=AXIS_ATTRS, reads=("ans",))
defop("log_softmax", log_softmax, _log_softmax_vjp, infer=_axis_type, attrs=AXIS_ATTRS, reads=("ans",))
