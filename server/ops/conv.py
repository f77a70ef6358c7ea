"""Convolutions (conv, conv_transpose) as matrix products over strided views.

No Python loop ever runs over pixels. `windows` views every (sample, channel, kernel offset,
output position) of the padded input through `as_strided` without copying; one copy turns that
view into the im2col matrix, and one BLAS product per group does the arithmetic. A conv keeps its
im2col matrix as the residual: the weight's gradient is a product with exactly that matrix.
Going back (col2im) adds each kernel offset's block onto the positions that offset reads, never
anything else, so a NaN or infinite weight spreads exactly as far as in PyTorch.

Layouts. Arrays are indexed (N, C, spatial...) everywhere, but a conv with many channels (WIDE)
keeps them innermost in memory: its padded input, output and input gradient are (N, spatial..., C)
arrays seen through a transposed view. im2col then copies runs of channels (a kernel row of them,
undilated) into rows, the product is one BLAS call per group over every sample's rows writing the
output in place, and col2im is one product per kernel offset whose block is added in runs of an
output row of channels. Ops downstream (relu, pools, batch norm, adds) keep whatever layout they
are given, so a network of wide convs stays channels-last from its first conv to its last. Narrow
convs (the first layer of an image network, LeNet's) keep channels first: im2col copies along
image rows into contiguous columns, the product runs per sample, and col2im puts the batch
innermost so its adds run along an output row of samples.

A stride-1 conv of wide channels whose padding is small beside its image (ResNet's 3x3 convs at 14x14
and more) skips im2col for its value and its input's gradient: seen as one (N * positions, C) matrix,
its padded input holds every kernel offset's rows as a shifted row range, so the conv is one BLAS product
per offset over the whole batch, each adding onto the output in place (Shifts). Output rows that run
past an image row are computed and never read (the value is copied out from among them, so it owns only
its own bytes), and col2im runs the same way backwards; it multiplies zero output gradients onto positions
a weight never reads, so a NaN or infinite weight takes the im2col way.

Depthwise convs (a group per input channel, MobileNet's) skip im2col, whose products would each
have one column: one einsum over the strided windows view with wide channels, elementwise sums
over the kernel offsets with narrow ones.

Padding and cropping are one operation, `reframe`, a window onto the spatial axes that fills
what lies outside the array; its adjoint is the opposite window, which is how gradients come
back through padding. Geometry follows ONNX (pads as all begins then all ends, auto_pad),
values and gradients follow torch.nn.functional.conv1d/2d/3d and conv_transpose1d/2d/3d.

The pooling ops (ops/pool.py) share the geometry, the strided views and the layouts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from chainrule.server.ops.registry import Array, Attr, defop
from chainrule.server.shapes import Dim, Shape, ShapeError, TensorType, describe

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
SPATIAL_RANKS = (1, 2, 3)
MAX_KERNEL_OFFSETS = 1 << 16
"""Kernels loop over their offsets in Python, so a kernel may hold at most this many."""
PIECE_BYTES = 8 << 20
"""im2col matrices are built for as many samples at a time as fit in this: a large conv streams
cache-sized pieces through BLAS instead of writing and rereading one huge matrix."""
WIDE = 16
"""A conv whose input channels (per group) number at least this keeps its padded input and its input's
gradient with the channels innermost in memory (N, spatial..., C), and likewise its output for as many
output channels: copies and adds then run along the channels, and the product is one BLAS call over
every sample's rows. Fewer channels stay first (N, C, spatial...), so runs go along the image rows.
On a 2-core Xeon, 8 channels ran faster first and 12 or more last (conv, input and weight gradient)."""
MAX_WINDOW_ELEMENTS = 1 << 31
"""The most elements a padded input or an im2col matrix may hold (a conv or pool beyond it is refused
as out of memory): the request's memory estimate counts values, not these intermediates, and
absurd pads or dilations would otherwise ask for terabytes."""
SHIFTED_MAX_WASTE = 1.4
"""A stride-1 conv of one group and wide input channels runs as one product per kernel offset over shifted
views of its padded input (see Shifts) when that computes at most this many extended rows per real output
position (3x3 with pads of 1: 1.07 at 56x56, 1.15 at 28x28, 1.31 at 14x14, 1.65 at 7x7), and through
im2col otherwise. On a 2-core Xeon with OpenBLAS, one thread, ResNet-18's 3x3 convs at batch 8 took a third
less CPU that way at 56x56 (value and input gradient), a quarter and a seventh less at 28x28, about the
same at 14x14 and 70% more at 7x7. The weight's gradient stays one im2col product: a product per kernel
offset ran slower there. One product per offset over every sample, not per sample: with two BLAS threads
on a busy machine, 72 products per conv instead of 9 doubled the CPU time of ResNet-18's forward pass."""
Ints = Sequence[int] | None


# ---------------------------------------------------------------- attrs and geometry
def spatial_rank(op: str, shape: Shape, role: str = "x") -> int | None:
    """The number of spatial axes of an (N, C, spatial...) tensor; unknown for an unknown rank."""
    if shape is None:
        return None
    if len(shape) - 2 not in SPATIAL_RANKS:
        raise ShapeError(f"{op} takes {role} as (N, C, spatial...) with 1, 2 or 3 spatial axes; got {describe(shape)}")
    return len(shape) - 2


def rank_from_attrs(*lists: Ints, pads: Ints = None) -> int | None:
    """The spatial rank the list attrs imply when no shape says it."""
    for values in lists:
        if values is not None:
            return len(values)
    return None if pads is None else len(pads) // 2


def int_list(name: str, values: Ints, rank: int | None, default: int, least: int) -> tuple[int, ...] | None:
    """A per-axis list attr, checked: one entry per spatial axis, each at least `least`."""
    if values is not None:
        if rank is not None and len(values) != rank:
            raise ShapeError(f"{name} {list(values)} has {len(values)} entries for {rank} spatial axes")
        if any(value < least for value in values):
            raise ShapeError(f"{name} {list(values)} must hold values of at least {least}")
        return tuple(values)
    return None if rank is None else (default,) * rank


def pad_list(pads: Ints, rank: int | None) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """ONNX pads (all begins, then all ends), checked, as (begins, ends)."""
    if pads is not None:
        if rank is not None and len(pads) != 2 * rank:
            raise ShapeError(f"pads {list(pads)} has {len(pads)} entries; {rank} spatial axes take {2 * rank}")
        if len(pads) % 2:
            raise ShapeError(f"pads {list(pads)} has an odd number of entries (all begins, then all ends)")
        if any(pad < 0 for pad in pads):
            raise ShapeError(f"pads {list(pads)} must not be negative")
        half = len(pads) // 2
        return tuple(pads[:half]), tuple(pads[half:])
    return None if rank is None else ((0,) * rank, (0,) * rank)


def check_auto_pad(auto_pad: str) -> None:
    if auto_pad not in AUTO_PADS:
        raise ShapeError(f"auto_pad is {auto_pad!r}; expected one of {', '.join(AUTO_PADS)}")


def extent(kernel: int, dilation: int) -> int:
    """How many input positions one window spans."""
    return (kernel - 1) * dilation + 1


