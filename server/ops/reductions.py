"""Reductions over axes: `axes` absent means every axis; `keepdims` keeps reduced axes as size 1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chainrule.server.ops.registry import Array, Attr, defop
from chainrule.server.shapes import TensorType, float_result, normalize_axes, reduce_shape

REDUCE_ATTRS = {"axes": Attr("ints"), "keepdims": Attr("b", default=False)}


def _restore(g: Array, shape: tuple[int, ...], axes: Sequence[int] | None, keepdims: bool) -> Array:
    """Broadcast a reduction's gradient back over the reduced axes."""
    if not keepdims:
        g = np.expand_dims(g, normalize_axes(axes, len(shape)))
    return np.broadcast_to(g, shape)


def _reduced_count(shape: tuple[int, ...], axes: Sequence[int] | None) -> int:
    return int(np.prod([shape[axis] for axis in normalize_axes(axes, len(shape))], dtype=np.int64))


def _axis_tuple(axes: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if axes is None else tuple(axes)


def reduce_sum(x: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return np.sum(x, axis=_axis_tuple(axes), keepdims=keepdims)


def reduce_mean(x: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return np.mean(x, axis=_axis_tuple(axes), keepdims=keepdims)


def reduce_max(x: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return np.max(x, axis=_axis_tuple(axes), keepdims=keepdims)


def logsumexp(x: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    axis = _axis_tuple(axes)
    shift = np.max(x, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(shift), shift, 0)
    out = np.log(np.sum(np.exp(x - shift), axis=axis, keepdims=True)) + shift
    return out if keepdims else np.squeeze(out, axis=normalize_axes(axes, np.ndim(x)))


def _sum_vjp(g: Array, ans: Array, x: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return _restore(g, x.shape, axes, keepdims)


def _mean_vjp(g: Array, ans: Array, x: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return _restore(g / _reduced_count(x.shape, axes), x.shape, axes, keepdims)


def _max_vjp(g: Array, ans: Array, x: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    winners = x == _restore(ans, x.shape, axes, keepdims)
    ties = np.sum(winners, axis=_axis_tuple(axes), keepdims=True)
    return _restore(g, x.shape, axes, keepdims) * winners / ties


def _logsumexp_vjp(g: Array, ans: Array, x: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return _restore(g, x.shape, axes, keepdims) * np.exp(x - _restore(ans, x.shape, axes, keepdims))


def _reduce_type(x: TensorType, axes: Sequence[int] | None = None, keepdims: bool = False) -> TensorType:
    return TensorType(x.dtype, reduce_shape(x.shape, axes, keepdims))


def _float_reduce_type(x: TensorType, axes: Sequence[int] | None = None, keepdims: bool = False) -> TensorType:
    return TensorType(float_result(x.dtype), reduce_shape(x.shape, axes, keepdims))


defop("sum", reduce_sum, _sum_vjp, infer=_reduce_type, attrs=REDUCE_ATTRS, reads=("",))
defop("mean", reduce_mean, _mean_vjp, infer=_float_reduce_type, attrs=REDUCE_ATTRS, reads=("",))
defop("max", reduce_max, _max_vjp, infer=_reduce_type, attrs=REDUCE_ATTRS, reads=("x ans",))
defop("logsumexp", logsumexp, _logsumexp_vjp, infer=_float_reduce_type, attrs=REDUCE_ATTRS, reads=("x ans",))
