"""Comparisons, logic on bools, `where` and `cast`.

Comparisons and logic give bool results, which pass no gradient. Logic takes bool arguments
only (as ONNX's And, Or, Xor, Not), and `where` a bool condition (as torch.where): numpy would
take any dtype's truth value, which hides a missing comparison. `where` routes the gradient to
the operand each element came from, with zeros (never g * 0, which is NaN for an infinite g)
for the other; `cast` hands the gradient back in its argument's float dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from chainrule import tensors
from chainrule.server.ops.registry import Array, Attr, defop, unbroadcast
from chainrule.server.shapes import DtypeError, TensorType, broadcast_shapes

BOOL = np.dtype(np.bool_)


def _comparison_type(x: TensorType, y: TensorType) -> TensorType:
    return TensorType(BOOL, broadcast_shapes(x.shape, y.shape))


def _require_bool(op: str, *arguments: TensorType | Array) -> None:
    for position, argument in enumerate(arguments):
        if argument.dtype is not None and argument.dtype != BOOL:
            raise DtypeError(
                f"{op} takes bool arguments; argument {position} has dtype {argument.dtype} "
                "(compare it first, e.g. not_equal(x, 0))"
            )


def _logic(op: str, function: Callable[..., Array]) -> Callable[..., Array]:
    """`function` refusing non-bool arguments at run time too, for inputs that declared no dtype."""

    def forward(*arguments: Array) -> Array:
        _require_bool(op, *arguments)
        return function(*arguments)

    return forward


def _logic_type(op: str) -> Callable[..., TensorType]:
    def infer(*arguments: TensorType) -> TensorType:
        _require_bool(op, *arguments)
        shape = arguments[0].shape
        for argument in arguments[1:]:
            shape = broadcast_shapes(shape, argument.shape)
        return TensorType(BOOL, shape)

    return infer


for name, compare in [
    ("equal", np.equal),
    ("not_equal", np.not_equal),
    ("less", np.less),
    ("less_equal", np.less_equal),
    ("greater", np.greater),
    ("greater_equal", np.greater_equal),
]:
    defop(
        name,
        compare,
        None,
        None,
        infer=_comparison_type,
        reads=("", ""),
        inputs="x, y",
        convention="bool result: no gradient; NaN compares unequal to everything",
    )
for name, combine in [("logical_and", np.logical_and), ("logical_or", np.logical_or), ("logical_xor", np.logical_xor)]:
    defop(
        name,
        _logic(name, combine),
        None,
        None,
        infer=_logic_type(name),
        reads=("", ""),
        inputs="x, y (bool)",
        convention="bool result: no gradient",
    )
defop(
    "logical_not",
    _logic("logical_not", np.logical_not),
    None,
    infer=_logic_type("logical_not"),
    reads=("",),
    inputs="x (bool)",
    convention="bool result: no gradient",
)


def where(condition: Array, x: Array, y: Array) -> Array:
    _require_where_condition(condition)
    return np.where(condition, x, y)


def _require_where_condition(condition: TensorType | Array) -> None:
    if condition.dtype is not None and condition.dtype != BOOL:
        raise DtypeError(f"where takes a bool condition, got {condition.dtype} (compare it first, e.g. x > 0)")


def _where_type(condition: TensorType, x: TensorType, y: TensorType) -> TensorType:
    _require_where_condition(condition)
    dtype = None if x.dtype is None or y.dtype is None else np.result_type(x.dtype, y.dtype)
    return TensorType(dtype, broadcast_shapes(condition.shape, broadcast_shapes(x.shape, y.shape)))


defop(
    "where",
    where,
    None,
    lambda g, ans, condition, x, y: unbroadcast(np.where(condition, g, 0), x.shape),
    lambda g, ans, condition, x, y: unbroadcast(np.where(condition, 0, g), y.shape),
    infer=_where_type,
    reads=("", "x", "x"),
    inputs="condition (bool), x, y",
    convention="x's gradient where the condition holds, y's elsewhere; none to the condition",
)


def cast(x: Array, dtype: str) -> Array:
    return x.astype(dtype, copy=False)


def _cast_type(x: TensorType, dtype: str) -> TensorType:
    if dtype not in tensors.DTYPE_NAMES:
        raise DtypeError(f"cast to '{dtype}': expected one of {', '.join(tensors.DTYPE_NAMES)}")
    return TensorType(np.dtype(dtype), x.shape)


defop(
    "cast",
    cast,
    lambda g, ans, x, dtype: g.astype(x.dtype, copy=False),
    infer=_cast_type,
    attrs={"dtype": Attr("s", required=True)},
    reads=("",),
    inputs="x",
    convention="the gradient cast back to x's dtype between float types; none to or from int and bool",
)
