"""Dropout: the identity in inference; in training, each element kept with probability 1 - ratio and
scaled by 1 / (1 - ratio), as torch.nn.functional.dropout does.

The mask comes from the node's own generator (`NodeContext.rng`, keyed by the training seed, the
graph's step and the node's name), so a training run draws the same masks on any graph built from
the same definition, and the VJP reuses the mask the forward pass drew (the residual).
"""

from __future__ import annotations

import numpy as np

from chainrule.server.ops.elementwise import as_float, float_type
from chainrule.server.ops.registry import Array, Attr, NodeContext, defop
from chainrule.server.shapes import ShapeError, TensorType


def _keep_scale(ratio: float, dtype: np.dtype) -> np.floating:
    """1 / (1 - ratio) in the tensor's dtype; with ratio 1 nothing is kept, and nothing is scaled."""
    return dtype.type(0.0 if ratio >= 1 else 1.0 / (1.0 - ratio))


def dropout(x: Array, *, ratio: float = 0.5, ctx: NodeContext) -> tuple[Array, Array | None]:
    x = as_float(x)
    if not ctx.training or ratio == 0:
        return x, None
    kept = ctx.rng().random(x.shape) >= ratio
    return x * (kept * _keep_scale(ratio, x.dtype)), kept


def _dropout_x(g: Array, kept: Array | None, x: Array, *, ratio: float = 0.5) -> Array:
    if kept is None:
        return g
    return g * (kept * _keep_scale(ratio, g.dtype))


def _dropout_type(x: TensorType, *, ratio: float = 0.5) -> TensorType:
    if not 0 <= ratio <= 1:
        raise ShapeError(f"ratio is {ratio}; a dropout probability must be between 0 and 1")
    return float_type(x)


defop(
    "dropout",
    dropout,
    _dropout_x,
    infer=_dropout_type,
    reads=("ans",),
    attrs={"ratio": Attr("f", default=0.5)},
    saves=True,
    modal=True,
    inputs="x",
    convention=(
        "inference: identity; training: the gradient passes where the element was kept, scaled by 1 / (1 - ratio)"
    ),
)
