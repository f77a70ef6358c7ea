"""Ops that move, pick or count elements without computing on them: shapes, slices, gathers, padding, one-hot.

Shape-like arguments (shapes, axes, starts and ends, pads, repeats, depth) are attrs. Where ONNX
takes them as a tensor input, the op also takes them as an optional trailing int32/int64 tensor
argument that, when present, overrides the attr: ONNX models whose shapes are computed at run
time then import unchanged. Such arguments take no gradient, and the shape rule leaves the sizes
they decide unknown. Every forward function receives them as `*given`, after its data arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from chainrule.server.ops.registry import Array, Attr, defop, unbroadcast
from chainrule.server.shapes import (
    Dim,
    DtypeError,
    Shape,
    ShapeError,
    TensorType,
    broadcast_shapes,
    describe,
    normalize_axes,
    normalize_axis,
    reshape_shape,
    transpose_shape,
)

INT64_MAX = (1 << 63) - 1
RUN_TIME_ELEMENT_LIMIT = 1 << 28
"""The most elements a result whose shape a run-time tensor decides may hold (the default --max-tensor-elements):
the request's memory estimate cannot see such shapes in advance."""
DTYPES = ("float32", "float64", "int32", "int64", "bool")


# ---------------------------------------------------------------- shape-like arguments
class MissingAttr(ShapeError):
    """A shape-like attr given neither as an attr nor as a tensor argument: BAD_ATTR, as other missing attrs."""

    reason = "BAD_ATTR"

    def __init__(self, op: str, name: str) -> None:
        super().__init__(f"{op} needs attr '{name}' (or a tensor argument in its place)")


def shape_like_length(given: TensorType, what: str, scalar: bool = False) -> Dim:
    """The number of entries of a shape-like tensor argument, checked as far as its type is known:
    an int32/int64 tensor, 1-D (or, for a `scalar`, one element)."""
    if given.dtype is not None and given.dtype.kind != "i":
        raise DtypeError(f"{what} must be an int32 or int64 tensor, got {given.dtype}")
    if given.shape is None:
        return None
    if scalar:
        if len(given.shape) > 1 or (len(given.shape) == 1 and given.shape[0] not in (None, 1)):
            raise ShapeError(f"{what} must be a scalar or a tensor of one element, got shape {describe(given.shape)}")
        return 1
    if len(given.shape) != 1:
        raise ShapeError(f"{what} must be a 1-D tensor, got shape {describe(given.shape)}")
    return given.shape[0]


def tensor_ints(value: Array, what: str) -> list[int]:
    """A shape-like tensor argument's entries, checked."""
    array = np.asarray(value)
    if array.dtype.kind != "i":
        raise DtypeError(f"{what} must be an int32 or int64 tensor, got {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D tensor, got shape {list(array.shape)}")
    return [int(entry) for entry in array.tolist()]


def tensor_int(value: Array, what: str) -> int:
    array = np.asarray(value)
    if array.dtype.kind != "i":
        raise DtypeError(f"{what} must be an int32 or int64 tensor, got {array.dtype}")
    if array.size != 1 or array.ndim > 1:
        raise ValueError(f"{what} must be a scalar or a tensor of one element, got shape {list(array.shape)}")
    return int(array.reshape(-1)[0])


def override(given: Sequence[Array], position: int, attr: Sequence[int] | None, what: str) -> list[int] | None:
    """The entries of the tensor argument at `position` of `given` when present, else the attr."""
    if position < len(given):
        return tensor_ints(given[position], what)
    return None if attr is None else list(attr)


def _checked_size(shape: Sequence[int], op: str) -> tuple[int, ...]:
    """A result shape decided by a run-time tensor, refused when it asks for absurd sizes."""
    if any(dim < 0 for dim in shape):
        raise ValueError(f"{op} would produce the negative shape {list(shape)}")
    elements = math.prod(shape)
    if elements > RUN_TIME_ELEMENT_LIMIT:
        raise ValueError(
            f"{op} would produce shape {list(shape)} ({elements:,} elements), more than the "
            f"{RUN_TIME_ELEMENT_LIMIT:,} a shape given at run time may ask for"
        )
    return tuple(shape)


def _product(dims: Sequence[Dim]) -> Dim:
    if any(dim is None for dim in dims):
        return None
    return math.prod(dims)  # type: ignore[arg-type]


def _need_rank(x: TensorType, op: str, least: int = 1) -> None:
    if x.shape is not None and len(x.shape) < least:
        raise ShapeError(f"{op} needs a tensor with at least {least} axis, got a scalar")


def _index(axis: int, item: slice | Array) -> tuple[slice | Array, ...]:
    """An index that applies `item` to `axis` and takes every other axis whole."""
    return (slice(None),) * axis + (item,)


# ---------------------------------------------------------------- reshape, transpose
def _reshape_target(source: Shape, target: Sequence[int] | None, allowzero: int) -> list[Dim]:
    """ONNX's allowzero=0: a 0 in the target copies the input's size on that axis (None where that is unknown)."""
    if target is None:
        raise MissingAttr("reshape", "shape")
    if allowzero not in (0, 1):
        raise ShapeError(f"reshape's allowzero must be 0 or 1, got {allowzero}")
    if allowzero or 0 not in target:
        return list(target)
    if source is None:
        return [None if dim == 0 else dim for dim in target]
    if any(dim == 0 and axis >= len(source) for axis, dim in enumerate(target)):
        raise ShapeError(f"reshape target {list(target)} copies an axis the input {describe(source)} lacks")
    return [source[axis] if dim == 0 else dim for axis, dim in enumerate(target)]


def reshape(x: Array, *given: Array, shape: Sequence[int] | None = None, allowzero: int = 1) -> Array:
    target = _reshape_target(x.shape, override(given, 0, shape, "reshape's shape"), allowzero)
    return np.reshape(x, tuple(target))  # type: ignore[arg-type]


