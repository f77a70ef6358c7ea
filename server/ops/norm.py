"""Normalizations: softmax and log-softmax along an axis; batch, layer, instance and group norms;
local response normalization.

Layout is N, C, spatial... (NCHW) as in PyTorch and ONNX: axis 1 holds the channels. The
standardizing norms share one forward (`_standardize`) and one VJP (`_standardize_vjp`), which
differentiates through the mean and variance of the axes they normalize over, as PyTorch does.
Variances that normalize are biased (divided by the count), as in PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from chainrule.server.ops.elementwise import as_float, float_type
from chainrule.server.ops.registry import Array, Attr, NodeContext, defop, unbroadcast
from chainrule.server.shapes import Shape, ShapeError, TensorType, broadcast_shapes, describe, normalize_axis


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
    return float_type(x)


AXIS_ATTRS = {"axis": Attr("i", default=-1)}
defop(
    "softmax",
    softmax,
    _softmax_vjp,
    infer=_axis_type,
    attrs=AXIS_ATTRS,
    reads=("ans",),
    inputs="x",
    convention="stable for inputs of ±1000",
)
defop(
    "log_softmax",
    log_softmax,
    _log_softmax_vjp,
    infer=_axis_type,
    attrs=AXIS_ATTRS,
    reads=("ans",),
    inputs="x",
    convention="stable for inputs of ±1000",
)


# ---------------------------------------------------------------- shared by the standardizing norms
def _float_dtype(*types: TensorType) -> np.dtype | None:
    """The dtype every argument is computed in: their joint dtype, float64 when that is not a float."""
    if any(t.dtype is None for t in types):
        return None
    joint = np.result_type(*(t.dtype for t in types))  # type: ignore[arg-type]
    return joint if joint.kind == "f" else np.dtype(np.float64)


def _as_dtype(arguments: Sequence[Array]) -> list[Array]:
    """The arguments in their joint float dtype (see `_float_dtype`)."""
    joint = np.result_type(*arguments)
    dtype = joint if joint.kind == "f" else np.dtype(np.float64)
    return [argument.astype(dtype, copy=False) for argument in arguments]


def _check_channels(x: Shape, vectors: dict[str, Shape]) -> None:
    """x has a channel axis (axis 1), and each of `vectors` holds one value per channel."""
    if x is not None and len(x) < 2:
        raise ShapeError(f"x has shape {describe(x)}; it needs a batch and a channel axis (N, C, ...)")
    channels = None if x is None else x[1]
    for name, shape in vectors.items():
        if shape is None:
            continue
        if len(shape) != 1:
            raise ShapeError(f"{name} has shape {describe(shape)}; it must be a vector of one value per channel")
        if channels is not None and shape[0] is not None and shape[0] != channels:
            raise ShapeError(f"{name} has {shape[0]} values; x has {channels} channels (axis 1)")


def _channel_shape(x: Array) -> tuple[int, ...]:
    """The shape that broadcasts a per-channel vector against x: (1, C, 1, ...)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _non_channel_axes(rank: int) -> tuple[int, ...]:
    return (0, *range(2, rank))


class _Moments(NamedTuple):
    xhat: Array
    mean: Array
    variance: Array
    inv_std: Array


def _standardize(x: Array, axes: tuple[int, ...], epsilon: float) -> _Moments:
    """(x - mean) / sqrt(var + epsilon) over `axes` (kept as size 1), with the biased variance."""
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    variance = np.square(centered).mean(axis=axes, keepdims=True)
    inv_std = 1 / np.sqrt(variance + epsilon)
    return _Moments(np.multiply(centered, inv_std, out=centered), mean, variance, inv_std)


def _standardize_vjp(g_xhat: Array, xhat: Array, inv_std: Array, axes: tuple[int, ...]) -> Array:
    """The gradient to x of xhat = standardize(x) over `axes`, through the mean and the variance."""
    mean_g = g_xhat.mean(axis=axes, keepdims=True)
    mean_g_xhat = (g_xhat * xhat).mean(axis=axes, keepdims=True)
    return inv_std * (g_xhat - mean_g - xhat * mean_g_xhat)


