"""Elementwise ops: arithmetic with numpy broadcasting, unary math and activations.

Every binary op's gradient is summed back to its operand's shape (`unbroadcast`). Binary
arithmetic uses Python's operators, which numpy maps onto the same ufuncs but reaches faster
for scalars. Values and gradients at kinks, ties, NaN and infinities follow PyTorch's
(derivatives.yaml and its backward kernels), so a model compares with its PyTorch original
even where the maths leaves a choice: the comparisons that pick a branch are written as
PyTorch's are (`x <= 0` for relu and elu, `x > 0` for leaky_relu and prelu), which decides
where a NaN goes, and masks are applied with `np.where`, so a NaN or infinite incoming
gradient never leaks into an element whose gradient is 0.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from types import ModuleType

import numpy as np

from chainrule.server.ops.registry import Array, Attr, defop, unbroadcast
from chainrule.server.shapes import DtypeError, ShapeError, TensorType, broadcast_shapes, float_result


def joint_dtype(x: TensorType, y: TensorType) -> np.dtype | None:
    return None if x.dtype is None or y.dtype is None else np.result_type(x.dtype, y.dtype)


def binary_type(x: TensorType, y: TensorType) -> TensorType:
    return TensorType(joint_dtype(x, y), broadcast_shapes(x.shape, y.shape))


def floatbinary_type(x: TensorType, y: TensorType) -> TensorType:
    joined = binary_type(x, y)
    return TensorType(float_result(joined.dtype), joined.shape)


def is_bool(x: TensorType) -> bool:
    return x.dtype is not None and x.dtype == np.bool_


def _sub_type(x: TensorType, y: TensorType) -> TensorType:
    if is_bool(x) and is_bool(y):
        raise DtypeError("sub of two bool arguments is not defined (as in numpy and PyTorch); use logical_xor")
    return binary_type(x, y)


def _pow_x(g: Array, ans: Array, x: Array, y: Array) -> Array:
    return unbroadcast(np.where(y == 0, 0.0, g * y * np.power(x, y - 1)), x.shape)


def _pow_y(g: Array, ans: Array, x: Array, y: Array) -> Array:
    return unbroadcast(g * np.where((x == 0) & (y >= 0), 0.0, ans * np.log(x)), y.shape)


def _winner_share(g: Array, loses: Array, ties: Array) -> Array:
    """PyTorch's maximum/minimum gradient: all of `g` to a winner, half to each side of a tie, none to a loser.
    A NaN operand neither wins, ties nor loses, so both operands get all of `g`."""
    return np.where(loses, 0.0, np.where(ties, g * 0.5, g))


defop(
    "add",
    operator.add,
    lambda g, ans, x, y: unbroadcast(g, x.shape),
    lambda g, ans, x, y: unbroadcast(g, y.shape),
    infer=binary_type,
    reads=("", ""),
    inputs="x, y",
)
defop(
    "sub",
    operator.sub,
    lambda g, ans, x, y: unbroadcast(g, x.shape),
    lambda g, ans, x, y: unbroadcast(-g, y.shape),
    infer=_sub_type,
    reads=("", ""),
    inputs="x, y",
    convention="two bool arguments: DTYPE_MISMATCH",
)
defop(
    "mul",
    operator.mul,
    lambda g, ans, x, y: unbroadcast(g * y, x.shape),
    lambda g, ans, x, y: unbroadcast(g * x, y.shape),
    infer=binary_type,
    reads=("y", "x"),
    inputs="x, y",
)
defop(
    "div",
    operator.truediv,
    lambda g, ans, x, y: unbroadcast(g / y, x.shape),
    lambda g, ans, x, y: unbroadcast(-g * ans / y, y.shape),
    infer=floatbinary_type,
    reads=("y", "y ans"),
    inputs="x, y",
)


def power(x: Array, y: Array) -> Array:
    """x ** y; numpy computes bool ** bool in int8, which the wire lacks: its 0s and 1s stay bool, as the shape
    rule says. Integers to negative integer powers are refused, as numpy and PyTorch refuse them."""
    if y.dtype.kind in "iu" and x.dtype.kind in "biu" and np.any(y < 0):
        raise DtypeError(
            f"an integer ({x.dtype}) to a negative integer power is not defined; make the base a float (cast)"
        )
    out = x**y
    return out.astype(np.bool_) if out.dtype == np.int8 else out


defop(
    "pow",
    power,
    _pow_x,
    _pow_y,
    infer=binary_type,
    reads=("x y", "x y ans"),
    inputs="x, y",
    convention="d/dx = 0 where y = 0; d/dy = 0 where x = 0 and y >= 0",
)
defop(
    "maximum",
    np.maximum,
    lambda g, ans, x, y: unbroadcast(_winner_share(g, x < y, x == y), x.shape),
    lambda g, ans, x, y: unbroadcast(_winner_share(g, y < x, x == y), y.shape),
    infer=binary_type,
    reads=("x y", "x y"),
    inputs="x, y",
    convention="ties split the gradient equally; a NaN operand gives both all of it",
)
defop(
    "minimum",
    np.minimum,
    lambda g, ans, x, y: unbroadcast(_winner_share(g, x > y, x == y), x.shape),
    lambda g, ans, x, y: unbroadcast(_winner_share(g, y > x, x == y), y.shape),
    infer=binary_type,
    reads=("x y", "x y"),
    inputs="x, y",
    convention="ties split the gradient equally; a NaN operand gives both all of it",
)
defop(
    "prelu",
    lambda x, slope: np.where(x > 0, as_float(x), as_float(slope) * x),
    lambda g, ans, x, slope: unbroadcast(np.where(x > 0, g, g * slope), x.shape),
    lambda g, ans, x, slope: unbroadcast(np.where(x > 0, 0.0, g * x), slope.shape),
    infer=floatbinary_type,
    reads=("x y", "x"),
    inputs="x, slope",
    convention="slope broadcasts against x; slope's gradient where x <= 0 (NaN x included)",
)


# ---------------------------------------------------------------- unary elementwise
def same_type(x: TensorType, **attrs: object) -> TensorType:
    """The type of an op whose attrs (if any) change neither dtype nor shape; likewise float_type, bool_type."""
    return x


def float_type(x: TensorType, **attrs: object) -> TensorType:
    return TensorType(float_result(x.dtype), x.shape)


def bool_type(x: TensorType, **attrs: object) -> TensorType:
    return TensorType(np.dtype(np.bool_), x.shape)


def _neg_type(x: TensorType) -> TensorType:
    if is_bool(x):
        raise DtypeError("neg of a bool argument is not defined (as in numpy and PyTorch); use logical_not")
    return x


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


def float_argument(function: Callable[..., Array]) -> Callable[..., Array]:
    """`function` of a bool or int argument taken in float64, as the shape rule says; numpy would
    compute exp, log, sqrt and tanh of bool in float16, a dtype the wire cannot carry, and
    cannot negate bool at all (sigmoid, log_sigmoid). Attrs pass through."""

    def forward(x: Array, **attrs: object) -> Array:
        return function(as_float(x), **attrs)

    return forward


def sign(x: Array) -> Array:
    """-1, 0 or 1, and 0 at NaN as PyTorch's sign (numpy's is NaN there); bool stays bool."""
    if x.dtype == np.bool_:
        return x
    return np.where(np.isnan(x), 0, np.sign(x)) if x.dtype.kind == "f" else np.sign(x)


def _integral(function: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """floor, ceil or round of floats; ints and bools are integral already and keep their dtype (as in PyTorch)."""

    def forward(x: Array) -> Array:
        return function(x) if x.dtype.kind == "f" else x

    return forward


def relu(x: Array) -> Array:
    return x if x.dtype == np.bool_ else np.maximum(x, 0)


def _relu_vjp(g: Array, ans: Array, x: Array) -> Array:
    """g where x > 0 or x is NaN, else 0 (even where g is NaN). For floats, g's bits ANDed with a mask of
    all ones or all zeros: exactly np.where(x <= 0, 0, g), and eight times faster on a 28x28 feature map,
    where np.where's branch on a mask whose sign changes at random costs more than the arithmetic."""
    if g.dtype.kind != "f" or g.shape != x.shape:
        return np.where(x <= 0, 0.0, g)
    keep = np.empty_like(g, dtype=np.dtype(f"u{g.itemsize}"))
    np.less_equal(x, 0, out=keep)
    keep -= 1
    return np.bitwise_and(g.view(keep.dtype), keep, out=keep).view(g.dtype)


