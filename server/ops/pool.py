"""Pooling over windows (max_pool, average_pool) and over whole spatial axes (global_*_pool).

Windows come from ops/conv.py's geometry. A pool's value is a running maximum or sum over the
kernel offsets' strided slices, holding no more than the output. max_pool's gradient copies the
windows once into contiguous (kernel offset, window) rows, finds each window's first maximum with
arithmetic on masks (masked writes are far slower) and goes back through col2im (one copy when
windows do not overlap). Nothing loops over pixels.

Conventions are PyTorch's. max_pool pads with -inf and gives the gradient to the first maximal
element of each window (the index torch's backward routes to), a NaN winning as in torch;
overlapping windows accumulate. average_pool divides by the window's elements inside the input,
or with count_include_pad also inside the declared pads, never the part of a ceil_mode window
that hangs over the end (torch.nn.functional.avg_pool).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from chainrule.server.ops.conv import (
    Ints,
    Windows,
    col2im,
    int_list,
    pad_input,
    padded_lengths,
    sliding_axes,
    spatial_rank,
    stacked,
    unpad,
    unstacked,
    windows_of,
)
from chainrule.server.ops.elementwise import as_float
from chainrule.server.ops.registry import Array, Attr, defop
from chainrule.server.shapes import ShapeError, TensorType, float_result


# ---------------------------------------------------------------- shape rules
def _pool_shape(
    op: str,
    x: TensorType,
    kernel_shape: Sequence[int],
    strides: Ints,
    pads: Ints,
    dilations: Ints,
    auto_pad: str,
    ceil_mode: bool,
) -> tuple[int | None, ...] | None:
    rank = spatial_rank(op, x.shape)
    kernel = int_list("kernel_shape", kernel_shape, rank, 1, 1)
    assert kernel is not None
    sizes = None if x.shape is None else x.shape[2:]
    axes = sliding_axes(op, sizes, kernel, strides, pads, dilations, auto_pad, ceil_mode)
    if axes is None or x.shape is None:
        return None
    return (*x.shape[:2], *(None if axis is None else axis[2] for axis in axes))


def _max_pool_type(
    x: TensorType,
    *,
    kernel_shape: Sequence[int],
    strides: Ints = None,
    pads: Ints = None,
    dilations: Ints = None,
    ceil_mode: bool = False,
    auto_pad: str = "NOTSET",
    storage_order: int = 0,
) -> TensorType:
    if storage_order not in (0, 1):
        raise ShapeError(f"storage_order is {storage_order}; expected 0 (row major) or 1 (column major)")
    return TensorType(x.dtype, _pool_shape("max_pool", x, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode))


def _average_pool_type(
    x: TensorType,
    *,
    kernel_shape: Sequence[int],
    strides: Ints = None,
    pads: Ints = None,
    dilations: Ints = None,
    ceil_mode: bool = False,
    count_include_pad: bool = False,
    auto_pad: str = "NOTSET",
) -> TensorType:
    shape = _pool_shape("average_pool", x, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)
    return TensorType(float_result(x.dtype), shape)


def _pool_windows(
    op: str,
    x: Array,
    kernel_shape: Sequence[int],
    strides: Ints,
    pads: Ints,
    dilations: Ints,
    auto_pad: str,
    ceil_mode: bool,
) -> tuple[Windows, tuple[int, ...]]:
    spatial_rank(op, x.shape)
    int_list("kernel_shape", kernel_shape, x.ndim - 2, 1, 1)
    geometry, ends = windows_of(op, x.shape[2:], kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)
    geometry.check(op, x.shape[0] * x.shape[1], padded_lengths(geometry, ends))
    return geometry, ends


# ---------------------------------------------------------------- max_pool
def lowest(dtype: np.dtype) -> object:
    """What max_pool pads with: a value no element can lose to."""
    if dtype.kind == "f":
        return -np.inf
    if dtype.kind == "b":
        return False
    return np.iinfo(dtype).min


def max_pool(
    x: Array,
    *,
    kernel_shape: Sequence[int],
    strides: Ints = None,
    pads: Ints = None,
    dilations: Ints = None,
    ceil_mode: bool = False,
    auto_pad: str = "NOTSET",
    storage_order: int = 0,
) -> Array:
    """The maximum of each window: a running maximum over the kernel offsets' strided slices, holding
    no more than the output (which window element won is worked out only when a gradient is wanted)."""
    geometry, ends = _pool_windows("max_pool", x, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)
    return _running(np.maximum, pad_input(x, geometry, ends, lowest(x.dtype)), geometry)


def _running(combine: np.ufunc, xp: Array, geometry: Windows) -> Array:
    """combine(...combine(slice_0, slice_1)..., slice_last) over the kernel offsets' strided slices."""
    offsets = list(np.ndindex(*geometry.kernel))
    total = xp[(..., *geometry.offset(offsets[0]))].copy()
    for ks in offsets[1:]:
        combine(total, xp[(..., *geometry.offset(ks))], out=total)
    return total


