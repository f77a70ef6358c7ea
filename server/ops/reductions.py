"""Reductions over axes: `axes` absent means every axis; `keepdims` keeps reduced axes as size 1.

The axes may also come as an optional trailing int tensor argument (ONNX 18's `axes` input),
which overrides the attr; an empty one reduces every axis, as ONNX's does by default. Sums and
products of bool and int tensors are int64, as numpy's and torch's; the means and norms of them
are float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from chainrule.server.ops.elementwise import as_float, sign
from chainrule.server.ops.registry import Array, Attr, defop
from chainrule.server.ops.structure import shape_like_length, tensor_ints
from chainrule.server.shapes import Shape, ShapeError, TensorType, float_result, normalize_axes, reduce_shape

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


def _axes(x: Array, given: Sequence[Array], axes: Sequence[int] | None) -> Sequence[int] | None:
    """The axes tensor argument when there is one (empty: every axis), else the attr."""
    if not given:
        return axes
    entries = tensor_ints(given[0], "the axes argument")
    return normalize_axes(entries, np.ndim(x)) if entries else None


def reduce_sum(x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return np.sum(x, axis=_axis_tuple(_axes(x, given, axes)), keepdims=keepdims)


def reduce_mean(x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return np.mean(x, axis=_axis_tuple(_axes(x, given, axes)), keepdims=keepdims)


def reduce_max(x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return np.max(x, axis=_axis_tuple(_axes(x, given, axes)), keepdims=keepdims)


def reduce_min(x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return np.min(x, axis=_axis_tuple(_axes(x, given, axes)), keepdims=keepdims)


def reduce_prod(x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return np.prod(x, axis=_axis_tuple(_axes(x, given, axes)), keepdims=keepdims)


def reduce_l1(x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return np.sum(np.abs(x), axis=_axis_tuple(_axes(x, given, axes)), keepdims=keepdims)


def reduce_l2(x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    x = as_float(x)
    return np.sqrt(np.sum(x * x, axis=_axis_tuple(_axes(x, given, axes)), keepdims=keepdims))


def reduce_sum_square(x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    return np.sum(x * x, axis=_axis_tuple(_axes(x, given, axes)), keepdims=keepdims)


def logsumexp(x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False) -> Array:
    x = as_float(x)
    axes = _axes(x, given, axes)
    axis = _axis_tuple(axes)
    shift = np.max(x, axis=axis, keepdims=True, initial=-np.inf)  # an empty slice's logsumexp is -inf
    shift = np.where(np.isfinite(shift), shift, 0)
    out = np.log(np.sum(np.exp(x - shift), axis=axis, keepdims=True)) + shift
    return out if keepdims else np.squeeze(out, axis=normalize_axes(axes, np.ndim(x)))


def _sum_vjp(
    g: Array, ans: Array, x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False
) -> Array:
    return _restore(g, x.shape, _axes(x, given, axes), keepdims)


def _mean_vjp(
    g: Array, ans: Array, x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False
) -> Array:
    axes = _axes(x, given, axes)
    return _restore(g / _reduced_count(x.shape, axes), x.shape, axes, keepdims)


def _max_vjp(
    g: Array, ans: Array, x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False
) -> Array:
    axes = _axes(x, given, axes)
    winners = x == _restore(ans, x.shape, axes, keepdims)
    ties = np.sum(winners, axis=_axis_tuple(axes), keepdims=True)
    return _restore(g, x.shape, axes, keepdims) * winners / ties


def _min_vjp(
    g: Array, ans: Array, x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False
) -> Array:
    """As torch.amin: ties share the gradient equally; a NaN minimum gives NaN to its whole slice."""
    axes = _axes(x, given, axes)
    winners = x == _restore(ans, x.shape, axes, keepdims)
    ties = np.sum(winners, axis=_axis_tuple(axes), keepdims=True)
    return _restore(g, x.shape, axes, keepdims) * winners / ties


def _prod_vjp(
    g: Array, ans: Array, x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False
) -> Array:
    """The product of the other elements: with no zero in the slice, product / x; with one zero, the
    product of the rest at the zero and 0 elsewhere; with more, 0 everywhere."""
    axes = _axes(x, given, axes)
    axis = _axis_tuple(axes)
    zero = x == 0
    zeros = np.sum(zero, axis=axis, keepdims=True)
    others = np.prod(np.where(zero, 1, x), axis=axis, keepdims=True)
    share = np.where(zeros == 0, others / np.where(zero, 1, x), np.where(zero & (zeros == 1), others, 0))
    return _restore(g, x.shape, axes, keepdims) * share


def _l1_vjp(
    g: Array, ans: Array, x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False
) -> Array:
    return _restore(g, x.shape, _axes(x, given, axes), keepdims) * sign(x)


def _l2_vjp(
    g: Array, ans: Array, x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False
) -> Array:
    """x / norm, and 0 where the norm is 0 (torch.linalg.vector_norm)."""
    axes = _axes(x, given, axes)
    norm = _restore(ans, x.shape, axes, keepdims)
    return _restore(g, x.shape, axes, keepdims) * np.where(norm == 0, 0, x / np.where(norm == 0, 1, norm))


def _sum_square_vjp(
    g: Array, ans: Array, x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False
) -> Array:
    return _restore(g, x.shape, _axes(x, given, axes), keepdims) * (2 * x)


def _logsumexp_vjp(
    g: Array, ans: Array, x: Array, *given: Array, axes: Sequence[int] | None = None, keepdims: bool = False
) -> Array:
    axes = _axes(x, given, axes)
    return _restore(g, x.shape, axes, keepdims) * np.exp(x - _restore(ans, x.shape, axes, keepdims))


# ---------------------------------------------------------------- shape rules
def _reduced_shape(x: TensorType, given: Sequence[TensorType], axes: Sequence[int] | None, keepdims: bool) -> Shape:
    if not given:
        return reduce_shape(x.shape, axes, keepdims)
    length = shape_like_length(given[0], "the axes argument")
    if x.shape is None:
        return None
    if keepdims:
        return tuple(1 if dim == 1 else None for dim in x.shape)
    if length is None:
        return None
    if length > len(x.shape):
        raise ShapeError(f"{length} axes cannot be reduced in a tensor of rank {len(x.shape)}")
    return () if length == 0 else (None,) * (len(x.shape) - length)


def _sum_dtype(dtype: np.dtype | None) -> np.dtype | None:
    """Sums and products of bool and int tensors are int64, as numpy's and torch's."""
    if dtype is None or dtype.kind == "f":
        return dtype
    return np.dtype(np.int64)


def _same_dtype(dtype: np.dtype | None) -> np.dtype | None:
    return dtype


def _reduce_type(dtype_rule: Callable[[np.dtype | None], np.dtype | None]) -> Callable[..., TensorType]:
    def infer(x: TensorType, *given: TensorType, axes: Sequence[int] | None = None, keepdims: bool = False):
        return TensorType(dtype_rule(x.dtype), _reduced_shape(x, given, axes, keepdims))

    return infer


Forward = Callable[..., Array]
REDUCTIONS: list[tuple[str, Forward, Forward, Callable[[np.dtype | None], np.dtype | None], str, str]] = [
    ("sum", reduce_sum, _sum_vjp, _sum_dtype, "", ""),
    ("mean", reduce_mean, _mean_vjp, float_result, "", ""),
    ("max", reduce_max, _max_vjp, _same_dtype, "x ans", "ties share equally"),
    ("logsumexp", logsumexp, _logsumexp_vjp, float_result, "x ans", "stable for inputs of ±1000"),
    ("reduce_min", reduce_min, _min_vjp, _same_dtype, "x ans", "ties share equally (torch.amin)"),
    ("reduce_prod", reduce_prod, _prod_vjp, _sum_dtype, "x", "exact with zeros: one zero gets the product of the rest"),
    ("reduce_l1", reduce_l1, _l1_vjp, _sum_dtype, "x", "sum of abs; gradient sign(x), 0 at 0 and at NaN (as abs)"),
    (
        "reduce_l2",
        reduce_l2,
        _l2_vjp,
        float_result,
        "x ans",
        "sqrt of the sum of squares; gradient 0 where the norm is 0",
    ),
    ("reduce_sum_square", reduce_sum_square, _sum_square_vjp, _sum_dtype, "x", ""),
]
for _name, _forward, _vjp, _dtype_rule, _reads, _convention in REDUCTIONS:
    defop(
        _name,
        _forward,
        _vjp,
        None,
        infer=_reduce_type(_dtype_rule),
        attrs=REDUCE_ATTRS,
        reads=(f"{_reads} 1", ""),
        min_arity=1,
        inputs="x, axes?",
        convention=_convention,
    )