def sliding_axis(
    axis: int,
    size: Dim,
    kernel: Dim,
    stride: int,
    dilation: int,
    begin: int,
    end: int,
    auto_pad: str,
    ceil_mode: bool = False,
) -> tuple[int, int, int] | None:
    """(pad before, pad after, output size) of windows sliding along one axis; None while a size is unknown.

    SAME_* pads to ceil(size / stride) outputs, the odd pad going after (UPPER) or before (LOWER);
    VALID pads nothing; ceil_mode keeps a last window that starts inside the input or its
    leading pad (PyTorch and ONNX), whatever it overhangs.
    """
    if size is None or kernel is None:
        return None
    if kernel < 1:
        raise ShapeError(f"spatial axis {axis}: the kernel has size {kernel}; it must be at least 1")
    span = extent(kernel, dilation)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = -(-size // stride)
        total = max(0, (out - 1) * stride + span - size)
        begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        end = total - begin
    else:
        if auto_pad == "VALID":
            begin = end = 0
            ceil_mode = False
        room = size + begin + end - span
        if room < 0:
            raise ShapeError(
                f"spatial axis {axis}: a window spans {span} positions (kernel {kernel}, dilation {dilation}), "
                f"more than the {size + begin + end} of the padded input"
            )
        if ceil_mode:
            out = -(-room // stride) + 1
            if (out - 1) * stride >= size + begin:
                out -= 1
        else:
            out = room // stride + 1
    if out < 1:
        raise ShapeError(f"spatial axis {axis} of size {size} leaves no output positions")
    return begin, end, out


def check_kernel(kernel: Sequence[Dim]) -> None:
    if all(k is not None for k in kernel) and math.prod(kernel) > MAX_KERNEL_OFFSETS:
        raise ShapeError(f"a kernel of shape {list(kernel)} has more than {MAX_KERNEL_OFFSETS:,} positions")


def check_elements(op: str, what: str, shape: Sequence[int]) -> None:
    elements = math.prod(shape)
    if elements > MAX_WINDOW_ELEMENTS:
        raise MemoryError(f"{op}: {what} would hold {elements:,} elements, more than {MAX_WINDOW_ELEMENTS:,}")


@dataclass(frozen=True)
class Windows:
    """Where the windows fall along each spatial axis of a known input: everything the kernels need."""

    sizes: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begins: tuple[int, ...]
    """Padding before each axis (conv, pools); for conv_transpose what is cropped before (negative: added)."""
    outs: tuple[int, ...]

    @property
    def spans(self) -> tuple[int, ...]:
        """The padded length each axis needs so every window fits (ceil_mode windows may overhang the pads)."""
        return tuple(
            (out - 1) * stride + extent(k, d)
            for out, stride, k, d in zip(self.outs, self.strides, self.kernel, self.dilations, strict=True)
        )

    @property
    def disjoint(self) -> bool:
        """Whether no two windows share a position: each stride at least the window's extent (or one window)."""
        return all(
            out == 1 or stride >= extent(k, d)
            for out, stride, k, d in zip(self.outs, self.strides, self.kernel, self.dilations, strict=True)
        )

    def check(self, op: str, batch_channels: int, lengths: Sequence[int]) -> None:
        """Refuse windows whose padded input (of spatial `lengths`) or im2col matrix would be absurdly large."""
        check_elements(op, "the padded input", (batch_channels, *lengths))
        check_elements(op, "the windows", (batch_channels, *self.kernel, *self.outs))

    def offset(self, ks: tuple[int, ...]) -> tuple[slice, ...]:
        """The positions kernel offset `ks` reads for every output position, as slices of the padded input."""
        return tuple(
            slice(k * d, k * d + (out - 1) * stride + 1, stride)
            for k, d, out, stride in zip(ks, self.dilations, self.outs, self.strides, strict=True)
        )


def windows_of(
    op: str,
    sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Ints,
    pads: Ints,
    dilations: Ints,
    auto_pad: str,
    ceil_mode: bool = False,
) -> tuple[Windows, tuple[int, ...]]:
    """The windows of a conv or pool over a known input, and the pads after each axis."""
    axes = sliding_axes(op, tuple(sizes), tuple(kernel), strides, pads, dilations, auto_pad, ceil_mode)
    begins, ends, outs = zip(*axes, strict=True)  # type: ignore[misc]
    rank = len(sizes)
    steps = int_list("strides", strides, rank, 1, 1)
    spreads = int_list("dilations", dilations, rank, 1, 1)
    assert steps is not None and spreads is not None
    return Windows(tuple(sizes), tuple(kernel), steps, spreads, begins, outs), ends


def sliding_axes(
    op: str,
    sizes: tuple[Dim, ...] | None,
    kernel: tuple[Dim, ...] | None,
    strides: Ints,
    pads: Ints,
    dilations: Ints,
    auto_pad: str,
    ceil_mode: bool = False,
) -> list[tuple[int, int, int] | None] | None:
    """Check the attrs against the rank; per axis, (pad before, pad after, output size) or None if unknown."""
    check_auto_pad(auto_pad)
    rank = len(sizes) if sizes is not None else len(kernel) if kernel is not None else None
    rank = rank if rank is not None else rank_from_attrs(strides, dilations, pads=pads)
    steps = int_list("strides", strides, rank, 1, 1)
    spreads = int_list("dilations", dilations, rank, 1, 1)
    padding = pad_list(pads, rank)
    if rank is None or steps is None or spreads is None or padding is None:
        return None
    sizes = sizes if sizes is not None else (None,) * rank
    kernel = kernel if kernel is not None else (None,) * rank
    check_kernel(kernel)
    begins, ends = padding
    return [
        sliding_axis(axis, sizes[axis], kernel[axis], steps[axis], spreads[axis], begins[axis], ends[axis],
                     auto_pad, ceil_mode)
        for axis in range(rank)
    ]  # fmt: skip


# ---------------------------------------------------------------- layouts and padding
def is_channels_last(x: Array) -> bool:
    """Whether x (N, C, spatial...) holds its channels innermost in memory: (N, spatial..., C) in C order."""
    return bool(np.moveaxis(x, 1, -1).flags.c_contiguous)


def channels_last(x: Array) -> Array:
    """x (N, C, spatial...) as a C-ordered (N, spatial..., C) array: a view when its channels already are
    innermost in memory, else one transposing copy."""
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def channels_first(a: Array) -> Array:
    """A (N, spatial..., C) array as the (N, C, spatial...) every op and client indexes by: a view, the
    channels still innermost in memory."""
    return np.moveaxis(a, -1, 1)


def wide(channels: int) -> bool:
    """Whether a conv keeps `channels` (per group) innermost in memory; see WIDE."""
    return channels >= WIDE


def empty(shape: Sequence[int], dtype: np.dtype, last: bool) -> Array:
    """An uninitialized (N, C, spatial...) array, its channels innermost in memory when `last`."""
    if not last:
        return np.empty(shape, dtype=dtype)
    return channels_first(np.empty((shape[0], *shape[2:], shape[1]), dtype=dtype))


def reframe(
    x: Array, begins: Sequence[int], lengths: Sequence[int], fill: object = 0, last: bool | None = None
) -> Array:
    """The spatial window [begin, begin + length) of each axis of x, `fill` outside x: padding for
    negative begins or lengths past the end, cropping otherwise. A crop is a view; a copy, made to pad
    or when the crop does not have the layout `last` asks for (channels innermost in memory, or first
    after the batch and contiguous), has that layout, or x's when `last` is None. Only the border is
    filled before x is copied in."""
    sizes = x.shape[2:]
    if all(b >= 0 and b + n <= s for b, n, s in zip(begins, lengths, sizes, strict=True)):
        kept = x[(..., *(slice(b, b + n) for b, n in zip(begins, lengths, strict=True)))]
        if last is None or (is_channels_last(kept) if last else kept.flags.c_contiguous):
            return kept
    out = empty((*x.shape[:2], *lengths), x.dtype, is_channels_last(x) if last is None else last)
    target, source = [], []
    for b, n, s in zip(begins, lengths, sizes, strict=True):
        low, high = max(0, -b), min(n, s - b)
        if high <= low:
            out[...] = fill
            return out
        target.append(slice(low, high))
        source.append(slice(low + b, high + b))
    for axis, (kept, n) in enumerate(zip(target, lengths, strict=True)):
        before = (slice(None),) * (axis + 2)
        out[(*before, slice(0, kept.start))] = fill
        out[(*before, slice(kept.stop, n))] = fill
    out[(..., *target)] = x[(..., *source)]
    return out


def padded_lengths(geometry: Windows, ends: Sequence[int]) -> tuple[int, ...]:
    """The spatial size of the padded input: the input with its pads, or more when ceil_mode overhangs."""
    return tuple(
        max(begin + size + end, span)
        for begin, size, end, span in zip(geometry.begins, geometry.sizes, ends, geometry.spans, strict=True)
    )


def pad_input(x: Array, geometry: Windows, ends: Sequence[int], fill: object = 0, last: bool | None = None) -> Array:
    return reframe(x, [-b for b in geometry.begins], padded_lengths(geometry, ends), fill, last)


def unpad(dxp: Array, geometry: Windows) -> Array:
    """The gradient of `pad_input`: the padded gradient cropped back to the input, channels innermost in
    memory or first after the batch as dxp's are; a view unless the pads would keep more than as much
    again alive, or dxp's batch is not outermost."""
    cropped = reframe(dxp, geometry.begins, geometry.sizes)
    last = is_channels_last(dxp)
    if not last and not dxp.flags.c_contiguous:
        return np.ascontiguousarray(cropped)
    return cropped if 2 * cropped.size >= dxp.size else cropped.copy(order="K")


# ---------------------------------------------------------------- strided views, im2col and col2im
def windows(xp: Array, geometry: Windows) -> Array:
    """A read-only view (N, C, *kernel, *outs) of a padded input, element [n, c, k..., o...] being
    xp[n, c, o * stride + k * dilation ...]; nothing is copied. Axes of length 1 get stride 0, so an
    absurd stride or dilation that leaves one window cannot overflow the byte strides."""
    batch, channel, *axis_bytes = xp.strides
    kernel_strides = tuple(
        b * d if k > 1 else 0 for b, d, k in zip(axis_bytes, geometry.dilations, geometry.kernel, strict=True)
    )
    out_strides = tuple(
        b * s if o > 1 else 0 for b, s, o in zip(axis_bytes, geometry.strides, geometry.outs, strict=True)
    )
    shape = (*xp.shape[:2], *geometry.kernel, *geometry.outs)
    return as_strided(xp, shape, (batch, channel, *kernel_strides, *out_strides), writeable=False)


def weight_rows(w: Array, group: int) -> Array:
    """A weight (O, I, kernel...) as (group, O / group, prod(kernel) * I): each output channel's weights
    in the order of the im2col columns (kernel offset, then input channel)."""
    return np.ascontiguousarray(np.moveaxis(w, 1, -1)).reshape(group, w.shape[0] // group, math.prod(w.shape[1:]))


def weight_from_rows(rows: Array, shape: Sequence[int]) -> Array:
    """weight_rows' layout back to a C-ordered weight of `shape` (O, I, kernel...)."""
    outputs, inputs, *kernel = shape
    return np.ascontiguousarray(np.moveaxis(rows.reshape(outputs, *kernel, inputs), -1, 1))


def pad_for_conv(x: Array, geometry: Windows, ends: Sequence[int], group: int) -> Array:
    """The padded input of a conv, its channels innermost in memory when they are wide (see WIDE): per
    group, or all of them for a depthwise conv, which works channel by channel."""
    channels = x.shape[1]
    per_group = channels if is_depthwise(channels, group) else channels // group
    return pad_input(x, geometry, ends, last=wide(per_group))


def im2col(xp: Array, geometry: Windows, group: int, last: bool) -> Array:
    """The im2col matrices of a padded input xp (N, C, spatial...), as (N * prod(outs), group,
    prod(kernel) * C/group): row r holds the window behind output position r, in the order of
    weight_rows' columns. One copy of
    the strided view: row by row when the channels are wide and so innermost in xp's memory (`last`;
    runs of channels, or of a kernel row of them, on both sides), else along the output positions,
    into columns that are contiguous and returned as a transposed view."""
    batch, channels = xp.shape[:2]
    rank = len(geometry.kernel)
    view = windows(xp, geometry).reshape(batch, group, channels // group, *geometry.kernel, *geometry.outs)
    kernel_axes, out_axes = tuple(range(3, 3 + rank)), tuple(range(3 + rank, 3 + 2 * rank))
    rows = batch * math.prod(geometry.outs)
    columns = channels // group * math.prod(geometry.kernel)
    if last:
        cols = np.ascontiguousarray(view.transpose(0, *out_axes, 1, *kernel_axes, 2))
        return cols.reshape(rows, group, columns)
    cols = np.ascontiguousarray(view.transpose(1, *kernel_axes, 2, 0, *out_axes))
    return cols.reshape(group, columns, rows).transpose(2, 0, 1)


def grouped_product(a: Array, b: Array, out: Array) -> None:
    """out[:, g] = a[:, g] @ b[g] for every group g: a (R, group, P), b (group, P, Q), out (R, group, Q);
    one BLAS product per group, whatever the operands' strides along their rows."""
    if a.shape[1] == 1:
        np.matmul(a[:, 0], b[0], out=out[:, 0])
    else:
        np.matmul(a.transpose(1, 0, 2), b, out=out.transpose(1, 0, 2))


def pieces(batch: int, per_sample: int) -> list[slice]:
    """Consecutive runs of samples whose im2col matrices, of `per_sample` bytes each, fit in PIECE_BYTES."""
    size = max(1, PIECE_BYTES // max(1, per_sample))
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


def cols_bytes(padded: Array, geometry: Windows) -> int:
    """The bytes of one sample's im2col matrix."""
    return padded.shape[1] * math.prod(geometry.kernel) * math.prod(geometry.outs) * padded.itemsize


def convolve(padded: Array, weights: Array, geometry: Windows, keep: bool = False) -> tuple[Array, Array | None]:
    """The convolution (N, group * P, *outs) of a padded input (N, C, ...) with weight rows (group, P, K),
    its channels innermost in memory when they are wide, and its im2col matrix when `keep` and it fits
    in one piece (else the matrices are built piece by piece and dropped).

    Channels last, the product is one BLAS call per group over every sample's rows and writes the
    output in place; channels first, one per sample and group, each writing one sample's planes."""
    batch, group, per_group = padded.shape[0], weights.shape[0], weights.shape[1]
    positions = math.prod(geometry.outs)
    dtype = np.result_type(weights, padded)
    parts = pieces(batch, cols_bytes(padded, geometry))
    cols = None
    if wide(per_group):
        out = np.empty((batch, *geometry.outs, group * per_group), dtype=dtype)
        rows = out.reshape(batch * positions, group, per_group)
        for part in parts:
            cols = im2col(padded[part], geometry, group, wide(padded.shape[1] // group))
            grouped_product(cols, weights.transpose(0, 2, 1), rows[part.start * positions : part.stop * positions])
        return channels_first(out), cols if keep and len(parts) == 1 else None
    out = np.empty((batch, group * per_group, *geometry.outs), dtype=dtype)
    planes = out.reshape(batch, group, per_group, positions)
    for part in parts:
        cols = im2col(padded[part], geometry, group, wide(padded.shape[1] // group))
        samples = cols.reshape(-1, positions, group, cols.shape[2]).transpose(0, 2, 3, 1)
        np.matmul(weights, samples, out=planes[part])
    return out, cols if keep and len(parts) == 1 else None


def weight_gradient(g: Array, cols: Array, group: int) -> Array:
    """Per group, the sum over rows of g's rows times cols' rows: g (N, M, *outs) and cols (R, group, K)
    -> (group, M/group, K). One product over every row when g's channels are innermost in memory (or
    one per sample would hold more than the matrices), else one per sample, summed. The one product
    runs as cols' transpose times g's rows, transposed: OpenBLAS ran it up to twice as fast that way
    round (LeNet-5's second conv: (150, 6400) by (6400, 16) in 0.39 ms, (16, 6400) by (6400, 150) in 0.83)."""
    batch, outputs = g.shape[:2]
    positions = math.prod(g.shape[2:])
    per_group, columns = outputs // group, cols.shape[2]
    if batch > 1 and not is_channels_last(g) and per_group * columns <= (per_group + columns) * positions:
        planes = g.reshape(batch, group, per_group, positions)
        samples = cols.reshape(batch, positions, group, columns).transpose(0, 2, 1, 3)
        return np.matmul(planes, samples).sum(axis=0)
    grads = channels_last(g).reshape(-1, group, per_group)
    return np.matmul(cols.transpose(1, 2, 0), grads.transpose(1, 0, 2)).transpose(0, 2, 1)


def windowed_weight_gradient(g: Array, padded: Array, geometry: Windows, group: int) -> Array:
    """weight_gradient(g, im2col(padded)) with the im2col matrices built piece by piece."""
    last = wide(padded.shape[1] // group)
    first, *rest = pieces(padded.shape[0], cols_bytes(padded, geometry)) or [slice(0, 0)]
    total = weight_gradient(g[first], im2col(padded[first], geometry, group, last), group)
    for part in rest:
        total += weight_gradient(g[part], im2col(padded[part], geometry, group, last), group)
    return total


def transposed_product(weights: Array, y: Array, geometry: Windows, lengths: Sequence[int]) -> Array:
    """col2im(y weights): what a conv's output `y` (N, M, *outs) sends back onto its padded input
    (N, C, *lengths), with weight rows (group, M/group, prod(kernel) * C/group). A conv's input
    gradient, and conv_transpose's value.

    With wide channels (see WIDE), one product per kernel offset with that offset's columns of the
    weights, then one add of the channels-last block onto the positions the offset reads: runs as long
    as an output row of channels on both sides, and never more than one block at a time. With narrow
    ones, the batch goes innermost: one product per group gives every offset's block, and each offset
    adds its block in runs of an output row of samples. Windows that are disjoint assign instead of
    adding. Only the positions a window reads are touched, so a NaN or infinite weight reaches no other
    position, as in PyTorch."""
    batch, group, per_group = y.shape[0], weights.shape[0], weights.shape[1]
    offsets = math.prod(geometry.kernel)
    part = weights.shape[2] // offsets
    dtype = np.result_type(weights, y)
    if wide(part):
        out = np.zeros((batch, *lengths, group * part), dtype=dtype)
        grads = channels_last(y).reshape(-1, group, per_group)
        by_offset = weights.reshape(group, per_group, offsets, part)
        block = np.empty((grads.shape[0], group, part), dtype=dtype)
        shaped = block.reshape(batch, *geometry.outs, group * part)
        for index, ks in enumerate(np.ndindex(*geometry.kernel)):
            grouped_product(grads, by_offset[:, :, index], block)
            _accumulate(out[(slice(None), *geometry.offset(ks), slice(None))], shaped, geometry.disjoint)
        return channels_first(out)
    out = np.zeros((group, part, *lengths, batch), dtype=dtype)
    planes = np.ascontiguousarray(np.moveaxis(y, 0, -1)).reshape(group, per_group, -1)
    cols = np.matmul(weights.transpose(0, 2, 1), planes)
    blocks = cols.reshape(group, offsets, part, *geometry.outs, batch)
    for index, ks in enumerate(np.ndindex(*geometry.kernel)):
        _accumulate(out[(slice(None), slice(None), *geometry.offset(ks))], blocks[:, index], geometry.disjoint)
    return np.moveaxis(out.reshape(group * part, *lengths, batch), -1, 0)


def _accumulate(target: Array, block: Array, disjoint: bool) -> None:
    if disjoint:
        target[...] = block
    else:
        target += block


# ---------------------------------------------------------------- shifted products (stride 1, wide channels)
@functools.cache
def _gemm(dtype: np.dtype) -> Callable[..., Array] | None:
    """BLAS's gemm for arrays of `dtype` (float32, float64), else None. scipy.linalg.blas's, because it takes
    beta: a product adds onto its output in place, which numpy's matmul cannot do. Imported on first use."""
    from scipy.linalg import blas

    return {np.dtype(np.float32): blas.sgemm, np.dtype(np.float64): blas.dgemm}.get(np.dtype(dtype))


@dataclass(frozen=True)
class Shifts:
    """A stride-1 conv over a channels-last padded input seen as one matrix: (N * positions, C), the batch and
    the padded spatial axes flattened. Output position o reads input row o + offset(k) for kernel offset k,
    when o runs over an extended grid of the padded input's own shape; the positions past each axis's
    outputs (and so between one sample's last output and the next sample's first) are garbage, computed
    and never read. So the conv is one product per kernel offset over a shifted row range of that matrix,
    no im2col, at the price of those extra rows.
    """

    lengths: tuple[int, ...]
    outs: tuple[int, ...]
    offsets: tuple[int, ...]
    """The row each kernel offset (in np.ndindex order) adds to an output position's."""
    last: int
    """The extended row of a sample's last real output position."""

    @classmethod
    def of(cls, geometry: Windows, lengths: Sequence[int]) -> Shifts:
        steps = [math.prod(lengths[axis + 1 :]) for axis in range(len(lengths))]
        offsets = tuple(
            sum(k * d * step for k, d, step in zip(ks, geometry.dilations, steps, strict=True))
            for ks in np.ndindex(*geometry.kernel)
        )
        last = sum((out - 1) * step for out, step in zip(geometry.outs, steps, strict=True))
        return cls(tuple(lengths), geometry.outs, offsets, last)

    @property
    def waste(self) -> float:
        """Extended rows per real output position."""
        return math.prod(self.lengths) / math.prod(self.outs)

    def rows(self, batch: int) -> int:
        """The extended rows up to the last sample's last real output position: every offset's rows stay inside."""
        return (batch - 1) * math.prod(self.lengths) + self.last + 1

    def real(self, extended: Array) -> Array:
        """The real output positions of extended outputs (N, positions, M), as (N, *outs, M): a view."""
        grid = extended.reshape(extended.shape[0], *self.lengths, extended.shape[-1])
        return grid[(slice(None), *(slice(0, out) for out in self.outs))]

    def extend(self, g: Array) -> Array:
        """An output gradient g (N, M, *outs) on the extended grid, (N, positions, M), zero on the garbage rows."""
        extended = np.zeros((g.shape[0], math.prod(self.lengths), g.shape[1]), dtype=g.dtype)
        self.real(extended)[...] = np.moveaxis(g, 1, -1)
        return extended


def shifted(
    channels: int, outputs: int, lengths: Sequence[int], geometry: Windows, group: int, dtype: np.dtype
) -> Shifts | None:
    """The shifts of a conv that runs best as shifted products (see SHIFTED_MAX_WASTE), else None: stride 1,
    one group of wide input channels (so its padded input keeps them innermost in memory), some output
    channels, a kernel of more than one offset, and a BLAS gemm for its dtype."""
    if (
        group != 1
        or not wide(channels)
        or outputs == 0
        or math.prod(geometry.kernel) == 1
        or any(stride != 1 for stride in geometry.strides)
        or _gemm(dtype) is None
    ):
        return None
    shifts = Shifts.of(geometry, lengths)
    return shifts if shifts.waste <= SHIFTED_MAX_WASTE else None


def kernel_taps(w: Array) -> Array:
    """A weight (M, C, kernel...) as (kernel offsets, C, M), C-ordered: each offset's (C, M) matrix."""
    outputs, inputs = w.shape[:2]
    return np.ascontiguousarray(w.reshape(outputs, inputs, math.prod(w.shape[2:])).transpose(2, 1, 0))


def shifted_convolve(padded: Array, w: Array, shifts: Shifts) -> Array:
    """The conv of a channels-last padded input (N, C, ...) with w (M, C, kernel...): the output's extended
    rows (N * positions, M) = sum over kernel offsets of the input's rows shifted by the offset (.., C) times
    the offset's (C, M) weights, each product adding onto the output in place. Returns (N, M, *outs), the
    channels innermost in memory, copied out of the extended rows: a view skipping the garbage rows would keep
    up to SHIFTED_MAX_WASTE times the output's bytes alive for as long as the value lives (the backward pass
    keeps it), which the request's memory estimate, counting values' own bytes, never sees. The copy took
    under 1% of the conv's CPU time at each of ResNet-18's shifted sizes (batch 8, float32)."""
    batch, channels, dtype = padded.shape[0], padded.shape[1], padded.dtype
    gemm = _gemm(dtype)
    assert gemm is not None
    flat = channels_last(padded).reshape(batch * math.prod(shifts.lengths), channels)
    taps, rows = kernel_taps(w.astype(dtype, copy=False)), shifts.rows(batch)
    extended = np.empty((batch, math.prod(shifts.lengths), w.shape[0]), dtype=dtype)
    out = extended.reshape(-1, w.shape[0])[:rows].T  # (M, rows), Fortran-ordered: BLAS writes it in place
    for index, offset in enumerate(shifts.offsets if batch else ()):
        gemm(1.0, taps[index].T, flat[offset : offset + rows].T, beta=float(index > 0), c=out, overwrite_c=1)
    return channels_first(np.ascontiguousarray(shifts.real(extended)))


def shifted_input_gradient(g: Array, w: Array, shifts: Shifts, channels: int) -> Array:
    """col2im of g w for a conv run as shifted products: per kernel offset, g's extended rows times the
    offset's weights (M, C), added onto the padded input's rows the offset reads. Returns the padded input's
    gradient (N, C, *lengths), channels innermost in memory. The garbage rows of g are zeros, which a weight
    multiplies onto positions it never reads: only finite weights may take this way."""
    batch, dtype = g.shape[0], np.result_type(g, w)
    gemm = _gemm(dtype)
    assert gemm is not None
    grads = shifts.extend(g.astype(dtype, copy=False)).reshape(-1, g.shape[1])
    taps, rows = kernel_taps(w.astype(dtype, copy=False)), shifts.rows(batch)
    out = np.zeros((batch, *shifts.lengths, channels), dtype=dtype)
    flat = out.reshape(batch * math.prod(shifts.lengths), channels)
    source = grads[:rows].T  # (M, rows)
    for index, offset in enumerate(shifts.offsets if batch else ()):
        gemm(1.0, taps[index].T, source, beta=1.0, c=flat[offset : offset + rows].T, trans_a=1, overwrite_c=1)
    return channels_first(out)


def finite(a: Array) -> bool:
    """Whether every element of a is finite; a sum is NaN or infinite when any element is (or it overflows)."""
    return bool(np.isfinite(np.sum(a)))


# ---------------------------------------------------------------- depthwise convolutions
def is_depthwise(channels: int, group: int) -> bool:
    """Whether each group of a conv reads one input channel (MobileNet's depthwise layers)."""
    return group > 1 and group == channels


def _letters(geometry: Windows) -> tuple[str, str]:
    """einsum subscripts of the spatial axes of the kernel and of the output."""
    rank = len(geometry.kernel)
    return "ijk"[:rank], "xyz"[:rank]


def _windows_last(padded: Array, geometry: Windows) -> Array:
    """windows(padded) as (N, *outs, *kernel, C): the order in which einsum runs fast on a channels-last input."""
    rank = len(geometry.kernel)
    kernel_axes, out_axes = range(2, 2 + rank), range(2 + rank, 2 + 2 * rank)
    return windows(padded, geometry).transpose(0, *out_axes, *kernel_axes, 1)


def depthwise(padded: Array, w: Array, geometry: Windows) -> Array:
    """A depthwise conv, (N, C * multiplier, *outs): each channel's windows times that channel's weights.
    With wide channels, one einsum over the strided windows view, channels innermost; with narrow ones,
    for each kernel offset its strided slice of every channel times the channel's weights, summed.
    Elementwise work over the output, where im2col and a product per group would copy kernel-size
    times the input for one column per product."""
    batch, channels = padded.shape[:2]
    multiplier = w.shape[0] // channels
    kernels = w.reshape(channels, multiplier, *geometry.kernel)
    dtype = np.result_type(padded, w)
    if wide(channels):
        kernel, out = _letters(geometry)
        view = _windows_last(padded, geometry)
        weights = np.ascontiguousarray(np.moveaxis(kernels, (0, 1), (-2, -1)), dtype=dtype)
        y = np.einsum(f"n{out}{kernel}c,{kernel}cm->n{out}cm", view, weights)
        return channels_first(y.reshape(batch, *geometry.outs, channels * multiplier))
    expand = (1,) * len(geometry.outs)
    flat = kernels.reshape(channels, multiplier, -1)
    y = np.empty((batch, channels, multiplier, *geometry.outs), dtype=dtype)
    term = np.empty_like(y)
    for index, ks in enumerate(np.ndindex(*geometry.kernel)):
        window = padded[(slice(None), slice(None), None, *geometry.offset(ks))]
        np.multiply(window, flat[:, :, index].reshape(channels, multiplier, *expand), out=term if index else y)
        if index:
            y += term
    return y.reshape(batch, channels * multiplier, *geometry.outs)


def depthwise_x(g: Array, w: Array, geometry: Windows, lengths: Sequence[int], channels: int) -> Array:
    """What a depthwise conv's output gradient g (N, C * multiplier, *outs) sends back onto its padded
    input (N, C, *lengths). With wide channels and every stride 1, a depthwise correlation of g, padded
    by a window's extent less one, with the flipped kernels (one einsum); otherwise offset by offset,
    g times the offset's weights summed over the multiplier, added onto the positions the offset reads.
    The correlation multiplies the padding's zeros by the weights, so a NaN or infinite weight takes the
    second way, which reaches only the positions the weight reads (as PyTorch's gradient does)."""
    batch, multiplier = g.shape[0], w.shape[0] // channels
    kernels = w.reshape(channels, multiplier, *geometry.kernel)
    dtype = np.result_type(g, w)
    if wide(channels) and all(stride == 1 for stride in geometry.strides) and np.isfinite(w).all():
        reach = [extent(k, d) - 1 for k, d in zip(geometry.kernel, geometry.dilations, strict=True)]
        spans = [out + 2 * r for out, r in zip(geometry.outs, reach, strict=True)]
        padded = reframe(g, [-r for r in reach], spans, last=True)
        rank = len(reach)
        spread = Windows(tuple(spans), geometry.kernel, (1,) * rank, geometry.dilations, (0,) * rank, tuple(lengths))
        kernel, out = _letters(geometry)
        view = _windows_last(padded, spread).reshape(batch, *lengths, *geometry.kernel, channels, multiplier)
        flipped = np.flip(kernels, axis=tuple(range(2, 2 + rank)))
        weights = np.ascontiguousarray(np.moveaxis(flipped, (0, 1), (-2, -1)), dtype=dtype)
        return channels_first(np.einsum(f"n{out}{kernel}cm,{kernel}cm->n{out}c", view, weights))
    expand = (1,) * len(geometry.outs)
    flat = kernels.reshape(channels, multiplier, -1)
    grads = g.reshape(batch, channels, multiplier, *geometry.outs)
    out = empty((batch, channels, *lengths), dtype, wide(channels))
    out.fill(0)
    term = np.empty_like(grads, dtype=dtype)
    for index, ks in enumerate(np.ndindex(*geometry.kernel)):
        np.multiply(grads, flat[:, :, index].reshape(channels, multiplier, *expand), out=term)
        _accumulate(out[(..., *geometry.offset(ks))], term.sum(axis=2) if multiplier > 1 else term[:, :, 0],
                    geometry.disjoint)  # fmt: skip
    return out


def depthwise_w(g: Array, padded: Array, geometry: Windows, shape: Sequence[int]) -> Array:
    """A depthwise conv's weight gradient: the sum over samples and output positions of g times each
    kernel offset's slice of the padded input (one einsum over the windows view)."""
    batch, channels = padded.shape[:2]
    kernel, out = _letters(geometry)
    if wide(channels):
        view = _windows_last(padded, geometry)
        rows = channels_last(g).reshape(batch, *geometry.outs, channels, shape[0] // channels)
        sums = np.einsum(f"n{out}{kernel}c,n{out}cm->{kernel}cm", view, rows)
        return np.ascontiguousarray(np.moveaxis(sums, (-2, -1), (0, 1))).reshape(shape)
    grads = g.reshape(batch, channels, shape[0] // channels, *geometry.outs)
    sums = np.einsum(f"ncm{out},nc{kernel}{out}->cm{kernel}", grads, windows(padded, geometry))
    return sums.reshape(shape)


def with_bias(y: Array, b: Array | None, dtype: np.dtype, last: bool) -> Array:
    """y (a view in any layout) as a fresh array, its channels innermost in memory when `last`, plus the
    bias per channel."""
    out = empty(y.shape, dtype, last)
    if b is None:
        np.copyto(out, y)
    else:
        add_bias(y, b, out)
    return out


def add_bias(y: Array, b: Array, out: Array) -> None:
    """out = y + b per channel (axis 1)."""
    np.add(y, b.reshape((1, b.shape[0]) + (1,) * (y.ndim - 2)), out=out)


# ---------------------------------------------------------------- dtypes and shape rules
def float_dtype(op: str, *types: TensorType | None) -> np.dtype | None:
    """The result dtype of float arguments; int and bool ones are refused, as PyTorch refuses them."""
    dtypes = [t.dtype for t in types if t is not None and t.dtype is not None]
    for dtype in dtypes:
        if dtype.kind != "f":
            raise ShapeError(f"{op} takes float tensors, got {dtype}")
    if len(dtypes) < sum(t is not None for t in types):
        return None
    return np.result_type(*dtypes)


def _known(dim: Dim) -> bool:
    return dim is not None


def _conv_channels(op: str, x: Shape, w: Shape, b: Shape, group: int, transpose: bool) -> Dim:
    """Check the channel counts of x, w and b against each other; returns the output channels."""
    if group < 1:
        raise ShapeError(f"group is {group}; it must be at least 1")
    rank = spatial_rank(op, x)
    weight_rank = spatial_rank(op, w, "w")
    if rank is not None and weight_rank is not None and rank != weight_rank:
        raise ShapeError(f"x {describe(x)} and w {describe(w)} must have the same rank")
    channels = None if x is None else x[1]
    if transpose:
        # w is (C, M / group, kernel...)
        weight_in = None if w is None else w[0]
        outputs = None if w is None or w[1] is None else w[1] * group
        if _known(channels) and _known(weight_in) and channels != weight_in:
            raise ShapeError(f"x {describe(x)} has {channels} channels; w {describe(w)} expects {weight_in}")
        if _known(channels) and channels % group:  # type: ignore[operator]
            raise ShapeError(f"x has {channels} channels, which group {group} does not divide")
    else:
        # w is (M, C / group, kernel...)
        weight_in = None if w is None or w[1] is None else w[1] * group
        outputs = None if w is None else w[0]
        if _known(channels) and _known(weight_in) and channels != weight_in:
            raise ShapeError(
                f"x {describe(x)} has {channels} channels; w {describe(w)} with group {group} expects {weight_in}"
            )
        if _known(outputs) and outputs % group:  # type: ignore[operator]
            raise ShapeError(f"w {describe(w)} has {outputs} output channels, which group {group} does not divide")
    if b is not None:
        if len(b) != 1 or (_known(b[0]) and _known(outputs) and b[0] != outputs):
            raise ShapeError(f"b {describe(b)} must be a vector of the {outputs} output channels")
        outputs = outputs if outputs is not None else b[0]
    return outputs


def _conv_type(
    x: TensorType,
    w: TensorType,
    b: TensorType | None = None,
    *,
    strides: Ints = None,
    pads: Ints = None,
    dilations: Ints = None,
    group: int = 1,
    auto_pad: str = "NOTSET",
) -> TensorType:
    dtype = float_dtype("conv", x, w, b)
    outputs = _conv_channels("conv", x.shape, w.shape, None if b is None else b.shape, group, transpose=False)
    kernel = None if w.shape is None else tuple(w.shape[2:])
    sizes = None if x.shape is None else tuple(x.shape[2:])
    axes = sliding_axes("conv", sizes, kernel, strides, pads, dilations, auto_pad)
    if axes is None:
        return TensorType(dtype, None)
    batch = None if x.shape is None else x.shape[0]
    return TensorType(dtype, (batch, outputs, *(None if axis is None else axis[2] for axis in axes)))


# ---------------------------------------------------------------- conv
@dataclass(frozen=True)
class ConvSetup:
    """A conv's windows over its known input, its pads after each axis, and its group."""

    windows: Windows
    ends: tuple[int, ...]
    group: int


def conv_setup(
    x: Array,
    w: Array,
    b: Array | None = None,
    *,
    strides: Ints = None,
    pads: Ints = None,
    dilations: Ints = None,
    group: int = 1,
    auto_pad: str = "NOTSET",
) -> ConvSetup:
    _conv_channels("conv", x.shape, w.shape, None if b is None else b.shape, group, transpose=False)
    geometry, ends = windows_of("conv", x.shape[2:], w.shape[2:], strides, pads, dilations, auto_pad)
    geometry.check("conv", x.shape[0] * x.shape[1], padded_lengths(geometry, ends))
    return ConvSetup(geometry, ends, group)


def conv(x: Array, w: Array, b: Array | None = None, **attrs: object) -> tuple[Array, Array | None]:
    """The convolution (cross-correlation, as in PyTorch) and, when it fits in one piece, its im2col
    matrix: the residual the weight's gradient multiplies with. A larger conv keeps nothing and the
    gradient builds the matrix again, piece by piece, rather than hold kernel-size times the input;
    nor does one run as shifted products, which builds no matrix."""
    setup = conv_setup(x, w, b, **attrs)  # type: ignore[arg-type]
    geometry, group = setup.windows, setup.group
    dtype = np.result_type(x, w, *(() if b is None else (b,)))
    padded = pad_for_conv(x.astype(dtype, copy=False), geometry, setup.ends, group)
    shifts = shifted(x.shape[1], w.shape[0], padded.shape[2:], geometry, group, dtype)
    if is_depthwise(x.shape[1], group):
        y, cols = depthwise(padded, w.astype(dtype, copy=False), geometry), None
    elif shifts is not None:
        y, cols = shifted_convolve(padded, w, shifts), None
    else:
        y, cols = convolve(padded, weight_rows(w.astype(dtype, copy=False), group), geometry, keep=True)
    if b is not None:
        add_bias(y, b, y)
    return y, cols


def _conv_x(g: Array, cols: Array | None, x: Array, w: Array, b: Array | None = None, **attrs: object) -> Array:
    """col2im of g w."""
    setup = conv_setup(x, w, b, **attrs)  # type: ignore[arg-type]
    geometry = setup.windows
    lengths = padded_lengths(geometry, setup.ends)
    if is_depthwise(x.shape[1], setup.group):
        return unpad(depthwise_x(g, w, geometry, lengths, x.shape[1]), geometry)
    shifts = shifted(x.shape[1], w.shape[0], lengths, geometry, setup.group, np.result_type(g, w))
    if shifts is not None and finite(w):
        return unpad(shifted_input_gradient(g, w, shifts, x.shape[1]), geometry)
    return unpad(transposed_product(weight_rows(w, setup.group), g, geometry, lengths), geometry)


def _conv_w(g: Array, cols: Array | None, x: Array, w: Array, b: Array | None = None, **attrs: object) -> Array:
    group: int = attrs.get("group", 1)  # type: ignore[assignment]
    if cols is not None:
        return weight_from_rows(weight_gradient(g, cols, group), w.shape)
    setup = conv_setup(x, w, b, **attrs)  # type: ignore[arg-type]
    padded = pad_for_conv(x, setup.windows, setup.ends, group)
    if is_depthwise(x.shape[1], group):
        return depthwise_w(g, padded, setup.windows, w.shape)
    return weight_from_rows(windowed_weight_gradient(g, padded, setup.windows, group), w.shape)


def _bias_vjp(g: Array, ans: Array, x: Array, w: Array, b: Array, **attrs: object) -> Array:
    """The sum over all but the channel axis; with the channels innermost in memory, a product with a
    vector of ones, which runs as fast however few the channels."""
    if is_channels_last(g):
        rows = channels_last(g).reshape(-1, g.shape[1])
        return np.ones(rows.shape[0], dtype=rows.dtype) @ rows
    return g.sum(axis=(0, *range(2, g.ndim)))


CONV_ATTRS = {
    "strides": Attr("ints"),
    "pads": Attr("ints"),
    "dilations": Attr("ints"),
    "group": Attr("i", default=1),
    "auto_pad": Attr("s", default="NOTSET"),
}
defop(
    "conv",
    conv,
    _conv_x,
    _conv_w,
    _bias_vjp,
    infer=_conv_type,
    attrs=CONV_ATTRS,
    reads=("y", "ans x", ""),
    saves=True,
    min_arity=2,
    inputs="x (N, C, spatial...), w (M, C/group, kernel...), b? (M)",
    convention="as PyTorch conv1d/2d/3d (cross-correlation); pads as ONNX: all begins, then all ends",
)


# ---------------------------------------------------------------- conv_transpose
def _transpose_axis(
    axis: int,
    size: Dim,
    kernel: Dim,
    stride: int,
    dilation: int,
    begin: int,
    end: int,
    output_padding: int,
    output_size: int | None,
    auto_pad: str,
) -> tuple[int, int] | None:
    """(crop before, output size) of a transposed convolution along one axis (ONNX ConvTranspose):
    an explicit output size or SAME_* derives the pads, the odd one going after for SAME_UPPER
    and before otherwise; a negative crop adds zeros."""
    if size is None or kernel is None:
        return None
    if kernel < 1:
        raise ShapeError(f"spatial axis {axis}: the kernel has size {kernel}; it must be at least 1")
    if size < 1:
        raise ShapeError(f"spatial axis {axis} of x is empty")
    full = stride * (size - 1) + extent(kernel, dilation)
    if output_size is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        output_size = size * stride
    if output_size is not None:
        total = full + output_padding - output_size
        return (total // 2 if auto_pad == "SAME_UPPER" else total - total // 2), output_size
    if auto_pad == "VALID":
        begin = end = 0
    out = full + output_padding - begin - end
    if out < 1:
        raise ShapeError(f"spatial axis {axis}: pads {begin} and {end} crop all {full + output_padding} positions")
    return begin, out


def _transpose_axes(
    x: Shape,
    w: Shape,
    strides: Ints,
    pads: Ints,
    dilations: Ints,
    auto_pad: str,
    output_padding: Ints,
    output_shape: Ints,
) -> list[tuple[int, int] | None] | None:
    check_auto_pad(auto_pad)
    rank = spatial_rank("conv_transpose", x)
    rank = rank if rank is not None else spatial_rank("conv_transpose", w, "w")
    rank = rank if rank is not None else rank_from_attrs(strides, dilations, output_padding, output_shape, pads=pads)
    steps = int_list("strides", strides, rank, 1, 1)
    spreads = int_list("dilations", dilations, rank, 1, 1)
    extra = int_list("output_padding", output_padding, rank, 0, 0)
    padding = pad_list(pads, rank)
    sizes: tuple[int, ...] | None = None
    if output_shape is not None:
        if any(size < 1 for size in output_shape):
            raise ShapeError(f"output_shape {list(output_shape)} must hold sizes of at least 1")
        sizes = tuple(output_shape)
        if rank is not None and len(sizes) != rank:
            raise ShapeError(f"output_shape {list(output_shape)} has {len(sizes)} entries for {rank} spatial axes")
    if rank is None or steps is None or spreads is None or extra is None or padding is None:
        return None
    x_sizes = (None,) * rank if x is None else x[2:]
    kernel = (None,) * rank if w is None else w[2:]
    check_kernel(kernel)
    begins, ends = padding
    return [
        _transpose_axis(axis, x_sizes[axis], kernel[axis], steps[axis], spreads[axis], begins[axis], ends[axis],
                        extra[axis], None if sizes is None else sizes[axis], auto_pad)
        for axis in range(rank)
    ]  # fmt: skip


def _conv_transpose_type(
    x: TensorType,
    w: TensorType,
    b: TensorType | None = None,
    *,
    strides: Ints = None,
    pads: Ints = None,
    dilations: Ints = None,
    group: int = 1,
    auto_pad: str = "NOTSET",
    output_padding: Ints = None,
    output_shape: Ints = None,
) -> TensorType:
    dtype = float_dtype("conv_transpose", x, w, b)
    outputs = _conv_channels("conv_transpose", x.shape, w.shape, None if b is None else b.shape, group, True)
    axes = _transpose_axes(x.shape, w.shape, strides, pads, dilations, auto_pad, output_padding, output_shape)
    if axes is None:
        return TensorType(dtype, None)
    batch = None if x.shape is None else x.shape[0]
    return TensorType(dtype, (batch, outputs, *(None if axis is None else axis[1] for axis in axes)))


@dataclass(frozen=True)
class TransposeSetup:
    """A conv_transpose as the conv whose input gradient it is: that conv's windows over the full
    (uncropped) output, and the window of the full output that is kept."""

    windows: Windows
    crops: tuple[int, ...]
    outs: tuple[int, ...]
    group: int

    def full_gradient(self, g: Array, last: bool) -> Array:
        """The output's gradient on the full output (the adjoint of the crop), its channels innermost in
        memory when `last`."""
        return reframe(g, [-crop for crop in self.crops], self.windows.sizes, last=last)


def transpose_setup(
    x: Array,
    w: Array,
    b: Array | None = None,
    *,
    strides: Ints = None,
    pads: Ints = None,
    dilations: Ints = None,
    group: int = 1,
    auto_pad: str = "NOTSET",
    output_padding: Ints = None,
    output_shape: Ints = None,
) -> TransposeSetup:
    _conv_channels("conv_transpose", x.shape, w.shape, None if b is None else b.shape, group, True)
    axes = _transpose_axes(x.shape, w.shape, strides, pads, dilations, auto_pad, output_padding, output_shape)
    assert axes is not None
    rank = x.ndim - 2
    steps, spreads = strides or (1,) * rank, dilations or (1,) * rank
    kernel = w.shape[2:]
    full = tuple(s * (n - 1) + extent(k, d) for s, n, k, d in zip(steps, x.shape[2:], kernel, spreads, strict=True))
    geometry = Windows(full, kernel, tuple(steps), tuple(spreads), (0,) * rank, x.shape[2:])
    crops, outs = zip(*axes, strict=True)
    channels = x.shape[0] * w.shape[1] * group
    geometry.check("conv_transpose", channels, full)
    check_elements("conv_transpose", "the output", (channels, *outs))
    return TransposeSetup(geometry, crops, outs, group)


def conv_transpose(x: Array, w: Array, b: Array | None = None, **attrs: object) -> Array:
    """The input gradient of a conv, as a layer: col2im of x w, then the crop."""
    setup = transpose_setup(x, w, b, **attrs)  # type: ignore[arg-type]
    dtype = np.result_type(x, w, *(() if b is None else (b,)))
    weights = weight_rows(w.astype(dtype, copy=False), setup.group)
    full = transposed_product(weights, x.astype(dtype, copy=False), setup.windows, setup.windows.sizes)
    return with_bias(reframe(full, setup.crops, setup.outs), b, dtype, wide(w.shape[1]))


def _conv_transpose_x(g: Array, ans: Array, x: Array, w: Array, b: Array | None = None, **attrs: object) -> Array:
    """A conv of the output gradient with the same weights."""
    setup = transpose_setup(x, w, b, **attrs)  # type: ignore[arg-type]
    group = setup.group
    full = setup.full_gradient(g, wide(w.shape[1]))
    return convolve(full, weight_rows(w, group), setup.windows)[0]


def _conv_transpose_w(g: Array, ans: Array, x: Array, w: Array, b: Array | None = None, **attrs: object) -> Array:
    setup = transpose_setup(x, w, b, **attrs)  # type: ignore[arg-type]
    full = setup.full_gradient(g, wide(w.shape[1]))
    return weight_from_rows(windowed_weight_gradient(x, full, setup.windows, setup.group), w.shape)


defop(
    "conv_transpose",
    conv_transpose,
    _conv_transpose_x,
    _conv_transpose_w,
    _bias_vjp,
    infer=_conv_transpose_type,
    attrs={**CONV_ATTRS, "output_padding": Attr("ints"), "output_shape": Attr("ints")},
    reads=("y", "x", ""),
    min_arity=2,
    inputs="x (N, C, spatial...), w (C, M/group, kernel...), b? (M)",
    convention="as PyTorch conv_transpose1d/2d/3d; output_shape and SAME_* derive the pads as ONNX",
)