@functools.cache
def _special() -> ModuleType:
    """scipy.special, imported when erf or gelu first runs: importing it costs a third of a second,
    which every server start would otherwise pay."""
    import scipy.special

    return scipy.special


def erf(x: Array) -> Array:
    return _special().erf(x)


TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715
SELU_ALPHA = 1.67326319217681884765625
SELU_GAMMA = 1.05070102214813232421875


def gelu(x: Array, approximate: str = "none") -> Array:
    """x * Phi(x), Phi the standard normal CDF (scipy's ndtr keeps its left tail accurate), or PyTorch's tanh
    approximation."""
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)))
    return x * _special().ndtr(x)


def _gelu_vjp(g: Array, ans: Array, x: Array, approximate: str = "none") -> Array:
    """PyTorch's gelu_backward, term for term: NaN at +-inf, where x times the vanishing density is inf * 0."""
    if approximate == "tanh":
        inner = np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x))
        slope = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x)
        return g * (0.5 * (1.0 + inner) + 0.5 * x * (1.0 - inner * inner) * slope)
    return g * (_special().ndtr(x) + x * INV_SQRT_2PI * np.exp(-0.5 * x * x))


def _gelu_type(x: TensorType, approximate: str = "none") -> TensorType:
    if approximate not in ("none", "tanh"):
        raise ShapeError(f"attr 'approximate' is '{approximate}'; expected 'none' or 'tanh'")
    return float_type(x)


