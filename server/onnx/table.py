"""The ONNX ops the importer covers (at opset 21), and the chainrule ops each becomes.

Most ONNX ops are one native op whose attrs carry the ONNX attribute names (`Native`); inputs
that ONNX gives as tensors but chainrule takes as attrs (shapes, axes, pads...) become attrs
when their value is known at import time, and trailing tensor arguments otherwise. The rest are
small functions (`Composite`). The README's table of covered ops is generated from `TABLE`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx.numpy_helper
from onnx import ModelProto, NodeProto

from chainrule.server.onnx.importer import WIRE_DTYPE_OF_ONNX, Importer, node_label, unsupported_ops
from chainrule.server.onnx.model import ONNX_DOMAINS, element_type_name
from chainrule.server.ops import OPS


class Rule(Protocol):
    @property
    def config(self) -> frozenset[int]:
        """Input positions read as configuration (shapes, axes, ratios), not as data: an initializer
        read only there is a constant, never a trainable parameter."""

    def available(self) -> bool: ...

    def apply(self, ctx: Importer, node: NodeProto) -> None: ...

    def chainrule_ops(self) -> str: ...


# ---------------------------------------------------------------- attribute conversion
def float32_value(value: float) -> float:
    """An ONNX float attribute (stored as float32) as the shortest decimal that rounds to it: 0.9, not 0.8999999761."""
    return float(str(np.float32(value)))


def attr_from_onnx(ctx: Importer, name: str, value: Any, kind: str) -> Any:
    """An ONNX attribute's value as a native attr of `kind`."""
    if kind == "b" and isinstance(value, int):
        return bool(value)
    if kind == "i" and isinstance(value, int):
        return value
    if kind == "f" and isinstance(value, float | int):
        return float32_value(value)
    if kind == "s" and isinstance(value, bytes):
        return value.decode()
    if kind == "ints" and isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    if kind == "floats" and isinstance(value, list):
        return tuple(float32_value(v) for v in value)
    raise ctx.refuse(f"attribute '{name}' has a value chainrule cannot take ({value!r})")


def attr_from_array(ctx: Importer, name: str, value: np.ndarray, kind: str) -> Any:
    """A known input tensor's value as a native attr of `kind`."""
    if kind == "ints":
        return tuple(int(v) for v in value.reshape(-1))
    if kind == "floats":
        return tuple(float(v) for v in value.reshape(-1))
    if value.size != 1:
        raise ctx.refuse(f"input '{name}' must hold one value, got shape {list(value.shape)}")
    scalar = value.reshape(-1)[0]
    return {"i": int, "f": float, "b": bool}[kind](scalar)


def check_unused_outputs(ctx: Importer, node: NodeProto) -> None:
    """Refuse a node whose optional outputs beyond the first are read: those are not computed."""
    for position, output in enumerate(node.output):
        if position > 0 and ctx.is_used(output):
            raise ctx.refuse(f"output {position} ('{output}') is not supported; only the first output is computed")


def native_node(
    ctx: Importer,
    node: NodeProto,
    op: str,
    shaped: Mapping[int, str] = {},  # noqa: B006 (read only)
    ignore: frozenset[str] = frozenset(),
    defaults: Mapping[str, Any] = {},  # noqa: B006
    check_outputs: bool = True,
) -> str:
    """Emit `node` as one native op: data inputs in order, attributes by name, shape-like inputs
    (`shaped`: position -> attr) as attrs when known and as trailing tensor arguments otherwise."""
    accepted = OPS[op].attrs
    attrs = dict(defaults)
    for name, value in ctx.attributes(node).items():
        if name in ignore:
            continue
        spec = accepted.get(name)
        if spec is None:
            raise ctx.refuse(f"attribute '{name}' is not supported")
        attrs[name] = attr_from_onnx(ctx, name, value, spec.kind)
    inputs = list(node.input)
    data = [name for position, name in enumerate(inputs) if position not in shaped]
    while data and not data[-1]:
        data.pop()
    if "" in data:
        raise ctx.refuse(f"an omitted optional input before input '{data[-1]}' is not supported")
    arguments = [ctx.arg(name) for name in data]
    computed: list[int] = []
    for position, key in sorted(shaped.items()):
        name = inputs[position] if position < len(inputs) else ""
        known = ctx.value(name)
        if known is not None:
            if key not in accepted:
                raise ctx.refuse(f"chainrule's {op} has no attr '{key}' for input '{name}'")
            attrs[key] = attr_from_array(ctx, name, known, accepted[key].kind)
        elif name:
            computed.append(position)
    if computed:
        for position in sorted(shaped):
            if position > computed[-1]:
                break
            name = inputs[position] if position < len(inputs) else ""
            if not name:
                raise ctx.refuse(
                    f"input {position} is omitted while input {computed[-1]} is computed at run time; "
                    "give it explicitly"
                )
            arguments.append(ctx.arg(name))
    if check_outputs:
        check_unused_outputs(ctx, node)
    return ctx.emit(node.output[0], op, arguments, attrs)


