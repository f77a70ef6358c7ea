"""Pooling over windows (max_pool, average_pool) and over whole spatial axes (global_*_pool).

Windows come from ops/conv.py's geometry. A pool's value is a running maximum or sum over the
kernel offsets' strided slices, holding no more than the output and keeping the input's layout
(channels innermost in memory after a wide conv, or first). Gradients go back offset by offset onto
the positions each offset reads: max_pool's to each window's first maximum, found with arithmetic
on masks (masked writes are far slower), average_pool's share to every element; an assignment when
windows do not overlap. Nothing copies the windows, and nothing loops over pixels.

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
    int_list,
    is_channels_last,
    pad_input,
    padded_lengths,
    sliding_axes,
    spatial_rank,
    unpad,
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
    """combine(...combine(slice_0, slice_1)..., slice_last) over the kernel offsets' strided slices, in xp's layout."""
    offsets = list(np.ndindex(*geometry.kernel))
    total = xp[(..., *geometry.offset(offsets[0]))].copy(order="K")
    for ks in offsets[1:]:
        combine(total, xp[(..., *geometry.offset(ks))], out=total)
    return total


def _max_pool_x(g: Array, ans: Array, x: Array, **attrs: object) -> Array:
    """The output gradient routed to each window's winner, summed back where windows overlap.

    Kernel offset by kernel offset, each window's winner is its first element equal to its maximum, as
    torch's kernel decides (a later element wins only when greater); in a window whose maximum is NaN,
    its last NaN (a later element wins when NaN). No copy of the windows is made."""
    geometry, ends = _pool_windows("max_pool", x, **_window_attrs(attrs))
    xp = pad_input(x, geometry, ends, lowest(x.dtype))
    dxp = np.zeros_like(xp, dtype=g.dtype)
    offsets = list(np.ndindex(*geometry.kernel))
    hit = np.empty_like(ans, dtype=bool)
    routed = np.empty_like(ans, dtype=g.dtype)

    def send(ks: tuple[int, ...], alone: bool) -> None:
        """g where `hit`, onto the positions kernel offset ks reads; assigned when no other offset reaches them."""
        target = dxp[(..., *geometry.offset(ks))]
        if alone:
            np.multiply(g, hit, out=target)
        else:
            np.multiply(g, hit, out=routed)
            target += routed

    unclaimed = np.ones_like(ans, dtype=bool)
    nan = np.isnan(ans) if ans.dtype.kind == "f" else None
    if nan is not None and nan.any():
        unclaimed ^= nan
    else:
        nan = None
    for index, ks in enumerate(offsets):
        np.equal(xp[(..., *geometry.offset(ks))], ans, out=hit)
        hit &= unclaimed
        if index + 1 < len(offsets):
            unclaimed ^= hit
        send(ks, geometry.disjoint)
    if nan is not None:
        for ks in reversed(offsets):
            np.isnan(xp[(..., *geometry.offset(ks))], out=hit)
            hit &= nan
            nan ^= hit
            send(ks, alone=False)
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
    """Each window's share of the output gradient, added back offset by offset (assigned when windows are disjoint)."""
    geometry, ends = _pool_windows("average_pool", x, **_window_attrs(attrs))
    share = g / _counts(geometry, ends, bool(attrs.get("count_include_pad", False))).astype(g.dtype)
    lengths = padded_lengths(geometry, ends)
    dxp = np.zeros((*x.shape[:2], *lengths), dtype=share.dtype)
    if is_channels_last(share):
        dxp = np.moveaxis(np.zeros((x.shape[0], *lengths, x.shape[1]), dtype=share.dtype), -1, 1)
    for ks in np.ndindex(*geometry.kernel):
        target = dxp[(..., *geometry.offset(ks))]
        if geometry.disjoint:
            target[...] = share
        else:
            target += share
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