def elu(x: Array, alpha: float = 1.0) -> Array:
    """PyTorch's branch test, x <= 0, so NaN takes the linear branch; expm1 of min(x, 0) never overflows."""
    return np.where(x <= 0, alpha * np.expm1(np.minimum(x, 0)), x)


def _elu_vjp(g: Array, ans: Array, x: Array, alpha: float = 1.0) -> Array:
    return np.where(x <= 0, g * alpha * np.exp(np.minimum(x, 0)), g)


def selu(x: Array, alpha: float = SELU_ALPHA, gamma: float = SELU_GAMMA) -> Array:
    return gamma * elu(x, alpha)


def _selu_vjp(g: Array, ans: Array, x: Array, alpha: float = SELU_ALPHA, gamma: float = SELU_GAMMA) -> Array:
    return gamma * _elu_vjp(g, ans, x, alpha)


def leaky_relu(x: Array, alpha: float = 0.01) -> Array:
    return np.where(x > 0, x, alpha * x)


def hard_sigmoid(x: Array, alpha: float = 0.2, beta: float = 0.5) -> Array:
    return np.minimum(np.maximum(alpha * x + beta, 0.0), 1.0)


def _hard_sigmoid_vjp(g: Array, ans: Array, x: Array, alpha: float = 0.2, beta: float = 0.5) -> Array:
    """alpha strictly between the kinks, 0 at them and outside, as PyTorch's hardsigmoid (also 0 at NaN)."""
    return np.where((ans > 0) & (ans < 1), g * alpha, 0.0)


def silu(x: Array) -> Array:
    return x * sigmoid(x)


def _silu_vjp(g: Array, ans: Array, x: Array) -> Array:
    """PyTorch's silu_backward: s (1 + x (1 - s)), NaN at +-inf as there."""
    s = sigmoid(x)
    return g * s * (1.0 + x * (1.0 - s))


def softsign(x: Array) -> Array:
    """x / (1 + |x|) as PyTorch computes it, NaN at +-inf (inf / inf)."""
    return x / (1.0 + np.abs(x))


def _softsign_vjp(g: Array, ans: Array, x: Array) -> Array:
    """1 / (1 + |x|)^2, and NaN wherever the value is NaN (x infinite), as autograd through PyTorch's quotient."""
    return np.where(np.isnan(ans), np.nan, g / np.square(1.0 + np.abs(x)))


def isinf(x: Array, detect_positive: bool = True, detect_negative: bool = True) -> Array:
    if x.dtype.kind != "f" or not (detect_positive or detect_negative):
        return np.zeros(x.shape, np.bool_)
    if detect_positive and detect_negative:
        return np.isinf(x)
    return np.isposinf(x) if detect_positive else np.isneginf(x)


def isnan(x: Array) -> Array:
    return np.isnan(x) if x.dtype.kind == "f" else np.zeros(x.shape, np.bool_)