# ---------------------------------------------------------------- rule kinds
@dataclass(frozen=True)
class Native:
    """One ONNX op = one native op, attributes by the same names."""

    op: str
    shaped: Mapping[int, str] = field(default_factory=dict)
    """ONNX input position -> the native attr it becomes when known at import time."""
    ignore: frozenset[str] = frozenset()
    """ONNX attributes with nothing to do here (a conv's kernel_shape, which the weight's shape gives)."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """ONNX defaults that differ from the native op's (keepdims is 1 in ONNX)."""

    @property
    def config(self) -> frozenset[int]:
        return frozenset(self.shaped)

    def available(self) -> bool:
        return self.op in OPS

    def apply(self, ctx: Importer, node: NodeProto) -> None:
        native_node(ctx, node, self.op, self.shaped, self.ignore, self.defaults)

    def chainrule_ops(self) -> str:
        return f"`{self.op}`"


@dataclass(frozen=True)
class Composite:
    """An ONNX op mapped by a function: several native ops, or one with converted attributes."""

    build: Callable[[Importer, NodeProto], None]
    ops: tuple[str, ...]
    """The native ops it may emit (all must be registered for the op to be covered)."""
    config: frozenset[int] = frozenset()
    describe: str = ""
    """The README's words, when the ops alone do not say it."""

    def available(self) -> bool:
        return all(op in OPS for op in self.ops)

    def apply(self, ctx: Importer, node: NodeProto) -> None:
        self.build(ctx, node)

    def chainrule_ops(self) -> str:
        return self.describe or ", ".join(f"`{op}`" for op in self.ops)


# ---------------------------------------------------------------- composite rules
def _inputs(node: NodeProto, count: int) -> list[str]:
    """The node's inputs padded with "" (omitted) to `count`."""
    return [*node.input, *[""] * (count - len(node.input))][:count]


def _outputs(node: NodeProto, count: int) -> list[str]:
    return [*node.output, *[""] * (count - len(node.output))][:count]


def _identity(ctx: Importer, node: NodeProto) -> None:
    x = node.input[0]
    ctx.emit(node.output[0], "cast", [ctx.arg(x)], {"dtype": ctx.dtype_name(x)})


def _constant(ctx: Importer, node: NodeProto) -> None:
    raise ctx.refuse("its value cannot be read (sparse constants are not supported)")


def _cast(ctx: Importer, node: NodeProto) -> None:
    to = ctx.attributes(node)["to"]
    dtype = WIRE_DTYPE_OF_ONNX.get(to)
    if dtype is None:
        raise ctx.refuse(f"casting to {element_type_name(to)} is not supported")
    ctx.emit(node.output[0], "cast", [ctx.arg(node.input[0])], {"dtype": dtype})


def _cast_like(ctx: Importer, node: NodeProto) -> None:
    ctx.emit(node.output[0], "cast", [ctx.arg(node.input[0])], {"dtype": ctx.dtype_name(node.input[1])})


def _constant_of_shape(ctx: Importer, node: NodeProto) -> None:
    fill = ctx.attributes(node).get("value")
    value = np.zeros((), np.float32) if fill is None else onnx.numpy_helper.to_array(fill).reshape(())
    out = node.output[0]
    ctx.emit(out, "expand", [ctx.constant(out, "value", value), ctx.arg(node.input[0])])


def _gemm(ctx: Importer, node: NodeProto) -> None:
    attributes = ctx.attributes(node)
    alpha, beta = float32_value(attributes.get("alpha", 1.0)), float32_value(attributes.get("beta", 1.0))
    a, b, c = _inputs(node, 3)
    out = node.output[0]
    dtype = ctx.type_of(a).dtype or np.dtype(np.float32)
    left, right = ctx.arg(a), ctx.arg(b)
    if attributes.get("transA", 0):
        left = ctx.emit(ctx.helper(out, "a_t"), "transpose", [left])
    if attributes.get("transB", 0):
        right = ctx.emit(ctx.helper(out, "b_t"), "transpose", [right])
    last = not c and alpha == 1.0
    result = ctx.emit(out if last else ctx.helper(out, "matmul"), "matmul", [left, right])
    if alpha != 1.0:
        scale = ctx.constant(out, "alpha", np.asarray(alpha, dtype))
        result = ctx.emit(out if not c else ctx.helper(out, "alpha_ab"), "mul", [result, scale])
    if c:
        bias = ctx.arg(c)
        if beta != 1.0:
            bias = ctx.emit(
                ctx.helper(out, "beta_c"), "mul", [bias, ctx.constant(out, "beta", np.asarray(beta, dtype))]
            )
        ctx.emit(out, "add", [result, bias])


