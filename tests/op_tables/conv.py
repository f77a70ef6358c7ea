"""Gradient rows of the convolution and pooling family; `tests.test_ops_conv` checks them against central
finite differences (and, separately, against PyTorch and ONNX's reference evaluator).

Shapes are small so finite differences stay fast, and each row still exercises an attr the others do
not: asymmetric pads, strides and dilations that differ by axis, groups, auto_pad, ceil_mode windows
hanging over the pads. Max pools draw values at least 0.25 apart so no window holds a tie that a step
of 1e-6 could flip (ties are checked exactly, against PyTorch).
"""

from __future__ import annotations

import zlib

import numpy as np

from tests.gradcheck import Array, AttrLike, OpCase

Shape = tuple[int, ...]


def _rng(label: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(label.encode()))


def normal(label: str, *shapes: Shape) -> tuple[Array, ...]:
    rng = _rng(label)
    return tuple(rng.standard_normal(shape) for shape in shapes)


def distinct(label: str, shape: Shape) -> Array:
    """Values at least 0.25 apart, in random order: every window has one clear maximum."""
    count = int(np.prod(shape))
    return (0.25 * _rng(label).permutation(count) - 0.125 * count).reshape(shape)


def conv_case(label: str, x: Shape, w: Shape, bias: bool = True, **attrs: AttrLike | None) -> OpCase:
    shapes = (x, w, (w[0],)) if bias else (x, w)
    return OpCase(f"conv[{label}]", "conv", normal("conv" + label, *shapes), attrs)


def transpose_case(label: str, x: Shape, w: Shape, bias: bool = True, **attrs: AttrLike | None) -> OpCase:
    group = attrs.get("group") or 1
    shapes = (x, w, (w[1] * group,)) if bias else (x, w)  # type: ignore[operator]
    return OpCase(f"conv_transpose[{label}]", "conv_transpose", normal("conv_transpose" + label, *shapes), attrs)


def pool_case(op: str, label: str, x: Shape, **attrs: AttrLike | None) -> OpCase:
    case_id = f"{op}[{label}]"
    value = distinct(case_id, x) if "max" in op else normal(case_id, x)[0]
    return OpCase(case_id, op, (value,), attrs)