defop(
    "neg",
    operator.neg,
    lambda g, ans, x: -g,
    infer=_neg_type,
    reads=("",),
    inputs="x",
    convention="bool: DTYPE_MISMATCH",
)
defop("exp", float_argument(np.exp), lambda g, ans, x: g * ans, infer=float_type, reads=("ans",), inputs="x")
defop("log", float_argument(np.log), lambda g, ans, x: g / x, infer=float_type, reads=("x",), inputs="x")
defop("sqrt", float_argument(np.sqrt), lambda g, ans, x: g / (2 * ans), infer=float_type, reads=("ans",), inputs="x")
defop(
    "abs",
    np.abs,
    lambda g, ans, x: g * sign(x),
    infer=same_type,
    reads=("x",),
    inputs="x",
    convention="0 at 0 and at NaN",
)
defop("square", lambda x: x * x, lambda g, ans, x: g * 2 * x, infer=same_type, reads=("x",), inputs="x")
defop(
    "sigmoid",
    float_argument(sigmoid),
    lambda g, ans, x: g * ans * (1 - ans),
    infer=float_type,
    reads=("ans",),
    inputs="x",
    convention="stable for |x| of 1000",
)
defop(
    "tanh", float_argument(np.tanh), lambda g, ans, x: g * (1 - ans * ans), infer=float_type, reads=("ans",), inputs="x"
)
defop(
    "relu",
    relu,
    _relu_vjp,
    infer=same_type,
    reads=("x",),
    inputs="x",
    convention="0 at 0; NaN passes the gradient",
)
defop(
    "softplus",
    softplus,
    lambda g, ans, x: g * sigmoid(x),
    infer=float_type,
    reads=("x",),
    inputs="x",
    convention="stable for |x| of 1000",
)
defop(
    "log_sigmoid",
    float_argument(log_sigmoid),
    lambda g, ans, x: g * sigmoid(-x),
    infer=float_type,
    reads=("x",),
    inputs="x",
    convention="stable for |x| of 1000",
)
defop(
    "erf",
    float_argument(erf),
    lambda g, ans, x: g * TWO_OVER_SQRT_PI * np.exp(-x * x),
    infer=float_type,
    reads=("x",),
    inputs="x",
)
defop("sin", float_argument(np.sin), lambda g, ans, x: g * np.cos(x), infer=float_type, reads=("x",), inputs="x")
defop("cos", float_argument(np.cos), lambda g, ans, x: -g * np.sin(x), infer=float_type, reads=("x",), inputs="x")
defop(
    "reciprocal",
    float_argument(np.reciprocal),
    lambda g, ans, x: -g * ans * ans,
    infer=float_type,
    reads=("ans",),
    inputs="x",
    convention="1/0 = inf, gradient -inf",
)
ZERO_GRADIENT = "gradient 0 everywhere (no gradient flows)"
defop("floor", _integral(np.floor), None, infer=same_type, reads=("",), inputs="x", convention=ZERO_GRADIENT)
defop("ceil", _integral(np.ceil), None, infer=same_type, reads=("",), inputs="x", convention=ZERO_GRADIENT)
defop(
    "round",
    _integral(np.rint),
    None,
    infer=same_type,
    reads=("",),
    inputs="x",
    convention=f"half to even; {ZERO_GRADIENT}",
)
defop("sign", sign, None, infer=same_type, reads=("",), inputs="x", convention=f"sign(NaN) = 0; {ZERO_GRADIENT}")
defop(
    "leaky_relu",
    float_argument(leaky_relu),
    lambda g, ans, x, alpha: np.where(x > 0, g, g * alpha),
    infer=float_type,
    attrs={"alpha": Attr("f", 0.01)},
    reads=("x",),
    inputs="x",
    convention="alpha at 0 and at NaN",
)
defop(
    "elu",
    float_argument(elu),
    _elu_vjp,
    infer=float_type,
    attrs={"alpha": Attr("f", 1.0)},
    reads=("x",),
    inputs="x",
    convention="alpha at 0; 1 at NaN",
)
defop(
    "selu",
    float_argument(selu),
    _selu_vjp,
    infer=float_type,
    attrs={"alpha": Attr("f", SELU_ALPHA), "gamma": Attr("f", SELU_GAMMA)},
    reads=("x",),
    inputs="x",
    convention="gamma * alpha at 0; gamma at NaN",
)
defop(
    "gelu",
    float_argument(gelu),
    _gelu_vjp,
    infer=_gelu_type,
    attrs={"approximate": Attr("s", "none")},
    reads=("x",),
    inputs="x",
    convention="NaN at +-inf, as PyTorch",
)
defop(
    "silu",
    float_argument(silu),
    _silu_vjp,
    infer=float_type,
    reads=("x",),
    inputs="x",
    convention="NaN at +-inf, as PyTorch",
)
defop(
    "softsign",
    float_argument(softsign),
    _softsign_vjp,
    infer=float_type,
    reads=("x ans",),
    inputs="x",
    convention="NaN at +-inf, as PyTorch",
)
defop(
    "hard_sigmoid",
    float_argument(hard_sigmoid),
    _hard_sigmoid_vjp,
    infer=float_type,
    attrs={"alpha": Attr("f", 0.2), "beta": Attr("f", 0.5)},
    reads=("ans",),
    inputs="x",
    convention="max(0, min(1, alpha x + beta)); alpha strictly between the kinks, 0 at them",
)
defop("isnan", isnan, None, infer=bool_type, reads=("",), inputs="x", convention="bool result: no gradient")
defop(
    "isinf",
    isinf,
    None,
    infer=bool_type,
    attrs={"detect_positive": Attr("b", True), "detect_negative": Attr("b", True)},
    reads=("",),
    inputs="x",
    convention="bool result: no gradient",
)