def _variadic(op: str, average: bool = False) -> Callable[[Importer, NodeProto], None]:
    """Sum, Max, Min (and Mean: the sum divided by the count) as a chain of binary ops, left to right."""

    def build(ctx: Importer, node: NodeProto) -> None:
        out = node.output[0]
        operands = [ctx.arg(name) for name in node.input]
        if len(operands) == 1 and not average:
            _identity(ctx, node)
            return
        total = operands[0]
        for index, operand in enumerate(operands[1:], start=1):
            final = index == len(operands) - 1 and not average
            total = ctx.emit(out if final else ctx.helper(out, f"{op}{index}"), op, [total, operand])
        if average:
            dtype = ctx.type_of(node.input[0]).dtype or np.dtype(np.float32)
            ctx.emit(out, "div", [total, ctx.constant(out, "count", np.asarray(len(operands), dtype))])

    return build


def _div(ctx: Importer, node: NodeProto) -> None:
    """Integer Div truncates toward zero: the quotient computed in float64, then cast back."""
    x, y = node.input
    out = node.output[0]
    dtype = ctx.type_of(x).dtype
    if dtype is not None and dtype.kind in "iu":
        quotient = ctx.emit(ctx.helper(out, "quotient"), "div", [ctx.arg(x), ctx.arg(y)])
        ctx.emit(out, "cast", [quotient], {"dtype": ctx.dtype_name(x)})
    else:
        ctx.emit(out, "div", [ctx.arg(x), ctx.arg(y)])


def _pow(ctx: Importer, node: NodeProto) -> None:
    """ONNX Pow keeps the base's dtype whatever the exponent's; numpy would promote."""
    x, y = node.input
    out = node.output[0]
    base, exponent = ctx.type_of(x).dtype, ctx.type_of(y).dtype
    if base is None or exponent is None or base == exponent:
        ctx.emit(out, "pow", [ctx.arg(x), ctx.arg(y)])
    elif base.kind == "f":
        cast = ctx.emit(ctx.helper(out, "exponent"), "cast", [ctx.arg(y)], {"dtype": ctx.dtype_name(x)})
        ctx.emit(out, "pow", [ctx.arg(x), cast])
    else:
        power = ctx.emit(ctx.helper(out, "power"), "pow", [ctx.arg(x), ctx.arg(y)])
        ctx.emit(out, "cast", [power], {"dtype": ctx.dtype_name(x)})


def _reduce(op: str, then: str | None = None) -> Callable[[Importer, NodeProto], None]:
    """ONNX's Reduce*: axes from the input (or the attribute of older opsets), keepdims 1 by default,
    and noop_with_empty_axes. `then` is applied to the result (ReduceLogSum: log of the sum)."""

    def build(ctx: Importer, node: NodeProto) -> None:
        attributes = ctx.attributes(node)
        keepdims = bool(attributes.get("keepdims", 1))
        noop = bool(attributes.get("noop_with_empty_axes", 0))
        x, axes = _inputs(node, 2)
        out = node.output[0]
        known = ctx.value(axes) if axes else np.asarray(attributes.get("axes", []), np.int64)
        arguments = [ctx.arg(x)]
        attrs: dict[str, Any] = {"keepdims": keepdims}
        if noop and known is None:  # whether axes fed at run time are empty, their static length tells
            length = _static_length(ctx, axes)
            if length is None:
                raise ctx.refuse(
                    f"noop_with_empty_axes with axes fed at run time needs the length of '{axes}' known at import time"
                )
            known = np.zeros(0, np.int64) if length == 0 else None
        if known is not None and known.size == 0:
            if noop:
                _identity(ctx, node)
                return
        elif known is not None:
            attrs["axes"] = known.reshape(-1)
        else:
            arguments.append(ctx.arg(axes))
        check_unused_outputs(ctx, node)
        reduced = ctx.emit(ctx.helper(out, op) if then else out, op, arguments, attrs)
        if then:
            ctx.emit(out, then, [reduced])

    return build


def _split(ctx: Importer, node: NodeProto) -> None:
    """One native split node per output, each named by its ONNX output and taking its `index`."""
    attributes = ctx.attributes(node)
    x, splits = _inputs(node, 2)
    attrs: dict[str, Any] = {"axis": attributes.get("axis", 0)}
    arguments = [ctx.arg(x)]
    known = ctx.value(splits)
    if known is not None:
        attrs["splits"] = known.reshape(-1)
    elif splits:
        arguments.append(ctx.arg(splits))
    else:
        attrs["num_outputs"] = attributes.get("num_outputs", len(node.output))
    for index, output in enumerate(node.output):
        if output:
            ctx.emit(output, "split", arguments, {**attrs, "index": index})


