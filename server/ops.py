"""The op registry: every op's forward computation, its vector-Jacobian products and its shape rule, side by side.

A VJP takes the incoming gradient `g`, the op's output `ans` and the op's arguments, and
returns the gradient with respect to one argument, already summed back to that argument's
shape. The plan calls only the VJPs of arguments that need a gradient. Each op also declares
which values its VJPs read (`reads`); the others may reach a VJP as zero-strided stand-ins
that keep only shape and dtype.

An op that `saves` returns (value, residual) from its forward function, and its VJPs receive
the residual where other ops' VJPs receive `ans` (and "ans" in its `reads` means the residual):
work the forward pass already did for the gradient, such as the log-softmax inside a
cross-entropy, is kept instead of being done again.

Binary arithmetic uses Python's operators, which numpy maps onto the same ufuncs but reaches
faster for scalars.

Conventions at kinks follow PyTorch: `relu` and `abs` have gradient 0 at 0, and ties in
`maximum`, `minimum` and `max` share the gradient equally.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chainrule.server.shapes import (
    Shape,
    ShapeError,
    TensorType,
    broadcast_shapes,
    float_result,
    matmul_shape,
    normalize_axes,
    normalize_axis,
    reduce_shape,
    reshape_shape,
    same_shape,
    transpose_shape,
)

Array = np.ndarray
Forward = Callable[..., Any]
Vjp = Callable[..., Any]
Infer = Callable[..., TensorType]


@dataclass(frozen=True)
class Attr:
    """An attribute an op accepts: its AttrValue kind (i, f, s, b, ints, floats) and default."""

    kind: str
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class Op:
    name: str
    arity: int
    forward: Forward | None
    vjps: tuple[Vjp, ...]
    infer: Infer | None
    reads: tuple[frozenset[int], ...] = ()
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    saves: bool = False

    @property
    def is_source(self) -> bool:
        return self.forward is None


OPS: dict[str, Op] = {}


ANS = -1
"""In `Op.reads`, the position that stands for the op's own output."""


def defop(
    name: str,
    forward: Forward,
    *vjps: Vjp,
    infer: Infer,
    reads: Sequence[str],
    attrs: Mapping[str, Attr] | None = None,
    saves: bool = False,
) -> None:
    """Register an op. `reads[i]` names the values the i-th VJP uses beyond their shapes
    ("ans", "x", "y"), so the plan can release every other value as soon as the forward pass
    is done with it."""
    positions = {"ans": ANS, "x": 0, "y": 1}
    read_sets = tuple(frozenset(positions[word] for word in spec.split()) for spec in reads)
    assert len(read_sets) == len(vjps), name
    OPS[name] = Op(name, len(vjps), forward, vjps, infer, read_sets, attrs or {}, saves)


def unbroadcast(g: Array, shape: Shape) -> Array:
    """Sum `g` over the axes that broadcasting added or stretched, so it has `shape` again."""
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    stretched = tuple(axis for axis, size in enumerate(shape) if size == 1 and g.shape[axis] != 1)
    if stretched:
        g = g.sum(axis=stretched, keepdims=True)
    return g


# ---------------------------------------------------------------- sources
SOURCE_ATTRS = {"input": {"dtype": Attr("s"), "shape": Attr("ints")}, "parameter": {}, "constant": {}}
for _source, _attrs in SOURCE_ATTRS.items():
    OPS[_source] = Op(_source, 0, None, (), None, (), _attrs)


# ---------------------------------------------------------------- binary elementwise
def _joint_dtype(x: TensorType, y: TensorType) -> np.dtype | None:
    return None if x.dtype is None or y.dtype is None else np.result_type(x.dtype, y.dtype)


def _binary_type(x: TensorType, y: TensorType) -> TensorType:
    return TensorType(_joint_dtype(x, y), broadcast_shapes(x.shape, y.shape))


def _float_binary_type(x: TensorType, y: TensorType) -> TensorType:
    joined = _binary_type(x, y)
    return TensorType(float_result(joined.dtype), joined.shape)


def _pow_x(g: Array, ans: Array, x: Array, y: Array) -> Array:
    return unbroadcast(np.where(y == 0, 0.0, g * y * np.power(x, y - 1)), x.shape)