# ---------------------------------------------------------------- clip
def _clip_bounds(
    bounds: tuple[Array, ...], low: float | None, high: float | None
) -> tuple[Array | float | None, Array | float | None]:
    """Tensor bounds override the attrs: clip(x, min) keeps attr max, clip(x, min, max) takes neither attr."""
    return (bounds[0] if bounds else low), (bounds[1] if len(bounds) > 1 else high)


def clip(x: Array, *bounds: Array, min: float | None = None, max: float | None = None) -> Array:
    """max(min(x, high), low) as torch.clamp: high wins where low > high; NaN anywhere gives NaN."""
    low, high = _clip_bounds(bounds, min, max)
    out = x
    if low is not None:
        out = np.maximum(out, low)
    if high is not None:
        out = np.minimum(out, high)
    return out


def _clip_x(
    g: Array, ans: Array, x: Array, *bounds: Array, min: float | None = None, max: float | None = None
) -> Array:
    low, high = _clip_bounds(bounds, min, max)
    inside = np.ones(g.shape, np.bool_)
    if low is not None:
        inside = inside & (x >= low)
    if high is not None:
        inside = inside & (x <= high)
    return unbroadcast(np.where(inside, g, 0.0), x.shape)


def _clip_min(
    g: Array, ans: Array, x: Array, *bounds: Array, min: float | None = None, max: float | None = None
) -> Array:
    low, high = _clip_bounds(bounds, min, max)
    below = x < low
    if high is not None:
        below = below & (low < high)
    return unbroadcast(np.where(below, g, 0.0), bounds[0].shape)


def _clip_max(
    g: Array, ans: Array, x: Array, *bounds: Array, min: float | None = None, max: float | None = None
) -> Array:
    low, high = _clip_bounds(bounds, min, max)
    return unbroadcast(np.where((x > high) | (high < low), g, 0.0), bounds[1].shape)


def _clip_type(x: TensorType, *bounds: TensorType, min: float | None = None, max: float | None = None) -> TensorType:
    """Tensor bounds broadcast and promote as in numpy; a float attr bound makes an int or bool x float64
    (as torch.clamp promotes an int tensor with float bounds)."""
    shape = x.shape
    for bound in bounds:
        shape = broadcast_shapes(shape, bound.shape)
    dtypes = [x.dtype, *(bound.dtype for bound in bounds)]
    dtype = None if any(dtype is None for dtype in dtypes) else np.result_type(*dtypes)
    if (min is not None and not bounds) or (max is not None and len(bounds) < 2):
        dtype = float_result(dtype)
    return TensorType(dtype, shape)


defop(
    "clip",
    clip,
    _clip_x,
    _clip_min,
    _clip_max,
    infer=_clip_type,
    attrs={"min": Attr("f"), "max": Attr("f")},
    min_arity=1,
    reads=("x y z", "x y z", "x y z"),
    inputs="x, min?, max?",
    convention="x's gradient where min <= x <= max (inclusive); min's where x < min; max's where x > max "
    "or max < min (the result is max)",
)