def _pad(ctx: Importer, node: NodeProto) -> None:
    mode = ctx.attributes(node).get("mode", b"constant").decode()
    x, pads, value, axes = _inputs(node, 4)
    out = node.output[0]
    known_pads, known_value = ctx.value(pads), ctx.value(value)
    if axes:
        known_axes, rank = ctx.value(axes), ctx.type_of(x).rank
        if rank is None:
            raise ctx.refuse(f"axes need the rank of '{x}' to be known at import time")
        if known_axes is None:
            pads, known_pads = _pads_of_axes_fed(ctx, out, pads, axes, rank), None
        elif known_pads is None:
            pads = _pads_of_every_axis(ctx, out, pads, [int(axis) % rank for axis in known_axes.reshape(-1)], rank)
        else:
            listed = [int(axis) % rank for axis in known_axes.reshape(-1)]
            full = [0] * (2 * rank)
            for index, axis in enumerate(listed):
                full[axis] = int(known_pads[index])
                full[axis + rank] = int(known_pads[index + len(listed)])
            known_pads = np.asarray(full, np.int64)
    attrs: dict[str, Any] = {"mode": mode}
    arguments = [ctx.arg(x)]
    if known_pads is not None and (not value or known_value is not None):
        attrs["pads"] = known_pads.reshape(-1)
        if value:
            attrs["value"] = float(known_value.reshape(-1)[0])  # type: ignore[union-attr]
    else:
        if known_pads is None:
            arguments.append(pads if axes else ctx.arg(pads))
        else:
            arguments.append(ctx.constant(out, "pads", known_pads) if axes else ctx.arg(pads))
        if value:
            arguments.append(ctx.arg(value))
    ctx.emit(out, "pad", arguments, attrs)


def _pads_of_axes_fed(ctx: Importer, out: str, pads: str, axes: str, rank: int) -> str:
    """Pads (int64, as ONNX has them) for `axes` fed at run time, spread over every axis: each axis's
    begin (end) pad is the sum over the listed axes of one_hot(axis, rank) times that axis's begin
    (end) pad. The number of axes listed comes from onnx's shape inference, of `axes` or else of `pads`."""
    count = _static_length(ctx, axes)
    if count is None:
        pads_length = _static_length(ctx, pads)
        count = None if pads_length is None else pads_length // 2
    if count is None:
        raise ctx.refuse(f"axes fed at run time need the length of '{axes}' or '{pads}' known at import time")
    chosen = ctx.emit(ctx.helper(out, "axes_one_hot"), "one_hot", [ctx.arg(axes)], {"depth": rank, "dtype": "int64"})
    sides = []
    for side, name in enumerate(("begin", "end")):
        attrs = {"starts": [side * count], "ends": [(side + 1) * count]}
        listed = ctx.emit(ctx.helper(out, f"{name}_listed"), "slice", [ctx.arg(pads)], attrs)
        column = ctx.emit(ctx.helper(out, f"{name}_column"), "unsqueeze", [listed], {"axes": [1]})
        spread = ctx.emit(ctx.helper(out, f"{name}_spread"), "mul", [chosen, column])
        sides.append(ctx.emit(ctx.helper(out, f"{name}_pads"), "sum", [spread], {"axes": [0]}))
    return ctx.emit(ctx.helper(out, "pads"), "concat", sides, {"axis": 0})


def _static_length(ctx: Importer, name: str) -> int | None:
    """The length of a 1-D value onnx's shape inference knows, else None."""
    shape = ctx.type_of(name).shape
    return shape[0] if shape is not None and len(shape) == 1 else None


def _pads_of_every_axis(ctx: Importer, out: str, pads: str, axes: list[int], rank: int) -> str:
    """Pads computed at run time for some `axes`, spread over every axis (0 elsewhere) by slices and a concat."""
    zero = ctx.constant(out, "no_pad", np.zeros(1, np.int64))
    pieces = []
    for side in range(2):
        for axis in range(rank):
            if axis not in axes:
                pieces.append(zero)
                continue
            index = axes.index(axis) + side * len(axes)
            attrs = {"starts": [index], "ends": [index + 1]}
            pieces.append(ctx.emit(ctx.helper(out, f"pad{side}_{axis}"), "slice", [ctx.arg(pads)], attrs))
    return ctx.emit(ctx.helper(out, "pads"), "concat", pieces, {"axis": 0})