def _pow_y(g: Array, ans: Array, x: Array, y: Array) -> Array:
    return unbroadcast(g * np.where((x == 0) & (y >= 0), 0.0, ans * np.log(x)), y.shape)


def _winner_share(g: Array, wins: Array, ties: Array) -> Array:
    return g * wins + g * 0.5 * ties


defop(
    "add",
    operator.add,
    lambda g, ans, x, y: unbroadcast(g, x.shape),
    lambda g, ans, x, y: unbroadcast(g, y.shape),
    infer=_binary_type,
    reads=("", ""),
)
defop(
    "sub",
    operator.sub,
    lambda g, ans, x, y: unbroadcast(g, x.shape),
    lambda g, ans, x, y: unbroadcast(-g, y.shape),
    infer=_binary_type,
    reads=("", ""),
)
defop(
    "mul",
    operator.mul,
    lambda g, ans, x, y: unbroadcast(g * y, x.shape),
    lambda g, ans, x, y: unbroadcast(g * x, y.shape),
    infer=_binary_type,
    reads=("y", "x"),
)
defop(
    "div",
    operator.truediv,
    lambda g, ans, x, y: unbroadcast(g / y, x.shape),
    lambda g, ans, x, y: unbroadcast(-g * ans / y, y.shape),
    infer=_float_binary_type,
    reads=("y", "y ans"),
)


def power(x: Array, y: Array) -> Array:
    """x ** y; numpy computes bool ** bool in int8, which the wire lacks: its 0s and 1s stay bool, as the shape
    rule says."""
    out = x**y
    return out.astype(np.bool_) if out.dtype == np.int8 else out


defop("pow", power, _pow_x, _pow_y, infer=_binary_type, reads=("x y", "x y ans"))
defop(
    "maximum",
    np.maximum,
    lambda g, ans, x, y: unbroadcast(_winner_share(g, x > y, x == y), x.shape),
    lambda g, ans, x, y: unbroadcast(_winner_share(g, y > x, x == y), y.shape),
    infer=_binary_type,
    reads=("x y", "x y"),
)
defop(
    "minimum",
    np.minimum,
    lambda g, ans, x, y: unbroadcast(_winner_share(g, x < y, x == y), x.shape),
    lambda g, ans, x, y: unbroadcast(_winner_share(g, y < x, x == y), y.shape),
    infer=_binary_type,
    reads=("x y", "x y"),
)


# ---------------------------------------------------------------- unary elementwise
def _same_type(x: TensorType) -> TensorType:
    return x


def _float_type(x: TensorType) -> TensorType:
    return TensorType(float_result(x.dtype), x.shape)


def sigmoid(x: Array) -> Array:
    """1 / (1 + exp(-x)): exp overflowing to inf for x << 0 gives exactly 0, never NaN."""
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x: Array) -> Array:
    return np.logaddexp(0.0, x)


def log_sigmoid(x: Array) -> Array:
    return -np.logaddexp(0.0, -x)


def _as_float(x: Array) -> Array:
    """A float argument itself, a bool or int one in float64 (which numpy cannot always negate or keep)."""
    return x if x.dtype.kind == "f" else x.astype(np.float64)