def _channel_sum(a: Array) -> Array:
    return a.sum(axis=_non_channel_axes(a.ndim))


class _Normalized:
    """What a standardizing norm's VJPs need of its forward pass: the standardized x, and the inverse
    standard deviation per normalized group (size-1 axes, so it broadcasts against x).

    Batch norm in inference computes its value as x * a + c without ever standardizing x, so it hands
    over x and the mean instead, and the first VJP that wants the standardized x works it out."""

    __slots__ = ("_xhat", "_x", "_mean", "inv_std", "through_statistics")

    def __init__(
        self,
        xhat: Array | None,
        inv_std: Array,
        through_statistics: bool,
        x: Array | None = None,
        mean: Array | None = None,
    ) -> None:
        self._xhat, self._x, self._mean = xhat, x, mean
        self.inv_std = inv_std
        self.through_statistics = through_statistics
        """Whether the statistics came from x (training batch norm, and every other norm) and pass gradient to it."""

    @property
    def xhat(self) -> Array:
        if self._xhat is None:
            self._xhat = (self._x - self._mean) * self.inv_std  # type: ignore[operator]
            self._x = self._mean = None
        return self._xhat


def _per_channel_affine(xhat: Array, scale: Array, bias: Array) -> Array:
    """xhat * scale + bias per channel, in xhat's memory layout (channels innermost after a wide conv)."""
    shape = _channel_shape(xhat)
    y = xhat * scale.reshape(shape)
    y += bias.reshape(shape)
    return y


def _affine_x(g: Array, scale: Array) -> Array:
    return g * scale.reshape(_channel_shape(g))


def _affine_scale(g: Array, saved: _Normalized, *arguments: Array, **attrs: float) -> Array:
    return _channel_sum(g * saved.xhat)


def _affine_bias(g: Array, saved: _Normalized, *arguments: Array, **attrs: float) -> Array:
    return _channel_sum(g)


# ---------------------------------------------------------------- batch normalization
def batch_norm(
    x: Array,
    scale: Array,
    bias: Array,
    mean: Array,
    var: Array,
    *,
    epsilon: float = 1e-5,
    momentum: float = 0.1,
    ctx: NodeContext,
) -> tuple[Array, _Normalized]:
    """torch.nn.functional.batch_norm. Training: the batch's statistics over every axis but 1 normalize
    (biased variance), and the running statistics move towards them (unbiased variance), handed back
    through `ctx.update_state`. Inference: `mean` and `var` normalize, folded with scale and bias into
    one factor and one offset per channel (x * a + c, two passes over x, as PyTorch's CPU kernel)."""
    _check_channels(x.shape, {"scale": scale.shape, "bias": bias.shape, "mean": mean.shape, "var": var.shape})
    x, scale, bias, computed_mean, computed_var = _as_dtype([x, scale, bias, mean, var])
    shape = _channel_shape(x)
    if ctx.training:
        count = x.size // max(1, x.shape[1])
        if count < 2:
            raise ValueError(
                f"training needs more than one value per channel to take a batch variance; x has shape {list(x.shape)}"
            )
        axes = _non_channel_axes(x.ndim)
        moments = _standardize(x, axes, epsilon)
        batch_mean, batch_var = moments.mean.reshape(-1), moments.variance.reshape(-1)
        ctx.update_state(3, ((1 - momentum) * computed_mean + momentum * batch_mean).astype(mean.dtype, copy=False))
        unbiased = batch_var * (count / (count - 1))
        ctx.update_state(4, ((1 - momentum) * computed_var + momentum * unbiased).astype(var.dtype, copy=False))
        xhat, inv_std = moments.xhat, moments.inv_std
        return _per_channel_affine(xhat, scale, bias), _Normalized(xhat, inv_std, True)
    inv_std = 1 / np.sqrt(computed_var + epsilon)
    factor = scale * inv_std
    y = x * factor.reshape(shape)
    y += (bias - computed_mean * factor).reshape(shape)
    return y, _Normalized(None, inv_std.reshape(shape), False, x, computed_mean.reshape(shape))