def _clip(ctx: Importer, node: NodeProto) -> None:
    """Known bounds of a float input become attrs; otherwise the bounds are tensor arguments (an
    omitted minimum then is the dtype's lowest value)."""
    x, low, high = _inputs(node, 3)
    out = node.output[0]
    dtype = ctx.type_of(x).dtype
    known_low, known_high = ctx.value(low), ctx.value(high)
    if (
        dtype is not None
        and dtype.kind == "f"
        and (not low or known_low is not None)
        and (not high or known_high is not None)
    ):
        attrs = {}
        if low:
            attrs["min"] = float(known_low.reshape(-1)[0])  # type: ignore[union-attr]
        if high:
            attrs["max"] = float(known_high.reshape(-1)[0])  # type: ignore[union-attr]
        ctx.emit(out, "clip", [ctx.arg(x)], attrs)
        return
    arguments = [ctx.arg(x)]
    if low:
        arguments.append(ctx.arg(low))
    elif high:
        if dtype is None:
            raise ctx.refuse(f"the dtype of '{x}' is not known")
        lowest = np.finfo(dtype).min if dtype.kind == "f" else np.iinfo(dtype).min
        arguments.append(ctx.constant(out, "min", np.asarray(lowest, dtype)))
    if high:
        arguments.append(ctx.arg(high))
    ctx.emit(out, "clip", arguments)


def _dropout(ctx: Importer, node: NodeProto) -> None:
    """The call's mode decides (training in Train or with `training` set): the exporter's
    training_mode input is ignored, and so is `seed` (masks come from the training seed)."""
    x, ratio = _inputs(node, 2)
    known = ctx.value(ratio)
    if ratio and known is None:
        raise ctx.refuse("a ratio computed at run time is not supported")
    check_unused_outputs(ctx, node)
    rate = 0.5 if known is None else float(known.reshape(-1)[0])
    ctx.emit(node.output[0], "dropout", [ctx.arg(x)], {"ratio": rate})


def _batch_norm(ctx: Importer, node: NodeProto) -> None:
    """ONNX keeps `momentum` of the old running value; PyTorch (and chainrule) give it to the batch."""
    attributes = ctx.attributes(node)
    epsilon = float32_value(attributes.get("epsilon", 1e-5))
    momentum = 1.0 - float32_value(attributes.get("momentum", 0.9))
    check_unused_outputs(ctx, node)
    arguments = [ctx.arg(name) for name in node.input]
    ctx.emit(node.output[0], "batch_norm", arguments, {"epsilon": epsilon, "momentum": momentum})


def _softmax_cross_entropy(ctx: Importer, node: NodeProto) -> None:
    """The mean without class weights is the native op, whose gradient is PyTorch's; the other
    reductions and class weights are built from native ops as the ONNX spec defines them."""
    attributes = ctx.attributes(node)
    reduction = attributes.get("reduction", b"mean").decode()
    if reduction not in ("mean", "sum", "none"):
        raise ctx.refuse(f"reduction '{reduction}' is not one of mean, sum, none")
    scores, labels, weights = _inputs(node, 3)
    out = node.output[0]
    rank = ctx.type_of(scores).rank
    if rank is None:
        raise ctx.refuse(f"the rank of '{scores}' is not known")
    if reduction != "mean" or weights:
        _weighted_cross_entropy(ctx, node, reduction)
        return
    logits = ctx.arg(scores)
    log_prob = _outputs(node, 2)[1]
    if ctx.is_used(log_prob):
        ctx.emit(log_prob, "log_softmax", [logits], {"axis": 1})
    if rank > 2:
        perm = [0, *range(2, rank), 1]
        logits = ctx.emit(ctx.helper(out, "classes_last"), "transpose", [logits], {"perm": perm})
    attrs = {"ignore_index": attributes["ignore_index"]} if "ignore_index" in attributes else {}
    ctx.emit(out, "softmax_cross_entropy", [logits, ctx.arg(labels)], attrs)