def _reshape_type(
    x: TensorType, *given: TensorType, shape: Sequence[int] | None = None, allowzero: int = 1
) -> TensorType:
    if given:
        length = shape_like_length(given[0], "reshape's shape")
        return TensorType(x.dtype, None if length is None else (None,) * length)
    target = _reshape_target(x.shape, shape, allowzero)
    if None in target:
        reshape_shape(None, [dim for dim in target if dim is not None])  # checks the -1s and sizes
        return TensorType(x.dtype, tuple(None if dim in (None, -1) else dim for dim in target))
    return TensorType(x.dtype, reshape_shape(x.shape, target))  # type: ignore[arg-type]


def _perm(perm: Sequence[int] | None) -> list[int] | None:
    """Negative entries count from the end, as numpy's."""
    if perm is None:
        return None
    count = len(perm)
    if any(not -count <= axis < count for axis in perm):
        raise ShapeError(f"perm {list(perm)} has an entry out of range for {count} axes")
    return [axis % count for axis in perm]


def transpose(x: Array, perm: Sequence[int] | None = None) -> Array:
    return np.transpose(x, _perm(perm))


def _transpose_vjp(g: Array, ans: Array, x: Array, perm: Sequence[int] | None = None) -> Array:
    normalized = _perm(perm)
    return np.transpose(g, None if normalized is None else np.argsort(normalized))


defop(
    "reshape",
    reshape,
    lambda g, ans, x, *given, shape=None, allowzero=1: np.reshape(g, x.shape),
    None,
    infer=_reshape_type,
    attrs={"shape": Attr("ints"), "allowzero": Attr("i", default=1)},
    reads=("", ""),
    min_arity=1,
    inputs="x, shape?",
    convention="`shape`: one -1 allowed; `allowzero` 1 (default): 0 is a size, as numpy; 0: 0 copies the input's size",
)
defop(
    "transpose",
    transpose,
    _transpose_vjp,
    infer=lambda x, perm=None: TensorType(x.dtype, transpose_shape(x.shape, _perm(perm))),
    attrs={"perm": Attr("ints")},
    reads=("",),
    inputs="x",
    convention="`perm` absent reverses the axes; negative entries count from the end",
)


# ---------------------------------------------------------------- concat, split
def concat(*xs: Array, axis: int) -> Array:
    return np.concatenate(xs, axis=axis)


def _concat_vjp(g: Array, ans: Array, *xs: Array, axis: int, position: int) -> Array:
    axis = normalize_axis(axis, g.ndim)
    start = sum(x.shape[axis] for x in xs[:position])
    return g[_index(axis, slice(start, start + xs[position].shape[axis]))]


def _concat_type(*xs: TensorType, axis: int) -> TensorType:
    dtypes = [x.dtype for x in xs]
    dtype = None if any(each is None for each in dtypes) else np.result_type(*dtypes)
    shapes = [x.shape for x in xs if x.shape is not None]
    for x in xs:
        _need_rank(x, "concat")
    if not shapes:
        return TensorType(dtype, None)
    rank = len(shapes[0])
    if any(len(shape) != rank for shape in shapes):
        raise ShapeError(f"concat needs arguments of one rank, got {', '.join(map(describe, shapes))}")
    along = normalize_axis(axis, rank)
    out: list[Dim] = []
    for position in range(rank):
        dims = [shape[position] for shape in shapes]
        if position == along:
            out.append(None if len(shapes) < len(xs) else _sum_dims(dims))
            continue
        known = {dim for dim in dims if dim is not None}
        if len(known) > 1:
            raise ShapeError(
                f"concat along axis {axis} needs the other axes to agree, got {', '.join(map(describe, shapes))}"
            )
        out.append(known.pop() if known else None)
    return TensorType(dtype, tuple(out))


def _sum_dims(dims: Sequence[Dim]) -> Dim:
    return None if None in dims else sum(dims)  # type: ignore[arg-type]


defop(
    "concat",
    concat,
    _concat_vjp,
    infer=_concat_type,
    attrs={"axis": Attr("i", required=True)},
    reads=("",),
    variadic=True,
    min_arity=1,
    inputs="x0, x1, ...",
    convention="dtypes promote as numpy's",
)