def first_maximum(stack: Array, best: Array) -> Array:
    """The row of `stack` holding each column's maximum `best`: the first such row, or for a NaN the last
    NaN, as torch's kernel decides (a later element wins when greater, or when NaN)."""
    dtype = np.dtype(np.uint8 if len(stack) <= 256 else np.int32)
    winner = np.zeros(best.shape, dtype=dtype)
    unclaimed = np.ones(best.shape, dtype=bool)
    for k in range(len(stack)):
        hit = stack[k] == best
        hit &= unclaimed
        unclaimed ^= hit
        if k:
            winner += hit * dtype.type(k)
    if best.dtype.kind == "f":
        nan = np.isnan(best)
        if nan.any():
            for k in range(len(stack)):
                winner[nan & np.isnan(stack[k])] = k
    return winner


def _max_pool_x(g: Array, ans: Array, x: Array, **attrs: object) -> Array:
    """The output gradient routed to each window's winner, summed back where windows overlap."""
    geometry, ends = _pool_windows("max_pool", x, **_window_attrs(attrs))
    stack = stacked(pad_input(x, geometry, ends, lowest(x.dtype)), geometry)
    winner = first_maximum(stack, ans.reshape(-1))
    offsets = np.arange(len(stack), dtype=winner.dtype)[:, None]
    routed = (winner == offsets) * g.reshape(-1)
    dxp = col2im(unstacked(routed, geometry, x.shape[:2]), geometry, padded_lengths(geometry, ends))
    return unpad(dxp, geometry)


def _window_attrs(attrs: dict[str, object]) -> dict[str, object]:
    """The attrs that place the windows, with the defaults the registry fills in."""
    return {
        "kernel_shape": attrs["kernel_shape"],
        "strides": attrs.get("strides"),
        "pads": attrs.get("pads"),
        "dilations": attrs.get("dilations"),
        "auto_pad": attrs.get("auto_pad", "NOTSET"),
        "ceil_mode": attrs.get("ceil_mode", False),
    }


POOL_ATTRS = {
    "kernel_shape": Attr("ints", required=True),
    "strides": Attr("ints"),
    "pads": Attr("ints"),
    "dilations": Attr("ints"),
    "ceil_mode": Attr("b", default=False),
    "auto_pad": Attr("s", default="NOTSET"),
}
defop(
    "max_pool",
    max_pool,
    _max_pool_x,
    infer=_max_pool_type,
    attrs={**POOL_ATTRS, "storage_order": Attr("i", default=0)},
    reads=("x ans",),
    inputs="x (N, C, spatial...)",
    convention="to the first maximum of each window (PyTorch), overlapping windows accumulate; pads are -inf",
)


# ---------------------------------------------------------------- average_pool
def _counts(geometry: Windows, ends: Sequence[int], count_include_pad: bool) -> Array:
    """How many elements each window averages, shape (*outs): per axis, the kernel positions that
    fall inside the input (or inside input and pads), multiplied across axes."""
    counts = np.ones((), dtype=np.int64)
    for axis, (out, stride, k, d) in enumerate(
        zip(geometry.outs, geometry.strides, geometry.kernel, geometry.dilations, strict=True)
    ):
        begin, size = geometry.begins[axis], geometry.sizes[axis]
        low, high = (0, begin + size + ends[axis]) if count_include_pad else (begin, begin + size)
        positions = np.arange(out)[:, None] * stride + np.arange(k)[None, :] * d
        inside = ((positions >= low) & (positions < high)).sum(axis=1)
        counts = np.multiply.outer(counts, inside)
    return counts