def _weighted_cross_entropy(ctx: Importer, node: NodeProto, reduction: str) -> None:
    """-log_softmax(scores)[label] per element (class scores on axis 1), times the label's class
    weight, 0 where the label is ignore_index; then none, sum, or mean: the sum divided by the sum
    of the weights (the count of labels not ignored, without class weights)."""
    attributes = ctx.attributes(node)
    scores, labels, weights = _inputs(node, 3)
    out = node.output[0]
    dtype = ctx.type_of(scores).dtype or np.dtype(np.float32)
    label_dtype = ctx.type_of(labels).dtype or np.dtype(np.int64)
    log_prob = _outputs(node, 2)[1]
    log_prob = log_prob if ctx.is_used(log_prob) else ctx.helper(out, "log_prob")
    log_p = ctx.emit(log_prob, "log_softmax", [ctx.arg(scores)], {"axis": 1})
    label = ctx.arg(labels)
    ignored = None
    if "ignore_index" in attributes:
        ignore = ctx.constant(out, "ignore_index", np.asarray(attributes["ignore_index"], label_dtype))
        ignored = ctx.emit(ctx.helper(out, "ignored"), "equal", [label, ignore])
        zero_label = ctx.constant(out, "zero_label", np.zeros((), label_dtype))
        label = ctx.emit(ctx.helper(out, "label"), "where", [ignored, zero_label, label])
    index = ctx.emit(ctx.helper(out, "index"), "unsqueeze", [label], {"axes": [1]})
    picked = ctx.emit(ctx.helper(out, "picked"), "gather_elements", [log_p, index], {"axis": 1})
    chosen = ctx.emit(ctx.helper(out, "chosen"), "squeeze", [picked], {"axes": [1]})
    weight = ctx.emit(ctx.helper(out, "class_weight"), "gather", [ctx.arg(weights), label]) if weights else None
    if ignored is not None:
        zero = ctx.constant(out, "zero", np.zeros((), dtype))
        kept = weight or ctx.constant(out, "one", np.ones((), dtype))
        weight = ctx.emit(ctx.helper(out, "weight"), "where", [ignored, zero, kept])
    unweighted = reduction == "none" and weight is None
    loss = ctx.emit(out if unweighted else ctx.helper(out, "nll"), "neg", [chosen])
    if weight is not None:
        loss = ctx.emit(out if reduction == "none" else ctx.helper(out, "weighted"), "mul", [loss, weight])
    if reduction == "sum":
        ctx.emit(out, "sum", [loss])
    elif reduction == "mean" and weight is None:
        ctx.emit(out, "mean", [loss])
    elif reduction == "mean":
        total = ctx.emit(ctx.helper(out, "total"), "sum", [loss])
        ctx.emit(out, "div", [total, ctx.emit(ctx.helper(out, "weight_sum"), "sum", [weight])])


def _layer_norm(ctx: Importer, node: NodeProto) -> None:
    """`layer_norm`; the optional Mean and InvStdDev outputs, when read, are computed beside it."""
    native_node(ctx, node, "layer_norm", ignore=frozenset({"stash_type"}), check_outputs=False)
    mean_out, inv_std_out = _outputs(node, 3)[1:]
    if not (ctx.is_used(mean_out) or ctx.is_used(inv_std_out)):
        return
    x = node.input[0]
    out = node.output[0]
    attributes = ctx.attributes(node)
    rank = ctx.type_of(x).rank
    if rank is None:
        raise ctx.refuse(f"its Mean and InvStdDev outputs need the rank of '{x}'")
    axes = list(range(int(attributes.get("axis", -1)) % rank, rank))
    dtype = ctx.type_of(x).dtype or np.dtype(np.float32)
    statistics = {"axes": axes, "keepdims": True}
    mean = ctx.emit(mean_out or ctx.helper(out, "mean"), "mean", [ctx.arg(x)], statistics)
    centered = ctx.emit(ctx.helper(out, "centered"), "sub", [ctx.arg(x), mean])
    squared = ctx.emit(ctx.helper(out, "squared"), "square", [centered])
    variance = ctx.emit(ctx.helper(out, "variance"), "mean", [squared], statistics)
    epsilon = np.asarray(float32_value(attributes.get("epsilon", 1e-5)), dtype)
    shifted = ctx.emit(ctx.helper(out, "shifted"), "add", [variance, ctx.constant(out, "epsilon", epsilon)])
    deviation = ctx.emit(ctx.helper(out, "std"), "sqrt", [shifted])
    ctx.emit(inv_std_out or ctx.helper(out, "inv_std"), "reciprocal", [deviation])


def _one_hot(ctx: Importer, node: NodeProto) -> None:
    indices, depth, values = node.input
    out = node.output[0]
    attrs: dict[str, Any] = {"axis": ctx.attributes(node).get("axis", -1)}
    known_depth, known_values = ctx.value(depth), ctx.value(values)
    if known_depth is not None and known_values is not None:
        flat = known_values.reshape(-1)
        attrs.update(
            depth=int(known_depth.reshape(-1)[0]),
            off_value=float(flat[0]),
            on_value=float(flat[1]),
            dtype=ctx.dtype_name(values),
        )
        ctx.emit(out, "one_hot", [ctx.arg(indices)], attrs)
    else:
        count = ctx.arg(depth)
        depth_type = ctx.type_of(depth).dtype
        if depth_type is None or depth_type.kind not in "iu":
            count = ctx.emit(ctx.helper(out, "depth"), "cast", [count], {"dtype": "int64"})
        ctx.emit(out, "one_hot", [ctx.arg(indices), count, ctx.arg(values)], attrs)


def _hard_swish(ctx: Importer, node: NodeProto) -> None:
    out = node.output[0]
    x = ctx.arg(node.input[0])
    gate = ctx.emit(ctx.helper(out, "gate"), "hard_sigmoid", [x], {"alpha": 1 / 6, "beta": 0.5})
    ctx.emit(out, "mul", [x, gate])