def _split_piece(dim: int, splits: Sequence[int] | None, num_outputs: int | None, index: int) -> tuple[int, int]:
    """The start and size of piece `index` (negative counts from the end): explicit sizes, or ONNX 18's
    num_outputs parts of ceil(dim / num_outputs) with a smaller last one."""
    if splits is not None:
        if num_outputs is not None:
            raise ShapeError("split takes sizes ('splits') or 'num_outputs', not both")
        if any(size < 0 for size in splits) or sum(splits) != dim:
            raise ShapeError(f"split sizes {list(splits)} must be non-negative and add up to the axis size {dim}")
        position = _piece_index(index, len(splits))
        return sum(splits[:position]), splits[position]
    if num_outputs is None:
        raise MissingAttr("split", "splits' or 'num_outputs")
    position = _piece_index(index, num_outputs)
    part = -(-dim // num_outputs)
    last = dim - part * (num_outputs - 1)
    if last < 0:
        raise ShapeError(f"an axis of size {dim} cannot be split into {num_outputs} parts of {part} and a smaller last")
    return part * position, part if position < num_outputs - 1 else last


def _piece_index(index: int, count: int) -> int:
    if count < 1:
        raise ShapeError(f"split needs at least one piece, got {count}")
    if not -count <= index < count:
        raise ShapeError(f"split index {index} is out of range for {count} pieces")
    return index % count


def _split_geometry(
    x: Array, given: Sequence[Array], index: int, axis: int, splits: Sequence[int] | None, num_outputs: int | None
) -> tuple[int, int, int]:
    along = normalize_axis(axis, x.ndim)
    sizes = override(given, 0, splits, "split's splits")
    return (along, *_split_piece(x.shape[along], sizes, num_outputs, index))


def split(
    x: Array,
    *given: Array,
    index: int,
    axis: int = 0,
    splits: Sequence[int] | None = None,
    num_outputs: int | None = None,
) -> Array:
    along, start, size = _split_geometry(x, given, index, axis, splits, num_outputs)
    return x[_index(along, slice(start, start + size))]


def _split_vjp(
    g: Array,
    ans: Array,
    x: Array,
    *given: Array,
    index: int,
    axis: int = 0,
    splits: Sequence[int] | None = None,
    num_outputs: int | None = None,
) -> Array:
    along, start, size = _split_geometry(x, given, index, axis, splits, num_outputs)
    widths = [(0, 0)] * x.ndim
    widths[along] = (start, x.shape[along] - start - size)
    return np.pad(g, widths)


def _split_type(
    x: TensorType,
    *given: TensorType,
    index: int,
    axis: int = 0,
    splits: Sequence[int] | None = None,
    num_outputs: int | None = None,
) -> TensorType:
    _need_rank(x, "split")
    if given:
        shape_like_length(given[0], "split's splits")
        if num_outputs is not None:
            raise ShapeError("split takes sizes ('splits') or 'num_outputs', not both")
    elif splits is None and num_outputs is None:
        raise MissingAttr("split", "splits' or 'num_outputs")
    if x.shape is None:
        return x
    along = normalize_axis(axis, len(x.shape))
    dim = x.shape[along]
    size: Dim = None
    if not given and splits is not None:
        size = _split_piece(sum(splits) if dim is None else dim, splits, num_outputs, index)[1]
    elif not given and dim is not None:
        size = _split_piece(dim, None, num_outputs, index)[1]
    elif not given:
        _piece_index(index, num_outputs)  # type: ignore[arg-type]
    return TensorType(x.dtype, x.shape[:along] + (size,) + x.shape[along + 1 :])


defop(
    "split",
    split,
    _split_vjp,
    None,
    infer=_split_type,
    attrs={
        "axis": Attr("i", default=0),
        "splits": Attr("ints"),
        "num_outputs": Attr("i"),
        "index": Attr("i", required=True),
    },
    reads=("1", ""),
    min_arity=1,
    inputs="x, splits?",
    convention="one node per piece (`index`); sizes `splits`, or `num_outputs` parts as ONNX 18; gradient pads zeros",
)


# ---------------------------------------------------------------- slice
def _slice_plan(
    rank: int,
    starts: Sequence[int] | None,
    ends: Sequence[int] | None,
    axes: Sequence[int] | None,
    steps: Sequence[int] | None,
) -> list[tuple[int, int, int, int]]:
    """(axis, start, end, step) for each sliced axis, checked."""
    if starts is None or ends is None:
        raise MissingAttr("slice", "starts' and 'ends")
    count = len(starts)
    if count > rank:
        raise ShapeError(f"slice has {count} starts for a tensor of rank {rank}")
    axes = list(range(count)) if axes is None else list(axes)
    steps = [1] * count if steps is None else list(steps)
    if not len(ends) == len(axes) == len(steps) == count:
        raise ShapeError(
            f"slice's starts, ends, axes and steps must have one length, got {count}, {len(ends)}, {len(axes)} "
            f"and {len(steps)}"
        )
    normalized = [normalize_axis(axis, rank) for axis in axes]
    if len(set(normalized)) != len(normalized):
        raise ShapeError(f"slice's axes {axes} name the same axis twice")
    if 0 in steps:
        raise ShapeError("slice's steps must not be 0")
    return list(zip(normalized, starts, ends, steps, strict=True))


def _clamped(dim: int, start: int, end: int, step: int) -> slice:
    """ONNX's clamping: negative positions count from the end, then starts and ends are clamped to
    [0, dim] ([0, dim - 1] and [-1, dim - 1] for negative steps), as Python's slices do."""
    first, stop, stride = slice(start, end, step).indices(dim)
    return slice(first, None if stop < 0 else stop, stride)


def _slices(
    shape: tuple[int, ...], given: Sequence[Array], attrs: dict[str, Sequence[int] | None]
) -> tuple[slice, ...]:
    names = ("starts", "ends", "axes", "steps")
    resolved = [override(given, i, attrs[name], f"slice's {name}") for i, name in enumerate(names)]
    index = [slice(None)] * len(shape)
    for axis, start, end, step in _slice_plan(len(shape), *resolved):
        index[axis] = _clamped(shape[axis], start, end, step)
    return tuple(index)


Ints = Sequence[int] | None


def slice_(
    x: Array, *given: Array, starts: Ints = None, ends: Ints = None, axes: Ints = None, steps: Ints = None
) -> Array:
    return x[_slices(x.shape, given, {"starts": starts, "ends": ends, "axes": axes, "steps": steps})]


def _slice_vjp(
    g: Array,
    ans: Array,
    x: Array,
    *given: Array,
    starts: Ints = None,
    ends: Ints = None,
    axes: Ints = None,
    steps: Ints = None,
) -> Array:
    out = np.zeros(x.shape, g.dtype)
    out[_slices(x.shape, given, {"starts": starts, "ends": ends, "axes": axes, "steps": steps})] = g
    return out


def _slice_type(
    x: TensorType, *given: TensorType, starts: Ints = None, ends: Ints = None, axes: Ints = None, steps: Ints = None
) -> TensorType:
    names = ("starts", "ends", "axes", "steps")
    lengths = [shape_like_length(t, f"slice's {name}") for t, name in zip(given, names, strict=False)]
    if x.shape is None:
        return x
    rank = len(x.shape)
    if not given:
        plan = _slice_plan(rank, starts, ends, axes, steps)
        out = list(x.shape)
        for axis, start, end, step in plan:
            dim = x.shape[axis]
            out[axis] = None if dim is None else len(range(*_clamped(dim, start, end, step).indices(dim)))
        return TensorType(x.dtype, tuple(out))
    if len(given) == 1 and ends is None:
        raise MissingAttr("slice", "starts' and 'ends")
    if len(given) > 2 or axes is None and lengths[0] is None:
        return TensorType(x.dtype, (None,) * rank)
    sliced = normalize_axes(range(lengths[0]) if axes is None else axes, rank)  # type: ignore[arg-type]
    return TensorType(x.dtype, tuple(None if axis in sliced else dim for axis, dim in enumerate(x.shape)))


SLICE_ATTRS = {"starts": Attr("ints"), "ends": Attr("ints"), "axes": Attr("ints"), "steps": Attr("ints")}
defop(
    "slice",
    slice_,
    _slice_vjp,
    None,
    None,
    None,
    None,
    infer=_slice_type,
    attrs=SLICE_ATTRS,
    reads=("1 2 3 4", "", "", "", ""),
    min_arity=1,
    inputs="x, starts?, ends?, axes?, steps?",
    convention="ONNX clamping, negative steps; gradient scatters into zeros",
)


# ---------------------------------------------------------------- gather, gather_elements
def _int_indices(indices: TensorType, op: str) -> None:
    if indices.dtype is not None and indices.dtype.kind != "i":
        raise DtypeError(f"{op}'s indices must be int32 or int64, got {indices.dtype}")


def _checked_indices(indices: Array, size: int, op: str) -> Array:
    if indices.dtype.kind != "i":
        raise DtypeError(f"{op}'s indices must be int32 or int64, got {indices.dtype}")
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise ValueError(f"{op}'s indices must lie in [{-size}, {size - 1}] for an axis of size {size}")
    return indices


def gather(x: Array, indices: Array, axis: int = 0) -> Array:
    along = normalize_axis(axis, x.ndim)
    return np.take(x, _checked_indices(indices, x.shape[along], "gather"), axis=along)


def _gather_vjp(g: Array, ans: Array, x: Array, indices: Array, axis: int = 0) -> Array:
    out = np.zeros(x.shape, g.dtype)
    np.add.at(out, _index(normalize_axis(axis, x.ndim), indices), g)
    return out


def _gather_type(x: TensorType, indices: TensorType, axis: int = 0) -> TensorType:
    _need_rank(x, "gather")
    _int_indices(indices, "gather")
    if x.shape is None or indices.shape is None:
        return TensorType(x.dtype, None)
    along = normalize_axis(axis, len(x.shape))
    if x.shape[along] == 0 and _product(indices.shape) not in (None, 0):
        raise ShapeError(f"gather cannot take indices from axis {axis} of size 0")
    return TensorType(x.dtype, x.shape[:along] + indices.shape + x.shape[along + 1 :])


defop(
    "gather",
    gather,
    _gather_vjp,
    None,
    infer=_gather_type,
    attrs={"axis": Attr("i", default=0)},
    reads=("y", ""),
    inputs="x, indices",
    convention="ONNX Gather / numpy take, negative indices count from the end; gradient scatter-adds (repeats add up)",
)


def _element_index(x: Array, indices: Array, axis: int) -> tuple[Array, ...]:
    """Where each output element comes from: `indices` on `axis`, its own position on every other axis."""
    along = normalize_axis(axis, x.ndim)
    if indices.ndim != x.ndim:
        raise ValueError(f"gather_elements needs indices of x's rank {x.ndim}, got rank {indices.ndim}")
    if any(n > d for i, (n, d) in enumerate(zip(indices.shape, x.shape, strict=True)) if i != along):
        raise ValueError(f"gather_elements' indices {list(indices.shape)} exceed x {list(x.shape)} off axis {axis}")
    size = x.shape[along]
    wrapped = _checked_indices(indices, size, "gather_elements") % max(size, 1)
    return tuple(
        wrapped if i == along else np.arange(n).reshape([-1 if j == i else 1 for j in range(x.ndim)])
        for i, n in enumerate(indices.shape)
    )


def gather_elements(x: Array, indices: Array, axis: int = 0) -> Array:
    return x[_element_index(x, indices, axis)]


def _gather_elements_vjp(g: Array, ans: Array, x: Array, indices: Array, axis: int = 0) -> Array:
    out = np.zeros(x.shape, g.dtype)
    np.add.at(out, _element_index(x, indices, axis), g)
    return out


def _gather_elements_type(x: TensorType, indices: TensorType, axis: int = 0) -> TensorType:
    _need_rank(x, "gather_elements")
    _int_indices(indices, "gather_elements")
    if x.shape is not None and indices.shape is not None:
        along = normalize_axis(axis, len(x.shape))
        if len(indices.shape) != len(x.shape):
            raise ShapeError(
                f"gather_elements needs indices of x's rank, got {describe(indices.shape)} for {describe(x.shape)}"
            )
        for i, (n, d) in enumerate(zip(indices.shape, x.shape, strict=True)):
            if i != along and n is not None and d is not None and n > d:
                raise ShapeError(
                    f"gather_elements' indices {describe(indices.shape)} exceed x {describe(x.shape)} off axis {axis}"
                )
        if x.shape[along] == 0 and _product(indices.shape) not in (None, 0):
            raise ShapeError(f"gather_elements cannot take indices from axis {axis} of size 0")
    elif x.shape is not None:
        normalize_axis(axis, len(x.shape))
    return TensorType(x.dtype, indices.shape)


defop(
    "gather_elements",
    gather_elements,
    _gather_elements_vjp,
    None,
    infer=_gather_elements_type,
    attrs={"axis": Attr("i", default=0)},
    reads=("y", ""),
    inputs="x, indices",
    convention="torch.gather / ONNX GatherElements; gradient scatter-adds",
)


# ---------------------------------------------------------------- squeeze, unsqueeze, expand, tile, flatten
def _squeezed_axes(shape: tuple[int, ...], axes: Sequence[int] | None) -> tuple[int, ...]:
    if axes is None:
        return tuple(axis for axis, dim in enumerate(shape) if dim == 1)
    normalized = normalize_axes(axes, len(shape))
    for axis in normalized:
        if shape[axis] != 1:
            raise ValueError(f"squeeze cannot remove axis {axis} of size {shape[axis]}; only axes of size 1")
    return normalized


def squeeze(x: Array, *given: Array, axes: Sequence[int] | None = None) -> Array:
    return np.squeeze(x, _squeezed_axes(x.shape, override(given, 0, axes, "squeeze's axes")))


def _squeeze_type(x: TensorType, *given: TensorType, axes: Sequence[int] | None = None) -> TensorType:
    if given:
        length = shape_like_length(given[0], "squeeze's axes")
        if x.shape is None or length is None:
            return TensorType(x.dtype, None)
        if length > len(x.shape):
            raise ShapeError(f"squeeze cannot remove {length} axes from a tensor of rank {len(x.shape)}")
        return TensorType(x.dtype, (None,) * (len(x.shape) - length))
    if x.shape is None:
        return x
    if axes is None:
        if None in x.shape:
            return TensorType(x.dtype, None)
        return TensorType(x.dtype, tuple(dim for dim in x.shape if dim != 1))
    removed = normalize_axes(axes, len(x.shape))
    for axis in removed:
        if x.shape[axis] not in (None, 1):
            raise ShapeError(f"squeeze cannot remove axis {axis} of size {x.shape[axis]}; only axes of size 1")
    return TensorType(x.dtype, tuple(dim for axis, dim in enumerate(x.shape) if axis not in removed))


defop(
    "squeeze",
    squeeze,
    lambda g, ans, x, *given, axes=None: np.reshape(g, x.shape),
    None,
    infer=_squeeze_type,
    attrs={"axes": Attr("ints")},
    reads=("", ""),
    min_arity=1,
    inputs="x, axes?",
    convention="`axes` absent removes every axis of size 1",
)


def _unsqueezed_axes(rank: int, axes: Sequence[int] | None) -> tuple[int, ...]:
    if axes is None:
        raise MissingAttr("unsqueeze", "axes")
    return normalize_axes(axes, rank + len(axes))


def unsqueeze(x: Array, *given: Array, axes: Sequence[int] | None = None) -> Array:
    return np.expand_dims(x, _unsqueezed_axes(x.ndim, override(given, 0, axes, "unsqueeze's axes")))


def _unsqueeze_type(x: TensorType, *given: TensorType, axes: Sequence[int] | None = None) -> TensorType:
    if given:
        length = shape_like_length(given[0], "unsqueeze's axes")
        if x.shape is None or length is None:
            return TensorType(x.dtype, None)
        return TensorType(x.dtype, (None,) * (len(x.shape) + length))
    if axes is None:
        raise MissingAttr("unsqueeze", "axes")
    if x.shape is None:
        return x
    inserted = _unsqueezed_axes(len(x.shape), axes)
    dims = iter(x.shape)
    return TensorType(x.dtype, tuple(1 if axis in inserted else next(dims) for axis in range(len(x.shape) + len(axes))))


defop(
    "unsqueeze",
    unsqueeze,
    lambda g, ans, x, *given, axes=None: np.reshape(g, x.shape),
    None,
    infer=_unsqueeze_type,
    attrs={"axes": Attr("ints")},
    reads=("", ""),
    min_arity=1,
    inputs="x, axes?",
    convention="`axes` index the result, as ONNX and numpy's expand_dims",
)


def expand(x: Array, *given: Array, shape: Sequence[int] | None = None) -> Array:
    target = override(given, 0, shape, "expand's shape")
    if target is None:
        raise MissingAttr("expand", "shape")
    if any(dim < 0 for dim in target):
        raise ValueError(f"expand's shape {target} has a negative size")
    out = np.broadcast_shapes(x.shape, tuple(target))
    if given:
        _checked_size(out, "expand")
    return np.array(np.broadcast_to(x, out))


def _expand_type(x: TensorType, *given: TensorType, shape: Sequence[int] | None = None) -> TensorType:
    if given:
        length = shape_like_length(given[0], "expand's shape")
        if x.shape is None or length is None:
            return TensorType(x.dtype, None)
        rank = max(len(x.shape), length)
        padded = (1,) * (rank - len(x.shape)) + x.shape
        return TensorType(x.dtype, tuple(dim if dim not in (None, 1) else None for dim in padded))
    if shape is None:
        raise MissingAttr("expand", "shape")
    if any(dim < 0 for dim in shape):
        raise ShapeError(f"expand's shape {list(shape)} has a negative size")
    return TensorType(x.dtype, broadcast_shapes(x.shape, tuple(shape)))


defop(
    "expand",
    expand,
    lambda g, ans, x, *given, shape=None: unbroadcast(g, x.shape),
    None,
    infer=_expand_type,
    attrs={"shape": Attr("ints")},
    reads=("", ""),
    min_arity=1,
    inputs="x, shape?",
    convention="ONNX Expand: x and `shape` broadcast both ways; gradient sums back",
)


def _repeats(rank: int, repeats: Sequence[int] | None) -> list[int]:
    if repeats is None:
        raise MissingAttr("tile", "repeats")
    if len(repeats) != rank:
        raise ShapeError(f"tile needs one repeat per axis ({rank}), got {list(repeats)}")
    if any(count < 0 for count in repeats):
        raise ShapeError(f"tile's repeats {list(repeats)} must not be negative")
    return list(repeats)


def tile(x: Array, *given: Array, repeats: Sequence[int] | None = None) -> Array:
    counts = _repeats(x.ndim, override(given, 0, repeats, "tile's repeats"))
    if given:
        _checked_size([dim * count for dim, count in zip(x.shape, counts, strict=True)], "tile")
    return np.tile(x, counts)


def _tile_vjp(g: Array, ans: Array, x: Array, *given: Array, repeats: Sequence[int] | None = None) -> Array:
    """The copies' gradients summed: g seen as (repeat, size) pairs of axes, summed over each repeat axis."""
    if 0 in x.shape:
        return np.zeros(x.shape, g.dtype)
    pairs = [size for dim, out in zip(x.shape, g.shape, strict=True) for size in (out // dim, dim)]
    return g.reshape(pairs).sum(axis=tuple(range(0, 2 * x.ndim, 2)))


def _tile_type(x: TensorType, *given: TensorType, repeats: Sequence[int] | None = None) -> TensorType:
    if given:
        length = shape_like_length(given[0], "tile's repeats")
        if x.shape is not None and length is not None and length != len(x.shape):
            raise ShapeError(f"tile needs one repeat per axis ({len(x.shape)}), got {length}")
        return TensorType(x.dtype, None if x.shape is None else tuple(0 if dim == 0 else None for dim in x.shape))
    if x.shape is None:
        return TensorType(x.dtype, (None,) * len(_repeats(len(repeats or ()), repeats)))
    counts = _repeats(len(x.shape), repeats)
    return TensorType(x.dtype, tuple(None if d is None else d * n for d, n in zip(x.shape, counts, strict=True)))


defop(
    "tile",
    tile,
    _tile_vjp,
    None,
    infer=_tile_type,
    attrs={"repeats": Attr("ints")},
    reads=("", ""),
    min_arity=1,
    inputs="x, repeats?",
    convention="one repeat per axis (ONNX Tile); gradient sums the copies",
)


def _flat_axis(axis: int, rank: int) -> int:
    if not -rank <= axis <= rank:
        raise ShapeError(f"flatten's axis {axis} is out of range for a tensor of rank {rank}")
    return axis if axis >= 0 else axis + rank


def flatten(x: Array, axis: int = 1) -> Array:
    along = _flat_axis(axis, x.ndim)
    return x.reshape(math.prod(x.shape[:along]), math.prod(x.shape[along:]))


def _flatten_type(x: TensorType, axis: int = 1) -> TensorType:
    if x.shape is None:
        return TensorType(x.dtype, (None, None))
    along = _flat_axis(axis, len(x.shape))
    return TensorType(x.dtype, (_product(x.shape[:along]), _product(x.shape[along:])))


defop(
    "flatten",
    flatten,
    lambda g, ans, x, axis=1: np.reshape(g, x.shape),
    infer=_flatten_type,
    attrs={"axis": Attr("i", default=1)},
    reads=("",),
    inputs="x",
    convention="ONNX Flatten: to 2-D, the axes before `axis` and the rest",
)


# ---------------------------------------------------------------- pad
PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _pad_geometry(shape: Sequence[int], pads: Sequence[int] | None) -> tuple[tuple[slice, ...], list[tuple[int, int]]]:
    """Negative pads crop first; then the rest is padded: (the crop, the (before, after) widths)."""
    rank = len(shape)
    if pads is None:
        raise MissingAttr("pad", "pads")
    if len(pads) != 2 * rank:
        raise ShapeError(f"pad needs 2 * rank = {2 * rank} pads (all begins, then all ends), got {list(pads)}")
    crop = []
    for dim, before, after in zip(shape, pads[:rank], pads[rank:], strict=True):
        start, stop = max(-before, 0), dim - max(-after, 0)
        if stop < start:
            raise ShapeError(f"pads {list(pads)} crop more than the axis of size {dim} holds")
        crop.append(slice(start, stop))
    widths = [(max(before, 0), max(after, 0)) for before, after in zip(pads[:rank], pads[rank:], strict=True)]
    return tuple(crop), widths


def _check_mode(mode: str) -> None:
    if mode not in PAD_MODES:
        raise ShapeError(f"pad's mode must be one of {', '.join(PAD_MODES)}, got {mode!r}")


def _fill(given: Sequence[Array], value: float) -> float | Array:
    if len(given) < 2:
        return value
    fill = np.asarray(given[1])
    if fill.size != 1:
        raise ValueError(f"pad's value must be a scalar or a tensor of one element, got shape {list(fill.shape)}")
    return fill.reshape(())


def pad(
    x: Array, *given: Array, pads: Sequence[int] | None = None, mode: str = "constant", value: float = 0.0
) -> Array:
    _check_mode(mode)
    crop, widths = _pad_geometry(x.shape, override(given, 0, pads, "pad's pads"))
    cropped = x[crop]
    if given:
        _checked_size([dim + sum(width) for dim, width in zip(cropped.shape, widths, strict=True)], "pad")
    if mode == "constant":
        return np.pad(cropped, widths, mode="constant", constant_values=_fill(given, value))
    return np.pad(cropped, widths, mode=mode)


def _pad_x(
    g: Array, ans: Array, x: Array, *given: Array, pads: Sequence[int] | None = None, mode: str = "constant",
    value: float = 0.0,
) -> Array:  # fmt: skip
    """Axis by axis, the padded positions' gradients go back to the elements they copy; where they
    come from is read off np.pad applied to the positions themselves, so every mode is np.pad's."""
    crop, widths = _pad_geometry(x.shape, override(given, 0, pads, "pad's pads"))
    grad = g
    for axis, (before, after) in enumerate(widths):
        if before == after == 0:
            continue
        size = crop[axis].stop - crop[axis].start
        moved = np.moveaxis(grad, axis, 0)
        inner = moved[before : before + size]
        if mode != "constant":
            inner = inner.copy()
            source = np.pad(np.arange(size), (before, after), mode=mode)
            edges = np.r_[0:before, before + size : before + size + after]
            np.add.at(inner, source[edges], moved[edges])
        grad = np.moveaxis(inner, 0, axis)
    out = np.zeros(x.shape, g.dtype)
    out[crop] = grad
    return out


def _pad_value(
    g: Array, ans: Array, x: Array, pads_tensor: Array, fill: Array, *, pads: Sequence[int] | None = None,
    mode: str = "constant", value: float = 0.0,
) -> Array:  # fmt: skip
    """Every position the constant fills passes its gradient to the constant."""
    if mode != "constant":
        return np.zeros(np.shape(fill), g.dtype)
    crop, widths = _pad_geometry(x.shape, tensor_ints(pads_tensor, "pad's pads"))
    inner = tuple(slice(before, before + c.stop - c.start) for c, (before, _) in zip(crop, widths, strict=True))
    return np.full(np.shape(fill), g.sum() - g[inner].sum(), g.dtype)


def _pad_type(
    x: TensorType, *given: TensorType, pads: Sequence[int] | None = None, mode: str = "constant", value: float = 0.0
) -> TensorType:
    _check_mode(mode)
    if len(given) > 1 and given[1].shape is not None and _product(given[1].shape) not in (None, 1):
        raise ShapeError(f"pad's value must be a scalar or a tensor of one element, got {describe(given[1].shape)}")
    if given:
        length = shape_like_length(given[0], "pad's pads")
        if x.shape is not None and length is not None and length != 2 * len(x.shape):
            raise ShapeError(f"pad needs 2 * rank = {2 * len(x.shape)} pads, got {length}")
        return TensorType(x.dtype, None if x.shape is None else (None,) * len(x.shape))
    if pads is None:
        raise MissingAttr("pad", "pads")
    if len(pads) % 2 or x.shape is not None and len(pads) != 2 * len(x.shape):
        raise ShapeError(f"pad needs 2 * rank pads (all begins, then all ends), got {list(pads)}")
    rank = len(pads) // 2
    if x.shape is None:
        return TensorType(x.dtype, (None,) * rank)
    out: list[Dim] = []
    for dim, before, after in zip(x.shape, pads[:rank], pads[rank:], strict=True):
        if dim is None:
            out.append(None)
            continue
        kept = dim - max(-before, 0) - max(-after, 0)
        if kept < 0:
            raise ShapeError(f"pads {list(pads)} crop more than {describe(x.shape)} holds")
        if kept == 0 and mode != "constant" and max(before, after) > 0:
            raise ShapeError(f"pad's mode {mode!r} cannot extend an empty axis")
        out.append(dim + before + after)
    return TensorType(x.dtype, tuple(out))


defop(
    "pad",
    pad,
    _pad_x,
    None,
    _pad_value,
    infer=_pad_type,
    attrs={"pads": Attr("ints"), "mode": Attr("s", default="constant"), "value": Attr("f", default=0.0)},
    reads=("1", "", "1"),
    min_arity=1,
    inputs="x, pads?, value?",
    convention="`pads` all begins then all ends (ONNX), negative pads crop first; modes constant, reflect, edge, "
    "wrap as numpy's pad; gradient sums the copies",
)


# ---------------------------------------------------------------- shape, one_hot, argmax, argmin (no gradient)
def shape(x: Array, start: int = 0, end: int | None = None) -> Array:
    return np.array(x.shape[start:end], dtype=np.int64)


def _shape_type(x: TensorType, start: int = 0, end: int | None = None) -> TensorType:
    length = None if x.shape is None else len(range(len(x.shape))[start:end])
    return TensorType(np.dtype(np.int64), (length,))


defop(
    "shape",
    shape,
    None,
    infer=_shape_type,
    attrs={"start": Attr("i", default=0), "end": Attr("i")},
    reads=("",),
    inputs="x",
    convention="int64; `start`, `end` slice it (ONNX 15)",
)


def _depth(given: Sequence[Array], depth: int | None) -> int:
    found = tensor_int(given[0], "one_hot's depth") if given else depth
    if found is None:
        raise MissingAttr("one_hot", "depth")
    if found < 1:
        raise ValueError(f"one_hot's depth must be at least 1, got {found}")
    return found


def one_hot(
    indices: Array, *given: Array, depth: int | None = None, axis: int = -1, dtype: str = "int64",
    on_value: float = 1.0, off_value: float = 0.0,
) -> Array:  # fmt: skip
    count = _depth(given, depth)
    along = normalize_axis(axis, indices.ndim + 1)
    if indices.dtype.kind not in "iuf":
        raise DtypeError(f"one_hot's indices must be numbers, got {indices.dtype}")
    if len(given) > 1:
        values = np.asarray(given[1]).reshape(-1)
        if values.size != 2:
            raise ValueError(f"one_hot's values must hold [off, on], got {values.size} elements")
        off, on, out_dtype = values[0], values[1], values.dtype
    else:
        off, on, out_dtype = off_value, on_value, _dtype(dtype)
    shape = list(indices.shape)
    shape.insert(along, count)
    if given:
        _checked_size(shape, "one_hot")
    positions = indices.astype(np.int64)
    positions = np.expand_dims(np.where(positions < 0, positions + count, positions), along)
    classes = np.arange(count).reshape([count if i == along else 1 for i in range(len(shape))])
    return np.where(positions == classes, on, off).astype(out_dtype)


def _dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise DtypeError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return np.dtype(name)


def _one_hot_type(
    indices: TensorType, *given: TensorType, depth: int | None = None, axis: int = -1, dtype: str = "int64",
    on_value: float = 1.0, off_value: float = 0.0,
) -> TensorType:  # fmt: skip
    if indices.dtype is not None and indices.dtype.kind not in "iuf":
        raise DtypeError(f"one_hot's indices must be numbers, got {indices.dtype}")
    if given:
        shape_like_length(given[0], "one_hot's depth", scalar=True)
    elif depth is None:
        raise MissingAttr("one_hot", "depth")
    elif depth < 1:
        raise ShapeError(f"one_hot's depth must be at least 1, got {depth}")
    out_dtype = _dtype(dtype)
    if len(given) > 1:
        values = given[1]
        out_dtype = values.dtype  # type: ignore[assignment]
        if values.shape is not None and _product(values.shape) not in (None, 2):
            raise ShapeError(f"one_hot's values must hold [off, on], got shape {describe(values.shape)}")
    if indices.shape is None:
        return TensorType(out_dtype, None)
    along = normalize_axis(axis, len(indices.shape) + 1)
    shape = list(indices.shape)
    shape.insert(along, None if given else depth)
    return TensorType(out_dtype, tuple(shape))


defop(
    "one_hot",
    one_hot,
    None,
    None,
    None,
    infer=_one_hot_type,
    attrs={
        "depth": Attr("i"),
        "axis": Attr("i", default=-1),
        "dtype": Attr("s", default="int64"),
        "on_value": Attr("f", default=1.0),
        "off_value": Attr("f", default=0.0),
    },
    reads=("", "", ""),
    min_arity=1,
    inputs="indices, depth?, values?",
    convention="no gradient; negative indices count from depth, others out of range give all off (ONNX); "
    "`values` = [off, on] sets the dtype",
)


def _arg_extreme(pick: str, x: Array, axis: int, keepdims: bool, select_last_index: bool) -> Array:
    along = normalize_axis(axis, x.ndim)
    function = np.argmax if pick == "max" else np.argmin
    if not select_last_index:
        return function(x, axis=along, keepdims=keepdims).astype(np.int64)
    last = x.shape[along] - 1 - function(np.flip(x, along), axis=along, keepdims=keepdims)
    return np.asarray(last, dtype=np.int64)


def argmax(x: Array, axis: int = 0, keepdims: bool = False, select_last_index: bool = False) -> Array:
    return _arg_extreme("max", x, axis, keepdims, select_last_index)


def argmin(x: Array, axis: int = 0, keepdims: bool = False, select_last_index: bool = False) -> Array:
    return _arg_extreme("min", x, axis, keepdims, select_last_index)


def _arg_type(x: TensorType, axis: int = 0, keepdims: bool = False, select_last_index: bool = False) -> TensorType:
    _need_rank(x, "argmax and argmin")
    if x.shape is None:
        return TensorType(np.dtype(np.int64), None)
    along = normalize_axis(axis, len(x.shape))
    if x.shape[along] == 0:
        raise ShapeError(f"argmax and argmin need a non-empty axis {axis}, got {describe(x.shape)}")
    if keepdims:
        return TensorType(np.dtype(np.int64), x.shape[:along] + (1,) + x.shape[along + 1 :])
    return TensorType(np.dtype(np.int64), x.shape[:along] + x.shape[along + 1 :])


ARG_ATTRS = {
    "axis": Attr("i", default=0),
    "keepdims": Attr("b", default=False),
    "select_last_index": Attr("b", default=False),
}
for _name, _function in (("argmax", argmax), ("argmin", argmin)):
    defop(
        _name,
        _function,
        None,
        infer=_arg_type,
        attrs=ARG_ATTRS,
        reads=("",),
        inputs="x",
        convention="int64, no gradient; ties give the first index (`select_last_index`: the last); NaN wins",
    )


# ---------------------------------------------------------------- cumsum
def _cumulative(x: Array, axis: int, exclusive: bool, reverse: bool) -> Array:
    if reverse:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=x.dtype if x.dtype.kind == "i" else None)
    if exclusive:
        shifted = np.zeros_like(out)
        shifted[_index(axis, slice(1, None))] = out[_index(axis, slice(None, -1))]
        out = shifted
    return np.flip(out, axis) if reverse else out


def _cumsum_axis(x: Array, given: Sequence[Array], axis: int) -> int:
    return normalize_axis(tensor_int(given[0], "cumsum's axis") if given else axis, x.ndim)


def cumsum(x: Array, *given: Array, axis: int = 0, exclusive: bool = False, reverse: bool = False) -> Array:
    return _cumulative(x, _cumsum_axis(x, given, axis), exclusive, reverse)


def _cumsum_vjp(
    g: Array, ans: Array, x: Array, *given: Array, axis: int = 0, exclusive: bool = False, reverse: bool = False
) -> Array:
    """A running sum's transpose is the running sum the other way."""
    return _cumulative(g, _cumsum_axis(x, given, axis), exclusive, not reverse)


def _cumsum_type(
    x: TensorType, *given: TensorType, axis: int = 0, exclusive: bool = False, reverse: bool = False
) -> TensorType:
    _need_rank(x, "cumsum")
    if given:
        shape_like_length(given[0], "cumsum's axis", scalar=True)
    elif x.shape is not None:
        normalize_axis(axis, len(x.shape))
    dtype = np.dtype(np.int64) if x.dtype is not None and x.dtype.kind == "b" else x.dtype
    return TensorType(dtype, x.shape)


defop(
    "cumsum",
    cumsum,
    _cumsum_vjp,
    None,
    infer=_cumsum_type,
    attrs={"axis": Attr("i", default=0), "exclusive": Attr("b", default=False), "reverse": Attr("b", default=False)},
    reads=("1", ""),
    min_arity=1,
    inputs="x, axis?",
    convention="ONNX CumSum (`exclusive`, `reverse`), ints keep their dtype as ONNX's; gradient: the running sum "
    "reversed",
)
