"""Gradient rows of the normalization family (batch, layer, instance and group norms, lrn), dropout, and
cross-entropy with class labels; `tests.test_ops_norm` checks them.

OpCase runs in inference mode: batch_norm normalizes with its mean and var arguments and dropout is the
identity. The training-mode gradients (through the batch statistics, through the mask) are checked in
`tests.test_ops_norm` with graphs run in training mode.
"""

from __future__ import annotations

import zlib

import numpy as np

from tests.gradcheck import Array, AttrLike, OpCase

Shape = tuple[int, ...]


def _rng(case_id: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(case_id.encode()))


def _case(op: str, label: str, args: tuple[Array, ...], **attrs: AttrLike | None) -> OpCase:
    return OpCase(f"{op}[{label}]", op, args, attrs)


def per_channel(x: Shape) -> tuple[Array, ...]:
    """x, scale and bias of one value per channel (axis 1)."""
    rng = _rng("per_channel" + repr(x))
    channels = x[1]
    return rng.standard_normal(x), rng.uniform(0.5, 2.0, channels), rng.standard_normal(channels)


def batch_norm_args(x: Shape) -> tuple[Array, ...]:
    """x, scale, bias, mean and a variance away from 0."""
    rng = _rng("batch_norm" + repr(x))
    channels = x[1]
    return (
        rng.standard_normal(x),
        rng.uniform(0.5, 2.0, channels),
        rng.standard_normal(channels),
        rng.standard_normal(channels),
        rng.uniform(0.5, 2.0, channels),
    )


def class_labels(rows: Shape, classes: int, ignored: int = -100, dtype: str = "int64") -> tuple[Array, Array]:
    """Logits and class labels; every third row is labelled `ignored`."""
    rng = _rng(f"labels{rows}{classes}{ignored}{dtype}")
    labels = rng.integers(0, classes, rows)
    labels.reshape(-1)[::3] = ignored
    return rng.standard_normal((*rows, classes)), labels.astype(dtype)


def _layer(x: Shape, affine: tuple[Shape, ...]) -> tuple[Array, ...]:
    rng = _rng(f"layer{x}{affine}")
    return rng.standard_normal(x), *(rng.uniform(0.5, 2.0, shape) for shape in affine)


CASES: list[OpCase] = [
    *(_case("batch_norm", "x".join(map(str, x)), batch_norm_args(x)) for x in [(4, 3), (2, 3, 4), (2, 3, 2, 2)]),
    _case("batch_norm", "2x3x4,epsilon=0.5", batch_norm_args((2, 3, 4)), epsilon=0.5, momentum=0.3),
    _case("layer_norm", "3x4", _layer((3, 4), ())),
    _case("layer_norm", "3x4,scale", _layer((3, 4), ((4,),))),
    _case("layer_norm", "3x4,scale,bias", _layer((3, 4), ((4,), (4,)))),
    _case("layer_norm", "2x3x4,axis=1,scale3x4,bias4", _layer((2, 3, 4), ((3, 4), (4,))), axis=1),
    _case("layer_norm", "2x3x4,axis=-2,scale1x4,bias3x1", _layer((2, 3, 4), ((1, 4), (3, 1))), axis=-2),
    _case("layer_norm", "2x3x4,axis=0,epsilon=0.1", _layer((2, 3, 4), ((3, 4), (2, 3, 4))), axis=0, epsilon=0.1),
    _case("instance_norm", "2x3x4", per_channel((2, 3, 4))),
    _case("instance_norm", "2x2x3x2", per_channel((2, 2, 3, 2)), epsilon=0.01),
    _case("group_norm", "2x4x3,groups=2", per_channel((2, 4, 3)), num_groups=2),
    _case("group_norm", "2x6x2x2,groups=3", per_channel((2, 6, 2, 2)), num_groups=3),
    _case("group_norm", "1x4x3,groups=1", per_channel((1, 4, 3)), num_groups=1),
    _case("group_norm", "2x4x3,groups=4", per_channel((2, 4, 3)), num_groups=4, epsilon=0.01),
    *(
        _case("lrn", f"2x5x3,size={size}", (_rng(f"lrn{size}").standard_normal((2, 5, 3)),), **attrs)
        for size, attrs in [
            (3, {"size": 3, "alpha": 0.5}),
            (2, {"size": 2, "alpha": 0.5, "beta": 0.6, "bias": 2.0}),
            (5, {"size": 5}),
            (1, {"size": 1, "alpha": 1.0}),
            (8, {"size": 8, "alpha": 2.0, "beta": 1.5}),
        ]
    ),
    _case("lrn", "2x4x2x2,size=3", (_rng("lrn4d").standard_normal((2, 4, 2, 2)),), size=3, alpha=0.3),
    _case("dropout", "3x4,inference", (_rng("dropout").standard_normal((3, 4)),), ratio=0.5),
    _case("softmax_cross_entropy", "int64,6x4", class_labels((6,), 4)),
    _case("softmax_cross_entropy", "int32,2x3x5", class_labels((2, 3), 5, dtype="int32")),
    _case("softmax_cross_entropy", "int64,ignore_index=1", class_labels((7,), 3, ignored=1), ignore_index=1),
]

NOT_DIFFERENTIABLE: set[str] = set()