# ---------------------------------------------------------------- the table
REDUCE_KEEPDIMS = {"keepdims": True}
POOL_IGNORED = frozenset({"kernel_shape"})

FAMILIES: dict[str, dict[str, Rule]] = {
    "elementwise": {
        "Abs": Native("abs"),
        "Neg": Native("neg"),
        "Exp": Native("exp"),
        "Log": Native("log"),
        "Sqrt": Native("sqrt"),
        "Tanh": Native("tanh"),
        "Sigmoid": Native("sigmoid"),
        "Relu": Native("relu"),
        "Softplus": Native("softplus"),
        "Erf": Native("erf"),
        "Sin": Native("sin"),
        "Cos": Native("cos"),
        "Reciprocal": Native("reciprocal"),
        "Floor": Native("floor"),
        "Ceil": Native("ceil"),
        "Round": Native("round"),
        "Sign": Native("sign"),
        "Selu": Native("selu"),
        "Softsign": Native("softsign"),
        "IsNaN": Native("isnan"),
        "IsInf": Native("isinf"),
        "LeakyRelu": Native("leaky_relu"),
        "Elu": Native("elu"),
        "Gelu": Native("gelu"),
        "HardSigmoid": Native("hard_sigmoid"),
        "HardSwish": Composite(_hard_swish, ("hard_sigmoid", "mul"), describe="`mul(x, hard_sigmoid(x, 1/6, 0.5))`"),
        "PRelu": Native("prelu"),
        "Clip": Composite(_clip, ("clip",), frozenset({1, 2})),
        "Add": Native("add"),
        "Sub": Native("sub"),
        "Mul": Native("mul"),
        "Div": Composite(_div, ("div", "cast"), describe="`div` (integers: then `cast`, truncating)"),
        "Pow": Composite(_pow, ("pow", "cast"), describe="`pow` (`cast` where the dtypes differ)"),
        "Sum": Composite(_variadic("add"), ("add", "cast"), describe="`add` (chained)"),
        "Mean": Composite(_variadic("add", average=True), ("add", "div"), describe="`add` (chained), then `div`"),
        "Max": Composite(_variadic("maximum"), ("maximum", "cast"), describe="`maximum` (chained)"),
        "Min": Composite(_variadic("minimum"), ("minimum", "cast"), describe="`minimum` (chained)"),
    },
    "comparison and logic": {
        "Equal": Native("equal"),
        "Greater": Native("greater"),
        "GreaterOrEqual": Native("greater_equal"),
        "Less": Native("less"),
        "LessOrEqual": Native("less_equal"),
        "And": Native("logical_and"),
        "Or": Native("logical_or"),
        "Xor": Native("logical_xor"),
        "Not": Native("logical_not"),
        "Where": Native("where"),
        "Cast": Composite(_cast, ("cast",)),
        "CastLike": Composite(_cast_like, ("cast",), frozenset({1})),
    },
    "values and structure": {
        "Constant": Composite(_constant, (), describe="a `constant` (computed at import)"),
        "ConstantOfShape": Composite(
            _constant_of_shape, ("expand",), frozenset({0}), describe="a `constant` (shape known) or `expand`"
        ),
        "Identity": Composite(_identity, ("cast",), describe="`cast` to its own dtype"),
        "Reshape": Native("reshape", shaped={1: "shape"}, defaults={"allowzero": 0}),
        "Transpose": Native("transpose"),
        "Flatten": Native("flatten"),
        "Concat": Native("concat"),
        "Split": Composite(_split, ("split",), frozenset({1}), describe="`split` (a node per output)"),
        "Slice": Native("slice", shaped={1: "starts", 2: "ends", 3: "axes", 4: "steps"}),
        "Gather": Native("gather"),
        "GatherElements": Native("gather_elements"),
        "Squeeze": Native("squeeze", shaped={1: "axes"}),
        "Unsqueeze": Native("unsqueeze", shaped={1: "axes"}),
        "Expand": Native("expand", shaped={1: "shape"}),
        "Tile": Native("tile", shaped={1: "repeats"}),
        "Pad": Composite(
            _pad,
            ("pad", "slice", "concat", "one_hot", "unsqueeze", "mul", "sum"),
            frozenset({1, 2, 3}),
            describe="`pad` (`slice`, `concat` for axes; `one_hot`, `unsqueeze`, `mul`, `sum` for axes fed at "
            "run time)",
        ),
        "Shape": Native("shape"),
        "OneHot": Composite(
            _one_hot, ("one_hot", "cast"), frozenset({1, 2}), describe="`one_hot` (a float depth: `cast`)"
        ),
        "ArgMax": Native("argmax", defaults=REDUCE_KEEPDIMS),
        "ArgMin": Native("argmin", defaults=REDUCE_KEEPDIMS),
        "CumSum": Native("cumsum", shaped={1: "axis"}),
        "Einsum": Native("einsum"),
        "MatMul": Native("matmul"),
        "Gemm": Composite(
            _gemm, ("matmul", "transpose", "mul", "add"), describe="`matmul` (+ `transpose`, `mul`, `add`)"
        ),
    },
    "reductions": {
        "ReduceSum": Composite(_reduce("sum"), ("sum", "cast"), frozenset({1}), describe="`sum`"),
        "ReduceMean": Composite(_reduce("mean"), ("mean", "cast"), frozenset({1}), describe="`mean`"),
        "ReduceMax": Composite(_reduce("max"), ("max", "cast"), frozenset({1}), describe="`max`"),
        "ReduceMin": Composite(_reduce("reduce_min"), ("reduce_min", "cast"), frozenset({1}), describe="`reduce_min`"),
        "ReduceProd": Composite(
            _reduce("reduce_prod"), ("reduce_prod", "cast"), frozenset({1}), describe="`reduce_prod`"
        ),
        "ReduceL1": Composite(_reduce("reduce_l1"), ("reduce_l1", "cast"), frozenset({1}), describe="`reduce_l1`"),
        "ReduceL2": Composite(_reduce("reduce_l2"), ("reduce_l2", "cast"), frozenset({1}), describe="`reduce_l2`"),
        "ReduceSumSquare": Composite(
            _reduce("reduce_sum_square"), ("reduce_sum_square", "cast"), frozenset({1}), describe="`reduce_sum_square`"
        ),
        "ReduceLogSumExp": Composite(
            _reduce("logsumexp"), ("logsumexp", "cast"), frozenset({1}), describe="`logsumexp`"
        ),
        "ReduceLogSum": Composite(
            _reduce("sum", then="log"), ("sum", "log", "cast"), frozenset({1}), describe="`sum`, then `log`"
        ),
    },
    "neural networks": {
        "Conv": Native("conv", ignore=POOL_IGNORED),
        "ConvTranspose": Native("conv_transpose", ignore=POOL_IGNORED),
        "MaxPool": Native("max_pool"),
        "AveragePool": Native("average_pool"),
        "GlobalAveragePool": Native("global_average_pool"),
        "GlobalMaxPool": Native("global_max_pool"),
        "BatchNormalization": Composite(
            _batch_norm, ("batch_norm",), describe="`batch_norm` (momentum = 1 - ONNX momentum; mean, var: `state`)"
        ),
        "LayerNormalization": Composite(
            _layer_norm,
            ("layer_norm", "mean", "sub", "square", "add", "sqrt", "reciprocal"),
            describe="`layer_norm` (Mean, InvStdDev outputs: `mean`, `sub`, `square`, `add`, `sqrt`, `reciprocal`)",
        ),
        "InstanceNormalization": Native("instance_norm"),
        "GroupNormalization": Native("group_norm", ignore=frozenset({"stash_type"})),
        "LRN": Native("lrn"),
        "Dropout": Composite(_dropout, ("dropout",), frozenset({1, 2}), describe="`dropout` (mode of the call)"),
        "Softmax": Native("softmax"),
        "LogSoftmax": Native("log_softmax"),
        "SoftmaxCrossEntropyLoss": Composite(
            _softmax_cross_entropy,
            (
                "softmax_cross_entropy",
                "transpose",
                "log_softmax",
                "equal",
                "where",
                "unsqueeze",
                "gather_elements",
                "squeeze",
                "gather",
                "neg",
                "mul",
                "sum",
                "mean",
                "div",
            ),
            describe="`softmax_cross_entropy` (the mean without class weights: `transpose` for scores of rank > 2, "
            "log_prob `log_softmax`) or, with class weights or reduction none or sum, `log_softmax`, "
            "`gather_elements`, `gather`, `where`, `neg`, `mul`, `sum`, `div`",
        ),
    },
}
"""The covered ONNX ops by family, as the README lists them."""
TABLE: dict[str, Rule] = {op: rule for family in FAMILIES.values() for op, rule in family.items()}


def refuse_uncovered_ops(model: ModelProto) -> None:
    """UNSUPPORTED_ONNX_OP for every op type outside the table, by its first node; nothing when all are in it."""
    first_users: dict[str, str] = {}
    for node in model.graph.node:
        rule = TABLE.get(node.op_type) if node.domain in ONNX_DOMAINS else None
        if rule is None or not rule.available():
            label = node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}.{node.op_type}"
            first_users.setdefault(label, node_label(node))
    if first_users:
        raise unsupported_ops(first_users)