def average_pool(
    x: Array,
    *,
    kernel_shape: Sequence[int],
    strides: Ints = None,
    pads: Ints = None,
    dilations: Ints = None,
    ceil_mode: bool = False,
    count_include_pad: bool = False,
    auto_pad: str = "NOTSET",
) -> Array:
    geometry, ends = _pool_windows("average_pool", x, kernel_shape, strides, pads, dilations, auto_pad, ceil_mode)
    total = _running(np.add, pad_input(as_float(x), geometry, ends), geometry)
    total /= _counts(geometry, ends, count_include_pad).astype(total.dtype)
    return total


def _average_pool_x(g: Array, ans: Array, x: Array, **attrs: object) -> Array:
    geometry, ends = _pool_windows("average_pool", x, **_window_attrs(attrs))
    share = g / _counts(geometry, ends, bool(attrs.get("count_include_pad", False))).astype(g.dtype)
    spread = np.broadcast_to(share.reshape(1, -1), (math.prod(geometry.kernel), share.size))
    dxp = col2im(unstacked(spread, geometry, x.shape[:2]), geometry, padded_lengths(geometry, ends))
    return unpad(dxp, geometry)


defop(
    "average_pool",
    average_pool,
    _average_pool_x,
    infer=_average_pool_type,
    attrs={**POOL_ATTRS, "count_include_pad": Attr("b", default=False)},
    reads=("",),
    inputs="x (N, C, spatial...)",
    convention="divides by the elements inside the input (count_include_pad: and its pads, never a ceil_mode "
    "overhang), as PyTorch",
)


# ---------------------------------------------------------------- global pools
def _global_type(op: str, x: TensorType, dtype: np.dtype | None) -> TensorType:
    spatial_rank(op, x.shape)
    if x.shape is None:
        return TensorType(dtype, None)
    if any(size == 0 for size in x.shape[2:]):
        raise ShapeError(f"{op} needs spatial axes of at least one element; x has shape {list(x.shape)}")
    return TensorType(dtype, (*x.shape[:2], *(1,) * (len(x.shape) - 2)))


def _spatial_axes(x: Array) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


def global_average_pool(x: Array) -> Array:
    _global_type("global_average_pool", TensorType(x.dtype, x.shape), None)
    return np.mean(as_float(x), axis=_spatial_axes(x), keepdims=True)


def _global_average_pool_x(g: Array, ans: Array, x: Array) -> Array:
    return np.broadcast_to(g / math.prod(x.shape[2:]), x.shape)


def global_max_pool(x: Array) -> tuple[Array, Array]:
    """The maximum over the spatial axes, and where it is: the first maximum, as max_pool's."""
    _global_type("global_max_pool", TensorType(x.dtype, x.shape), None)
    flat = x.reshape(*x.shape[:2], math.prod(x.shape[2:]))
    winner = np.argmax(flat, axis=-1)[..., None]
    best = np.take_along_axis(flat, winner, axis=-1)
    return best.reshape(*x.shape[:2], *(1,) * (x.ndim - 2)), winner


def _global_max_pool_x(g: Array, winner: Array, x: Array) -> Array:
    dx = np.zeros((*x.shape[:2], math.prod(x.shape[2:])), dtype=g.dtype)
    np.put_along_axis(dx, winner, g.reshape(*x.shape[:2], 1), axis=-1)
    return dx.reshape(x.shape)


defop(
    "global_average_pool",
    global_average_pool,
    _global_average_pool_x,
    infer=lambda x: _global_type("global_average_pool", x, float_result(x.dtype)),
    reads=("",),
    inputs="x (N, C, spatial...)",
    convention="keeps the spatial axes as size 1 (ONNX)",
)
defop(
    "global_max_pool",
    global_max_pool,
    _global_max_pool_x,
    infer=lambda x: _global_type("global_max_pool", x, x.dtype),
    reads=("ans",),
    saves=True,
    inputs="x (N, C, spatial...)",
    convention="to the first maximum (PyTorch's adaptive_max_pool); keeps the spatial axes as size 1",
)