def _bn_x(g: Array, saved: _Normalized, x: Array, scale: Array, *rest: Array, **attrs: float) -> Array:
    g_xhat = _affine_x(g, scale)
    if saved.through_statistics:
        return _standardize_vjp(g_xhat, saved.xhat, saved.inv_std, _non_channel_axes(g.ndim))
    return g_xhat * saved.inv_std


def _bn_mean(
    g: Array, saved: _Normalized, x: Array, scale: Array, bias: Array, mean: Array, *rest: Array, **attrs: float
) -> Array:
    """Inference only: in training the batch's mean normalizes, and the running mean takes no gradient."""
    if saved.through_statistics:
        return np.zeros(mean.shape, g.dtype)
    return -_channel_sum(g) * scale * saved.inv_std.reshape(-1)


def _bn_var(
    g: Array, saved: _Normalized, x: Array, scale: Array, bias: Array, mean: Array, var: Array, **attrs: float
) -> Array:
    """Inference only, as for the mean: d/dvar of (x - mean) / sqrt(var + eps) is -xhat / (2 (var + eps))."""
    if saved.through_statistics:
        return np.zeros(var.shape, g.dtype)
    inv_std = saved.inv_std.reshape(-1)
    return -0.5 * _channel_sum(g * saved.xhat) * scale * inv_std * inv_std


def _batch_norm_type(
    x: TensorType, scale: TensorType, bias: TensorType, mean: TensorType, var: TensorType, **attrs: float
) -> TensorType:
    _check_channels(x.shape, {"scale": scale.shape, "bias": bias.shape, "mean": mean.shape, "var": var.shape})
    return TensorType(_float_dtype(x, scale, bias, mean, var), x.shape)


defop(
    "batch_norm",
    batch_norm,
    _bn_x,
    _affine_scale,
    _affine_bias,
    _bn_mean,
    _bn_var,
    infer=_batch_norm_type,
    reads=("ans 1", "ans", "", "ans 1", "ans 1"),
    attrs={"epsilon": Attr("f", default=1e-5), "momentum": Attr("f", default=0.1)},
    saves=True,
    modal=True,
    inputs="x, scale, bias, mean, var",
    convention=(
        "training (Train, or `training` set): batch statistics over every axis but 1, gradient through them, "
        "running statistics updated as torch.nn.BatchNorm (unbiased variance); inference: mean and var normalize "
        "and take gradients"
    ),
)


# ---------------------------------------------------------------- layer, instance and group normalization
def layer_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *, axis: int = -1, epsilon: float = 1e-5
) -> tuple[Array, _Normalized]:
    """torch.nn.functional.layer_norm over the axes [axis, rank); scale and bias broadcast against those axes."""
    given = [a for a in (x, scale, bias) if a is not None]
    _check_layer_affine(x.shape, axis, {"scale": _shape_of(scale), "bias": _shape_of(bias)})
    x, *affine = _as_dtype(given)
    moments = _standardize(x, _layer_axes(x.ndim, axis), epsilon)
    y = moments.xhat
    if scale is not None:
        y = y * affine[0]
    if bias is not None:
        y = y + affine[1]
    return y, _Normalized(moments.xhat, moments.inv_std, True)


def _shape_of(a: Array | None) -> tuple[int, ...] | None:
    return None if a is None else a.shape


def _layer_axes(rank: int, axis: int) -> tuple[int, ...]:
    return tuple(range(normalize_axis(axis, rank), rank))


def _check_layer_affine(x: Shape, axis: int, affine: dict[str, Shape]) -> None:
    if x is None:
        return
    if len(x) == 0:
        raise ShapeError("x is a scalar; layer_norm needs at least one axis to normalize over")
    normalized = x[normalize_axis(axis, len(x)) :]
    for name, shape in affine.items():
        if shape is None:
            continue
        fits = len(shape) <= len(normalized)
        if fits:
            try:
                fits = broadcast_shapes(shape, normalized) == normalized
            except ShapeError:
                fits = False
        if not fits:
            raise ShapeError(
                f"{name} has shape {describe(shape)}; it must broadcast to the normalized axes {describe(normalized)}"
            )


