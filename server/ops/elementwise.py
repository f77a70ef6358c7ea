"""Elementwise ops: arithmetic with numpy broadcasting, unary math and activations.

Every binary op's gradient is summed back to its operand's shape (`unbroadcast`). Binary
arithmetic uses Python's operators, which numpy maps onto the same ufuncs but reaches faster
for scalars. Conventions at kinks follow PyTorch: `relu` and `abs` have gradient 0 at 0, and
ties in `maximum` and `minimum` share the gradient equally.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np

from chainrule.server.ops.registry import Array, defop, unbroadcast
from chainrule.server.shapes import TensorType, broadcast_shapes, float_result


def joint_dtype(x: TensorType, y: TensorType) -> np.dtype | None:
    return None if x.dtype is None or y.dtype is None else np.result_type(x.dtype, y.dtype)


def binary_type(x: TensorType, y: TensorType) -> TensorType:
    return TensorType(joint_dtype(x, y), broadcast_shapes(x.shape, y.shape))


def floatbinary_type(x: TensorType, y: TensorType) -> TensorType:
    joined = binary_type(x, y)
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
    infer=binary_type,
    reads=("", ""),
)
defop(
    "sub",
    operator.sub,
    lambda g, ans, x, y: unbroadcast(g, x.shape),
    lambda g, ans, x, y: unbroadcast(-g, y.shape),
    infer=binary_type,
    reads=("", ""),
)
defop(
    "mul",
    operator.mul,
    lambda g, ans, x, y: unbroadcast(g * y, x.shape),
    lambda g, ans, x, y: unbroadcast(g * x, y.shape),
    infer=binary_type,
    reads=("y", "x"),
)
defop(
    "div",
    operator.truediv,
    lambda g, ans, x, y: unbroadcast(g / y, x.shape),
    lambda g, ans, x, y: unbroadcast(-g * ans / y, y.shape),
    infer=floatbinary_type,
    reads=("y", "y ans"),
)


def power(x: Array, y: Array) -> Array:
    """x ** y; numpy computes bool ** bool in int8, which the wire lacks: its 0s and 1s stay bool, as the shape
    rule says."""
    out = x**y
    return out.astype(np.bool_) if out.dtype == np.int8 else out


defop("pow", power, _pow_x, _pow_y, infer=binary_type, reads=("x y", "x y ans"))
defop(
    "maximum",
    np.maximum,
    lambda g, ans, x, y: unbroadcast(_winner_share(g, x > y, x == y), x.shape),
    lambda g, ans, x, y: unbroadcast(_winner_share(g, y > x, x == y), y.shape),
    infer=binary_type,
    reads=("x y", "x y"),
)
defop(
    "minimum",
    np.minimum,
    lambda g, ans, x, y: unbroadcast(_winner_share(g, x < y, x == y), x.shape),
    lambda g, ans, x, y: unbroadcast(_winner_share(g, y < x, x == y), y.shape),
    infer=binary_type,
    reads=("x y", "x y"),
)


# ---------------------------------------------------------------- unary elementwise
def same_type(x: TensorType) -> TensorType:
    return x


def float_type(x: TensorType) -> TensorType:
    return TensorType(float_result(x.dtype), x.shape)


def sigmoid(x: Array) -> Array:
    """1 / (1 + exp(-x)): exp overflowing to inf for x << 0 gives exactly 0, never NaN."""
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x: Array) -> Array:
    return np.logaddexp(0.0, x)


def log_sigmoid(x: Array) -> Array:
    return -np.logaddexp(0.0, -x)


def as_float(x: Array) -> Array:
    """A float argument itself, a bool or int one in float64 (which numpy cannot always negate or keep)."""
    return x if x.dtype.kind == "f" else x.astype(np.float64)


def float_argument(function: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """`function` of a bool or int argument taken in float64, as the shape rule says; numpy would
    compute exp, log, sqrt and tanh of bool in float16, a dtype the wire cannot carry, and
    cannot negate bool at all (sigmoid, log_sigmoid)."""

    def forward(x: Array) -> Array:
        return function(as_float(x))

    return forward


defop("neg", operator.neg, lambda g, ans, x: -g, infer=same_type, reads=("",))
defop("exp", float_argument(np.exp), lambda g, ans, x: g * ans, infer=float_type, reads=("ans",))
defop("log", float_argument(np.log), lambda g, ans, x: g / x, infer=float_type, reads=("x",))
defop("sqrt", float_argument(np.sqrt), lambda g, ans, x: g / (2 * ans), infer=float_type, reads=("ans",))
defop("abs", np.abs, lambda g, ans, x: g * np.sign(x), infer=same_type, reads=("x",))
defop("square", lambda x: x * x, lambda g, ans, x: g * 2 * x, infer=same_type, reads=("x",))
defop("sigmoid", float_argument(sigmoid), lambda g, ans, x: g * ans * (1 - ans), infer=float_type, reads=("ans",))
defop("tanh", float_argument(np.tanh), lambda g, ans, x: g * (1 - ans * ans), infer=float_type, reads=("ans",))
defop("relu", lambda x: np.maximum(x, 0), lambda g, ans, x: g * (x > 0), infer=same_type, reads=("x",))
defop("softplus", softplus, lambda g, ans, x: g * sigmoid(x), infer=float_type, reads=("x",))
defop("log_sigmoid", float_argument(log_sigmoid), lambda g, ans, x: g * sigmoid(-x), infer=float_type, reads=("x",))