CONV_CASES = [
    conv_case("1d", (2, 3, 7), (4, 3, 3)),
    conv_case("1d,stride2,pads1-2,dilation2", (2, 3, 9), (2, 3, 3), strides=[2], pads=[1, 2], dilations=[2]),
    conv_case("2d", (2, 2, 5, 5), (3, 2, 3, 3)),
    conv_case("2d,no-bias", (1, 2, 4, 5), (3, 2, 2, 3), bias=False),
    conv_case(
        "2d,strides2-1,pads-asymmetric,dilations1-2",
        (2, 2, 6, 5),
        (3, 2, 3, 2),
        strides=[2, 1],
        pads=[1, 0, 2, 1],
        dilations=[1, 2],
    ),
    conv_case("2d,group2", (1, 4, 5, 4), (4, 2, 3, 2), bias=False, group=2),
    conv_case("2d,depthwise", (2, 3, 5, 5), (6, 1, 3, 3), group=3, pads=[1, 1, 1, 1]),
    conv_case("1d,depthwise,multiplier3,dilation2", (2, 2, 9), (6, 1, 3), False, group=2, pads=[2, 1], dilations=[2]),
    conv_case("2d,SAME_UPPER,stride2", (1, 2, 5, 6), (2, 2, 2, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
    conv_case("2d,SAME_LOWER,stride2", (1, 2, 5, 6), (2, 2, 2, 3), strides=[2, 2], auto_pad="SAME_LOWER"),
    conv_case("2d,VALID", (1, 2, 5, 4), (2, 2, 3, 3), auto_pad="VALID"),
    conv_case("3d", (1, 2, 4, 4, 3), (2, 2, 2, 3, 2), strides=[1, 2, 1], pads=[1, 0, 1, 0, 1, 1]),
]
CONV_TRANSPOSE_CASES = [
    transpose_case("1d", (2, 3, 4), (3, 2, 3)),
    transpose_case("1d,stride2,pads1-0,output_padding1", (2, 2, 4), (2, 3, 3), strides=[2], pads=[1, 0],
                   output_padding=[1]),
    transpose_case("2d,strides2-1,pads-asymmetric,dilations1-2", (1, 2, 3, 3), (2, 3, 3, 2), strides=[2, 1],
                   pads=[1, 0, 0, 1], dilations=[1, 2]),
    transpose_case("2d,group2,no-bias", (1, 4, 3, 3), (4, 1, 2, 2), bias=False, group=2, strides=[2, 2]),
    transpose_case("2d,output_shape", (1, 2, 3, 3), (2, 1, 3, 3), strides=[2, 2], output_shape=[6, 7]),
    transpose_case("2d,SAME_UPPER,stride2", (1, 2, 3, 2), (2, 2, 3, 3), strides=[2, 2], auto_pad="SAME_UPPER"),
    transpose_case("2d,SAME_LOWER,stride2", (1, 2, 3, 2), (2, 2, 3, 3), strides=[2, 2], auto_pad="SAME_LOWER"),
    transpose_case("3d", (1, 2, 2, 3, 2), (2, 2, 2, 2, 2), strides=[2, 1, 2]),
]  # fmt: skip
MAX_POOL_CASES = [
    pool_case("max_pool", "1d,k3,s2,pads1", (2, 3, 8), kernel_shape=[3], strides=[2], pads=[1, 1]),
    pool_case("max_pool", "2d,k2,s2", (2, 2, 6, 5), kernel_shape=[2, 2], strides=[2, 2]),
    pool_case("max_pool", "2d,k3,s1,pads-asymmetric,overlapping", (1, 2, 5, 5), kernel_shape=[3, 3],
              pads=[1, 0, 0, 1]),
    pool_case("max_pool", "2d,k2,s2,ceil_mode,dilations2-1", (1, 2, 7, 6), kernel_shape=[2, 2], strides=[2, 2],
              dilations=[2, 1], ceil_mode=True),
    pool_case("max_pool", "2d,SAME_UPPER", (1, 2, 5, 5), kernel_shape=[2, 3], strides=[2, 2],
              auto_pad="SAME_UPPER"),
    pool_case("max_pool", "2d,SAME_LOWER", (1, 2, 5, 5), kernel_shape=[2, 3], strides=[2, 2],
              auto_pad="SAME_LOWER"),
    pool_case("max_pool", "3d,k2,s2,ceil_mode", (1, 2, 3, 5, 4), kernel_shape=[2, 2, 2], strides=[2, 2, 2],
              ceil_mode=True),
]  # fmt: skip
AVERAGE_POOL_CASES = [
    pool_case("average_pool", "1d,k3,s2,pads1", (2, 3, 8), kernel_shape=[3], strides=[2], pads=[1, 1]),
    pool_case("average_pool", "1d,k3,s2,pads1,count_include_pad", (2, 3, 8), kernel_shape=[3], strides=[2],
              pads=[1, 1], count_include_pad=True),
    pool_case("average_pool", "2d,k2,s2", (2, 2, 6, 5), kernel_shape=[2, 2], strides=[2, 2]),
    pool_case("average_pool", "2d,k3,s2,pads1,ceil_mode", (1, 2, 6, 6), kernel_shape=[3, 3], strides=[2, 2],
              pads=[1, 1, 1, 1], ceil_mode=True),
    pool_case("average_pool", "2d,k3,s2,pads1,ceil_mode,count_include_pad", (1, 2, 6, 6), kernel_shape=[3, 3],
              strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=True, count_include_pad=True),
    pool_case("average_pool", "2d,pads-asymmetric,dilations2-1", (1, 2, 6, 5), kernel_shape=[2, 2],
              pads=[0, 1, 1, 0], dilations=[2, 1]),
    pool_case("average_pool", "2d,SAME_LOWER,count_include_pad", (1, 2, 5, 5), kernel_shape=[3, 2], strides=[2, 2],
              auto_pad="SAME_LOWER", count_include_pad=True),
    pool_case("average_pool", "3d,k2,s1", (1, 2, 3, 4, 3), kernel_shape=[2, 2, 2]),
]  # fmt: skip
GLOBAL_POOL_CASES = [
    pool_case(op, label, shape)
    for op in ("global_average_pool", "global_max_pool")
    for label, shape in (("1d", (2, 3, 5)), ("2d", (2, 2, 3, 4)), ("3d", (1, 2, 2, 3, 2)))
]

CASES: list[OpCase] = [
    *CONV_CASES,
    *CONV_TRANSPOSE_CASES,
    *MAX_POOL_CASES,
    *AVERAGE_POOL_CASES,
    *GLOBAL_POOL_CASES,
]
NOT_DIFFERENTIABLE: set[str] = set()