def _ln_x(
    g: Array,
    saved: _Normalized,
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    axis: int = -1,
    epsilon: float = 1e-5,
) -> Array:
    g_xhat = g if scale is None else g * scale
    return _standardize_vjp(g_xhat, saved.xhat, saved.inv_std, _layer_axes(g.ndim, axis))


def _ln_scale(g: Array, saved: _Normalized, x: Array, scale: Array, *rest: Array, **attrs: float) -> Array:
    return unbroadcast(g * saved.xhat, scale.shape)


def _ln_bias(g: Array, saved: _Normalized, x: Array, scale: Array, bias: Array, **attrs: float) -> Array:
    return unbroadcast(g, bias.shape)


def _layer_norm_type(
    x: TensorType,
    scale: TensorType | None = None,
    bias: TensorType | None = None,
    *,
    axis: int = -1,
    epsilon: float = 1e-5,
) -> TensorType:
    affine = {"scale": scale, "bias": bias}
    _check_layer_affine(x.shape, axis, {name: t.shape for name, t in affine.items() if t is not None})
    return TensorType(_float_dtype(x, *(t for t in affine.values() if t is not None)), x.shape)


defop(
    "layer_norm",
    layer_norm,
    _ln_x,
    _ln_scale,
    _ln_bias,
    infer=_layer_norm_type,
    reads=("ans 1", "ans", ""),
    attrs={"axis": Attr("i", default=-1), "epsilon": Attr("f", default=1e-5)},
    min_arity=1,
    saves=True,
    inputs="x, scale?, bias?",
    convention="normalizes over axes [axis, rank) with the biased variance; gradient through mean and variance",
)


def _spatial_axes(rank: int) -> tuple[int, ...]:
    return tuple(range(2, rank))


def instance_norm(x: Array, scale: Array, bias: Array, *, epsilon: float = 1e-5) -> tuple[Array, _Normalized]:
    """torch.nn.functional.instance_norm / ONNX InstanceNormalization: each (example, channel) over its spatial axes."""
    _check_channels(x.shape, {"scale": scale.shape, "bias": bias.shape})
    x, scale, bias = _as_dtype([x, scale, bias])
    moments = _standardize(x, _spatial_axes(x.ndim), epsilon)
    return _per_channel_affine(moments.xhat, scale, bias), _Normalized(moments.xhat, moments.inv_std, True)


def _in_x(g: Array, saved: _Normalized, x: Array, scale: Array, bias: Array, **attrs: float) -> Array:
    return _standardize_vjp(_affine_x(g, scale), saved.xhat, saved.inv_std, _spatial_axes(g.ndim))


def _channel_affine_type(x: TensorType, scale: TensorType, bias: TensorType, **attrs: float) -> TensorType:
    _check_channels(x.shape, {"scale": scale.shape, "bias": bias.shape})
    return TensorType(_float_dtype(x, scale, bias), x.shape)


defop(
    "instance_norm",
    instance_norm,
    _in_x,
    _affine_scale,
    _affine_bias,
    infer=_channel_affine_type,
    reads=("ans 1", "ans", ""),
    attrs={"epsilon": Attr("f", default=1e-5)},
    saves=True,
    inputs="x, scale, bias",
    convention="per example and channel over the spatial axes, biased variance; gradient through mean and variance",
)


def _check_groups(x: Shape, num_groups: int) -> None:
    if num_groups < 1:
        raise ShapeError(f"num_groups is {num_groups}; it must be at least 1")
    channels = None if x is None or len(x) < 2 else x[1]
    if channels is not None and channels % num_groups:
        raise ShapeError(f"x has {channels} channels (axis 1), which num_groups {num_groups} does not divide")