def _float_argument(function: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """`function` of a bool or int argument taken in float64, as the shape rule says; numpy would
    compute exp, log, sqrt and tanh of bool in float16, a dtype the wire cannot carry, and
    cannot negate bool at all (sigmoid, log_sigmoid)."""

    def forward(x: Array) -> Array:
        return function(_as_float(x))

    return forward


defop("neg", operator.neg, lambda g, ans, x: -g, infer=_same_type, reads=("",))
defop("exp", _float_argument(np.exp), lambda g, ans, x: g * ans, infer=_float_type, reads=("ans",))
defop("log", _float_argument(np.log), lambda g, ans, x: g / x, infer=_float_type, reads=("x",))
defop("sqrt", _float_argument(np.sqrt), lambda g, ans, x: g / (2 * ans), infer=_float_type, reads=("ans",))
defop("abs", np.abs, lambda g, ans, x: g * np.sign(x), infer=_same_type, reads=("x",))
defop("square", lambda x: x * x, lambda g, ans, x: g * 2 * x, infer=_same_type, reads=("x",))
defop("sigmoid", _float_argument(sigmoid), lambda g, ans, x: g * ans * (1 - ans), infer=_float_type, reads=("ans",))
defop("tanh", _float_argument(np.tanh), lambda g, ans, x: g * (1 - ans * ans), infer=_float_type, reads=("ans",))
defop("relu", lambda x: np.maximum(x, 0), lambda g, ans, x: g * (x > 0), infer=_same_type, reads=("x",))
defop("softplus", softplus, lambda g, ans, x: g * sigmoid(x), infer=_float_type, reads=("x",))
defop("log_sigmoid", _float_argument(log_sigmoid), lambda g, ans, x: g * sigmoid(-x), infer=_float_type, reads=("x",))


# ---------------------------------------------------------------- matmul
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
    return TensorType(_joint_dtype(a, b), matmul_shape(a.shape, b.shape))


defop("matmul", np.matmul, _matmul_a, _matmul_b, infer=_matmul_type, reads=("y", "x"))


# ---------------------------------------------------------------- reductions
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


# ---------------------------------------------------------------- shape ops
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


# ---------------------------------------------------------------- softmax family and losses
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
    return _float_type(x)


AXIS_ATTRS = {"axis": Attr("i", default=-1)}
defop("softmax", softmax, _softmax_vjp, infer=_axis_type, attrs=AXIS_ATTRS, reads=("ans",))
defop("log_softmax", log_softmax, _log_softmax_vjp, infer=_axis_type, attrs=AXIS_ATTRS, reads=("ans",))


def _rows(logits: Array) -> int:
    return max(1, logits.size // max(1, logits.shape[-1]))


def softmax_cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Mean over rows (every axis but the last) of -sum(labels * log_softmax(logits)),
    saving the log-softmax for the VJPs."""
    log_probabilities = log_softmax(logits)
    return -(labels * log_probabilities).sum() / _rows(logits), log_probabilities


def _sce_logits(g: Array, log_probabilities: Array, logits: Array, labels: Array) -> Array:
    mass = labels.sum(axis=-1, keepdims=True)
    return (np.exp(log_probabilities) * mass - labels) * (g / _rows(logits))


def _sce_labels(g: Array, log_probabilities: Array, logits: Array, labels: Array) -> Array:
    return -log_probabilities * (g / _rows(logits))


def _sce_type(logits: TensorType, labels: TensorType) -> TensorType:
    if logits.shape is not None and len(logits.shape) == 0:
        raise ShapeError("logits must have at least one axis (the classes)")
    same_shape(logits.shape, labels.shape, "logits", "labels")
    return TensorType(float_result(_joint_dtype(logits, labels)), ())


def sigmoid_cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean of softplus(x) - x * t, the binary cross-entropy of sigmoid(x) against t, stable for any x."""
    return np.mean(softplus(logits) - logits * targets)


def _bce_count(logits: Array, targets: Array) -> int:
    return int(np.prod(np.broadcast_shapes(np.shape(logits), np.shape(targets)), dtype=np.int64))


def _bce_logits(g: Array, ans: Array, logits: Array, targets: Array) -> Array:
    grad = (sigmoid(logits) - targets) * (g / _bce_count(logits, targets))
    return unbroadcast(grad, np.shape(logits))


def _bce_targets(g: Array, ans: Array, logits: Array, targets: Array) -> Array:
    grad = np.broadcast_to(-_as_float(logits), np.broadcast_shapes(np.shape(logits), np.shape(targets)))
    return unbroadcast(grad * (g / _bce_count(logits, targets)), np.shape(targets))


def _scalar_loss_type(x: TensorType, y: TensorType) -> TensorType:
    return TensorType(_float_binary_type(x, y).dtype, ())


defop(
    "softmax_cross_entropy",
    softmax_cross_entropy,
    _sce_logits,
    _sce_labels,
    infer=_sce_type,
    reads=("ans y", "ans"),
    saves=True,
)
defop(
    "sigmoid_cross_entropy",
    sigmoid_cross_entropy,
    _bce_logits,
    _bce_targets,
    infer=_scalar_loss_type,
    reads=("x y", "x"),
)