def _grouped(a: Array, num_groups: int) -> Array:
    """(N, C, ...) as (N, num_groups, everything else of the group)."""
    batch = a.shape[0]
    return a.reshape(batch, num_groups, a.size // max(1, batch * num_groups))


def group_norm(
    x: Array, scale: Array, bias: Array, *, num_groups: int, epsilon: float = 1e-5
) -> tuple[Array, _Normalized]:
    """torch.nn.functional.group_norm / ONNX GroupNormalization (opset 21): each example's channels in
    `num_groups` consecutive groups, each group standardized as a whole; scale and bias per channel."""
    _check_channels(x.shape, {"scale": scale.shape, "bias": bias.shape})
    _check_groups(x.shape, num_groups)
    x, scale, bias = _as_dtype([x, scale, bias])
    moments = _standardize(_grouped(x, num_groups), (2,), epsilon)
    xhat = moments.xhat.reshape(x.shape)
    return _per_channel_affine(xhat, scale, bias), _Normalized(xhat, moments.inv_std, True)


def _gn_x(
    g: Array, saved: _Normalized, x: Array, scale: Array, bias: Array, *, num_groups: int, epsilon: float = 1e-5
) -> Array:
    g_xhat = _grouped(_affine_x(g, scale), num_groups)
    return _standardize_vjp(g_xhat, _grouped(saved.xhat, num_groups), saved.inv_std, (2,)).reshape(g.shape)


def _group_norm_type(
    x: TensorType, scale: TensorType, bias: TensorType, *, num_groups: int, epsilon: float = 1e-5
) -> TensorType:
    _check_groups(x.shape, num_groups)
    return _channel_affine_type(x, scale, bias)


defop(
    "group_norm",
    group_norm,
    _gn_x,
    _affine_scale,
    _affine_bias,
    infer=_group_norm_type,
    reads=("ans 1", "ans", ""),
    attrs={"num_groups": Attr("i", required=True), "epsilon": Attr("f", default=1e-5)},
    saves=True,
    inputs="x, scale, bias",
    convention="per example over each group of channels and the spatial axes; scale and bias per channel",
)


# ---------------------------------------------------------------- local response normalization
def _channel_window_sum(a: Array, before: int, after: int) -> Array:
    """For each channel c, the sum of `a` over channels [c - before, c + after] that exist."""
    channels = a.shape[1]
    if channels == 0:
        return a.copy()
    # A window reaching past every channel sums the same as one reaching just to the last: no giant padding.
    before, after = min(before, channels - 1), min(after, channels - 1)
    padding = [(0, 0)] * a.ndim
    padding[1] = (before, after)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(a, padding), before + after + 1, axis=1)
    return windows.sum(axis=-1)


def lrn(x: Array, *, size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0) -> tuple[Array, Array]:
    """torch.nn.functional.local_response_norm: x / (bias + alpha / size * sum of x^2 over a window of
    `size` channels) ** beta, the window [c - size // 2, c + (size - 1) // 2] as in PyTorch (ONNX's is the
    same for odd sizes). Saves the denominator's base for the VJP."""
    x = as_float(x)
    base = bias + (alpha / size) * _channel_window_sum(x * x, size // 2, (size - 1) // 2)
    return x * base**-beta, base


def _lrn_x(
    g: Array, base: Array, x: Array, *, size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0
) -> Array:
    """Directly through the numerator, and through every window that holds x's channel (the window transposed)."""
    x = as_float(x)
    g_base = g * x * (-beta) * base ** (-beta - 1)
    return g * base**-beta + (2 * alpha / size) * x * _channel_window_sum(g_base, (size - 1) // 2, size // 2)


def _lrn_type(x: TensorType, *, size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0) -> TensorType:
    if size < 1:
        raise ShapeError(f"size is {size}; it must be at least 1")
    _check_channels(x.shape, {})
    return float_type(x)


defop(
    "lrn",
    lrn,
    _lrn_x,
    infer=_lrn_type,
    reads=("ans x",),
    attrs={
        "size": Attr("i", required=True),
        "alpha": Attr("f", default=1e-4),
        "beta": Attr("f", default=0.75),
        "bias": Attr("f", default=1.0),
    },
    saves=True,
    inputs="x",
    convention="channel window [c - size//2, c + (size-1)//2] as PyTorch (ONNX's differs by one for even sizes)",
)
