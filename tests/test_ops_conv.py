"""conv, conv_transpose and the pools: VJPs against finite differences, values and VJPs against PyTorch,
auto_pad against ONNX's reference evaluator, shape rules and refusals.

A conv keeps wide channels innermost in memory and narrow ones first (conv.WIDE), with copies, products
and col2im of their own for each, and runs a large stride-1 conv of wide channels as shifted products
(conv.SHIFTED_MAX_WASTE); the table's few channels are all narrow and its images small, so the tests that
check values and gradients run each row three times: with every count taken as narrow, as wide, and as
wide with every stride-1 conv shifted.

PyTorch pads symmetrically, so asymmetric pads go through F.pad (-inf for max pools, zeros otherwise)
and conv_transpose's through cropping its unpadded output; average pools that leave the padding out
of the count divide a sum pool of x by a sum pool of ones. PyTorch has no dilated average pool and no
auto_pad: those are checked against ONNX's reference evaluator, and conv_transpose's output_shape
against onnxruntime, whose pads follow the ONNX spec's equations where the reference evaluator's do not.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from onnx.reference import ReferenceEvaluator

from chainrule.server.errors import InvalidArgument, ResourceExhausted
from chainrule.server.graph import build_graph
from chainrule.server.ops import conv as conv_module
from chainrule.server.plan import Plan
from tests.gradcheck import (
    Array,
    AttrLike,
    OpCase,
    check_grads,
    check_op,
    constant,
    declared_inputs,
    input_node,
    make_graph,
    node,
    run_backward,
    run_op,
)
from tests.op_tables.conv import CASES

Shape = tuple[int, ...]


LAYOUTS = {"channels-first": (1 << 62, 0.0), "channels-last": (1, 0.0), "shifted": (1, float("inf"))}
"""conv.WIDE and conv.SHIFTED_MAX_WASTE for each layout: no channel count is wide; every one is, through
im2col; every one is, and every stride-1 conv of one group runs as shifted products."""


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test runs with every conv in one layout (see the module docstring)."""
    wide, waste = LAYOUTS[request.param]
    monkeypatch.setattr(conv_module, "WIDE", wide)
    monkeypatch.setattr(conv_module, "SHIFTED_MAX_WASTE", waste)
    return str(request.param)


# ---------------------------------------------------------------- finite differences
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_gradient_matches_finite_differences(case: OpCase, layout: str) -> None:
    check_op(case)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_gradient_with_released_intermediates(case: OpCase, layout: str) -> None:
    """Operands and output computed, not fed, so the plan releases what the op's `reads` leave out
    (a conv's x and w: its weight gradient reads only the im2col residual)."""
    feeds = case.feeds()
    operands = [f"a{i}" for i in range(len(feeds))]
    nodes = [
        *declared_inputs(feeds),
        constant("zero", np.zeros(())),
        *(node(operand, "add", name, "zero") for operand, name in zip(operands, feeds, strict=True)),
        node("out", case.op, *operands, **case.attrs),
        constant("weights", case.cotangent()),
        node("weighted", "mul", "out", "weights"),
        node("loss", "sum", "weighted"),
    ]
    check_grads(nodes, feeds, loss="loss", wrt=list(feeds))


def _one_case_per_op() -> list[OpCase]:
    largest: dict[str, OpCase] = {}
    for case in CASES:
        size = sum(arg.size for arg in case.args)
        if case.op not in largest or size > sum(arg.size for arg in largest[case.op].args):
            largest[case.op] = case
    return list(largest.values())


@pytest.mark.parametrize("case", _one_case_per_op(), ids=lambda case: case.id)
def test_float32_stays_float32(case: OpCase, layout: str) -> None:
    cotangent = case.cotangent()
    single = run_op(case, cotangent, dtype=np.float32)
    double = run_op(case, cotangent, dtype=np.float64)
    assert single.loss.dtype == np.float32
    np.testing.assert_allclose(single.loss, double.loss, rtol=1e-4, atol=1e-5)
    for name, value in case.feeds().items():
        grad = np.asarray(single.grads[name])
        assert grad.dtype == np.float32 and grad.shape == value.shape
        np.testing.assert_allclose(grad, double.grads[name], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- against PyTorch
@dataclass(frozen=True)
class TorchCase:
    """One configuration: the op's arguments are drawn from the id; `ties` draws small integers for x."""

    label: str
    op: str
    x: Shape
    w: Shape | None = None
    bias: bool = False
    ties: bool = False
    attrs: dict[str, AttrLike] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.op}[{self.label}]"

    def args(self) -> tuple[Array, ...]:
        rng = np.random.default_rng(zlib.crc32(self.id.encode()))
        x = rng.integers(0, 3, self.x).astype(np.float64) if self.ties else rng.standard_normal(self.x)
        if self.w is None:
            return (x,)
        w = rng.standard_normal(self.w)
        if not self.bias:
            return x, w
        outputs = self.w[0] if self.op == "conv" else self.w[1] * int(self.attrs.get("group", 1))  # type: ignore[arg-type]
        return x, w, rng.standard_normal(outputs)


def conv_config(label: str, x: Shape, w: Shape, bias: bool = True, **attrs: AttrLike) -> TorchCase:
    return TorchCase(label, "conv", x, w, bias, attrs=attrs)


def transpose_config(label: str, x: Shape, w: Shape, bias: bool = True, **attrs: AttrLike) -> TorchCase:
    return TorchCase(label, "conv_transpose", x, w, bias, attrs=attrs)


def pool_config(op: str, label: str, x: Shape, ties: bool = False, **attrs: AttrLike) -> TorchCase:
    return TorchCase(label, op, x, ties=ties, attrs=attrs)


TORCH_CASES = [
    conv_config("1d,stride2,pads1", (2, 3, 10), (4, 3, 3), strides=[2], pads=[1, 1]),
    conv_config("1d,dilation3,pads2-0,no-bias", (2, 3, 10), (2, 3, 3), False, dilations=[3], pads=[2, 0]),
    conv_config("2d,group2,strides2-1,dilations1-2", (2, 4, 9, 8), (6, 2, 3, 3), group=2, strides=[2, 1],
                pads=[1, 1, 1, 1], dilations=[1, 2]),
    conv_config("2d,depthwise,stride2,pads-asymmetric", (1, 4, 7, 7), (8, 1, 3, 3), group=4, strides=[2, 2],
                pads=[0, 1, 2, 1]),
    conv_config("2d,1x1,stride2,no-bias", (2, 5, 6, 6), (3, 5, 1, 1), False, strides=[2, 2]),
    conv_config("2d,1x1", (2, 5, 4, 3), (3, 5, 1, 1)),
    conv_config("1d,depthwise,multiplier2", (2, 3, 9), (6, 1, 3), group=3, pads=[1, 1]),
    conv_config("2d,depthwise,dilation2,pads2", (2, 4, 8, 7), (4, 1, 3, 3), False, group=4, pads=[2, 2, 2, 2],
                dilations=[2, 2]),
    conv_config("3d,depthwise,multiplier2,stride2", (1, 2, 5, 4, 5), (4, 1, 3, 2, 3), group=2, strides=[2, 2, 2],
                pads=[1, 0, 1, 1, 1, 1]),
    conv_config("3d,strides,pads-asymmetric,dilations", (1, 2, 5, 6, 5), (3, 2, 3, 2, 3), strides=[2, 1, 2],
                pads=[1, 0, 1, 1, 1, 0], dilations=[1, 2, 1]),
    transpose_config("1d,stride2,pads1,output_padding1", (2, 3, 5), (3, 2, 3), strides=[2], pads=[1, 1],
                     output_padding=[1]),
    transpose_config("2d,group2,strides2-3,pads-asymmetric,output_padding", (1, 4, 4, 3), (4, 3, 3, 3), group=2,
                     strides=[2, 3], pads=[1, 0, 2, 1], output_padding=[1, 2]),
    transpose_config("2d,dilation2,no-bias", (2, 3, 4, 4), (3, 2, 2, 3), False, dilations=[2, 2]),
    transpose_config("3d,stride2,output_padding", (1, 2, 3, 2, 3), (2, 2, 2, 3, 2), strides=[2, 2, 2],
                     pads=[1, 0, 1, 0, 1, 0], output_padding=[1, 0, 1]),
    pool_config("max_pool", "1d,k3,s2,pads1,ceil_mode", (2, 3, 10), kernel_shape=[3], strides=[2], pads=[1, 1],
                ceil_mode=True),
    pool_config("max_pool", "2d,k2,s2,ties", (2, 3, 6, 6), ties=True, kernel_shape=[2, 2], strides=[2, 2]),
    pool_config("max_pool", "2d,k3,s1,pads1,ties,overlapping", (1, 2, 6, 5), ties=True, kernel_shape=[3, 3],
                pads=[1, 1, 1, 1]),
    pool_config("max_pool", "2d,k3,s2,pads1,dilations2,ceil_mode", (1, 2, 9, 8), kernel_shape=[3, 3],
                strides=[2, 2], pads=[1, 1, 1, 1], dilations=[2, 2], ceil_mode=True),
    pool_config("max_pool", "2d,k2,pads-asymmetric,ties", (1, 2, 5, 5), ties=True, kernel_shape=[2, 2],
                pads=[1, 0, 0, 1]),
    pool_config("max_pool", "3d,k2,s2,pads1,ceil_mode,ties", (1, 2, 5, 4, 5), ties=True, kernel_shape=[2, 2, 2],
                strides=[2, 2, 2], pads=[1, 1, 1, 1, 1, 1], ceil_mode=True),
    *(
        pool_config("average_pool", f"{label},count_include_pad={include}", shape, count_include_pad=include,
                    **attrs)
        for include in (False, True)
        for label, shape, attrs in [
            ("1d,k3,s2,pads1,ceil_mode", (2, 3, 10), dict(kernel_shape=[3], strides=[2], pads=[1, 1],
                                                         ceil_mode=True)),
            ("2d,k3,s2,pads1,ceil_mode", (1, 2, 6, 7), dict(kernel_shape=[3, 3], strides=[2, 2],
                                                           pads=[1, 1, 1, 1], ceil_mode=True)),
            ("2d,k2,s2", (2, 2, 6, 6), dict(kernel_shape=[2, 2], strides=[2, 2])),
            ("2d,pads-asymmetric", (1, 2, 5, 6), dict(kernel_shape=[3, 2], strides=[1, 2], pads=[2, 0, 0, 1])),
            ("3d,k2,s2,pads1,ceil_mode", (1, 2, 5, 4, 5), dict(kernel_shape=[2, 2, 2], strides=[2, 2, 2],
                                                              pads=[1, 1, 1, 1, 1, 1], ceil_mode=True)),
        ]
    ),
    *(
        pool_config(op, label, shape, ties=op == "global_max_pool")
        for op in ("global_average_pool", "global_max_pool")
        for label, shape in (("1d", (2, 3, 5)), ("2d", (2, 3, 4, 3)), ("3d", (1, 2, 3, 2, 3)))
    ),
]  # fmt: skip


def _pairs(values: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    half = len(values) // 2
    return tuple(values[:half]), tuple(values[half:])


def _torch_pad(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX pads as F.pad's argument: last axis first, (begin, end) each."""
    return [amount for b, e in reversed(list(zip(begins, ends, strict=True))) for amount in (b, e)]


def _by_rank(name: str, rank: int) -> Callable[..., Any]:
    return getattr(F, f"{name}{rank}d")  # type: ignore[no-any-return]


def torch_reference(case: TorchCase, x: Any, w: Any = None, b: Any = None) -> Any:
    """The op in PyTorch, with the attrs defaults of the native op."""
    rank = len(case.x) - 2
    attrs = case.attrs
    ones = [1] * rank
    begins, ends = _pairs(attrs.get("pads", [0] * 2 * rank))  # type: ignore[arg-type]
    strides = attrs.get("strides", ones)
    dilations = attrs.get("dilations", ones)
    if case.op == "conv":
        padded = F.pad(x, _torch_pad(begins, ends))
        return _by_rank("conv", rank)(padded, w, b, strides, 0, dilations, attrs.get("group", 1))
    if case.op == "conv_transpose":
        full = _by_rank("conv_transpose", rank)(
            x, w, b, strides, 0, attrs.get("output_padding", [0] * rank), attrs.get("group", 1), dilations
        )
        return full[(..., *(slice(b, size - e) for b, e, size in zip(begins, ends, full.shape[2:], strict=True)))]
    if case.op == "global_average_pool":
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    if case.op == "global_max_pool":
        return _by_rank("adaptive_max_pool", rank)(x, 1)
    kernel = attrs["kernel_shape"]
    ceil_mode = bool(attrs.get("ceil_mode", False))
    symmetric = begins == ends
    if case.op == "max_pool":
        if symmetric:
            return _by_rank("max_pool", rank)(x, kernel, strides, list(begins), dilations, ceil_mode)
        padded = F.pad(x, _torch_pad(begins, ends), value=-torch.inf)
        return _by_rank("max_pool", rank)(padded, kernel, strides, 0, dilations, ceil_mode)
    include = bool(attrs.get("count_include_pad", False))
    pool = _by_rank("avg_pool", rank)
    if symmetric:
        return pool(x, kernel, strides, list(begins), ceil_mode, include)
    padded = F.pad(x, _torch_pad(begins, ends))
    if include:
        return pool(padded, kernel, strides, 0, ceil_mode)
    mask = F.pad(torch.ones_like(x), _torch_pad(begins, ends))
    return pool(padded, kernel, strides, 0, ceil_mode) / pool(mask, kernel, strides, 0, ceil_mode)


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda case: case.id)
def test_values_and_gradients_match_pytorch(case: TorchCase, layout: str) -> None:
    check_against_pytorch(case)


def check_against_pytorch(case: TorchCase) -> None:
    args = case.args()
    tensors = [torch.tensor(arg, requires_grad=True) for arg in args]
    expected = torch_reference(case, *tensors)
    cotangent = np.random.default_rng(1).standard_normal(tuple(expected.shape))
    expected.backward(torch.from_numpy(cotangent))
    result = run_op(OpCase(case.id, case.op, args, case.attrs), cotangent)
    np.testing.assert_allclose(result.loss, expected.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg="value")
    for i, tensor in enumerate(tensors):
        assert tensor.grad is not None
        np.testing.assert_allclose(
            result.grads[f"x{i}"], tensor.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=f"gradient of argument {i}"
        )


@pytest.mark.parametrize(
    "case", [c for c in TORCH_CASES if c.op in ("conv", "conv_transpose") and c.x[0] > 1], ids=lambda c: c.id
)
def test_im2col_built_one_sample_at_a_time_gives_the_same_values_and_gradients(
    case: TorchCase, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large convolutions build their im2col matrices piece by piece and keep no residual."""
    monkeypatch.setattr(conv_module, "PIECE_BYTES", 1)
    check_against_pytorch(case)


def test_empty_batches_pass_through_every_op(layout: str) -> None:
    for case in [c for c in TORCH_CASES if c.x[0] > 1]:
        args = tuple(arg[:0] if i == 0 else arg for i, arg in enumerate(case.args()))
        result = run_op(OpCase(case.id, case.op, args, case.attrs), np.zeros((0, *case_output_shape(case)[1:])))
        assert result.loss.shape[0] == 0 and result.grads["x0"].shape == args[0].shape, case.id


def case_output_shape(case: TorchCase) -> tuple[int, ...]:
    return OpCase(case.id, case.op, case.args(), case.attrs).output_shape()


@pytest.mark.parametrize(("weights", "group"), [((4, 2, 3, 3), 1), ((4, 1, 3, 3), 2)], ids=["conv", "depthwise"])
def test_a_nan_weight_reaches_only_the_inputs_it_reads(weights: Shape, group: int, layout: str) -> None:
    """x's gradient is NaN exactly where PyTorch's is: col2im adds only what each window reads, and nothing
    multiplies the padding's zeros by the weights."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 2, 6, 5)), rng.standard_normal(weights)
    w[1, 0, 0, 2] = np.nan
    attrs: dict[str, AttrLike] = {"pads": [1, 1, 1, 1], "group": group}
    cotangent = rng.standard_normal((2, 4, 6, 5))
    tensors = [torch.tensor(x, requires_grad=True), torch.tensor(w)]
    F.conv2d(*tensors, padding=1, groups=group).backward(torch.from_numpy(cotangent))
    assert tensors[0].grad is not None
    expected = tensors[0].grad.numpy()
    result = run_op(OpCase("conv[nan weight]", "conv", (x, w), attrs), cotangent)
    np.testing.assert_array_equal(np.isfinite(result.grads["x0"]), np.isfinite(expected))
    finite = np.isfinite(expected)
    assert finite.any() and not finite.all()
    np.testing.assert_allclose(result.grads["x0"][finite], expected[finite], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("poison", ["none", "nan x", "inf x", "nan w", "inf w"])
def test_a_large_stride_1_conv_runs_as_shifted_products_and_matches_pytorch(poison: str) -> None:
    """At the default thresholds, 16 channels of 16x16 run as shifted products, whose garbage rows read the
    padding and the neighbouring rows; a NaN or infinite input or weight still reaches exactly the values and
    gradients PyTorch's does (the gradients it would spread through those rows take im2col's way)."""
    rng = np.random.default_rng(11)
    x, w, b = rng.standard_normal((2, 16, 16, 15)), rng.standard_normal((5, 16, 3, 3)), rng.standard_normal(5)
    geometry, _ = conv_module.windows_of("conv", x.shape[2:], w.shape[2:], None, [1, 1, 1, 1], None, "NOTSET")
    assert conv_module.shifted(16, 5, (18, 17), geometry, 1, np.dtype(np.float64)) is not None
    if poison != "none":
        value = np.nan if poison.startswith("nan") else np.inf
        if poison.endswith("x"):
            x[1, 3, 0, 14] = value
        else:
            w[2, 7, 0, 2] = value
    tensors = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    expected = F.conv2d(*tensors, padding=1)
    cotangent = rng.standard_normal(tuple(expected.shape))
    expected.backward(torch.from_numpy(cotangent))
    result = run_op(OpCase(f"conv[{poison}]", "conv", (x, w, b), {"pads": [1, 1, 1, 1]}), cotangent)
    np.testing.assert_allclose(result.loss, expected.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg="value")
    for i, tensor in enumerate(tensors):
        assert tensor.grad is not None
        np.testing.assert_allclose(result.grads[f"x{i}"], tensor.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=str(i))


@pytest.mark.parametrize("spatial", [(40,), (16, 15), (20, 20, 20)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_a_shifted_conv_value_keeps_only_its_own_bytes_alive(spatial: Shape, bias: bool) -> None:
    """Shifted products compute garbage rows beside the output's; the value, which the plan keeps for the
    backward pass and the request's memory estimate counts at its own size, must not be a view keeping them
    alive (it was: up to 1.4 times its bytes), and stays channels-last, equal to PyTorch's."""
    rng = np.random.default_rng(5)
    rank = len(spatial)
    x, w = rng.standard_normal((2, 16, *spatial)), rng.standard_normal((5, 16, *(3,) * rank))
    b = rng.standard_normal(5) if bias else None
    pads = [1] * 2 * rank
    geometry, ends = conv_module.windows_of("conv", spatial, w.shape[2:], None, pads, None, "NOTSET")
    lengths = conv_module.padded_lengths(geometry, ends)
    assert conv_module.shifted(16, 5, lengths, geometry, 1, np.dtype(np.float64)) is not None
    y, _ = conv_module.conv(x, w, b, pads=pads)
    held = y if y.base is None else y.base
    assert held.nbytes == y.nbytes
    assert conv_module.is_channels_last(y)
    torch_conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    expected = torch_conv(
        torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b), padding=1
    )
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-10, atol=1e-12)


def test_a_network_mixing_wide_and_narrow_convs_matches_pytorch() -> None:
    """Channel counts on both sides of conv.WIDE, as they come: arrays in both layouts meet in relus, pools,
    adds, a depthwise conv, a 1x1 conv and a conv_transpose, and values and every gradient still equal
    PyTorch's."""
    wide = conv_module.WIDE
    rng = np.random.default_rng(7)
    shapes = {
        "x": (2, 3, 9, 9), "w1": (wide, 3, 3, 3), "b1": (wide,), "w2": (wide, wide, 3, 3), "b2": (wide,),
        "wd": (wide, 1, 3, 3), "w3": (4, wide, 1, 1), "wt": (wide, 4, 2, 2),
    }  # fmt: skip
    feeds = {name: rng.standard_normal(shape) for name, shape in shapes.items()}
    nodes = [
        *declared_inputs(feeds),
        node("c1", "conv", "x", "w1", "b1", pads=[1, 1, 1, 1]),
        node("r1", "relu", "c1"),
        node("p1", "max_pool", "r1", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        node("c2", "conv", "p1", "w2", "b2", pads=[1, 1, 1, 1]),
        node("d", "conv", "c2", "wd", group=wide, pads=[1, 1, 1, 1]),
        node("s", "add", "d", "p1"),
        node("c3", "conv", "s", "w3"),
        node("t", "conv_transpose", "s", "wt", strides=[2, 2]),
        node("a", "average_pool", "t", kernel_shape=[2, 2], strides=[2, 2]),
        node("out", "add", "c3", "a"),
    ]
    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in feeds.items()}
    p1 = F.max_pool2d(F.relu(F.conv2d(tensors["x"], tensors["w1"], tensors["b1"], padding=1)), 3, 2, 1)
    s = F.conv2d(F.conv2d(p1, tensors["w2"], tensors["b2"], padding=1), tensors["wd"], padding=1, groups=wide) + p1
    expected = F.conv2d(s, tensors["w3"]) + F.avg_pool2d(F.conv_transpose2d(s, tensors["wt"], stride=2), 2, 2)
    cotangent = rng.standard_normal(tuple(expected.shape))
    expected.backward(torch.from_numpy(cotangent))
    result = run_backward(nodes, feeds, loss="out", wrt=list(feeds), loss_grad=cotangent)
    np.testing.assert_allclose(result.loss, expected.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg="value")
    for name, tensor in tensors.items():
        assert tensor.grad is not None
        np.testing.assert_allclose(result.grads[name], tensor.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


def test_the_table_covers_what_pytorch_users_compare() -> None:
    def has(predicate: Callable[[TorchCase], bool]) -> bool:
        return any(predicate(case) for case in TORCH_CASES)

    for op in ("conv", "conv_transpose", "max_pool", "average_pool", "global_average_pool", "global_max_pool"):
        for rank in (1, 2, 3):
            assert has(lambda c, op=op, rank=rank: c.op == op and len(c.x) == rank + 2), (op, rank)
    for op in ("conv", "conv_transpose"):
        assert has(lambda c, op=op: c.op == op and c.bias) and has(lambda c, op=op: c.op == op and not c.bias)
        assert has(lambda c, op=op: c.op == op and c.attrs.get("group", 1) != 1)
    assert has(lambda c: c.op == "conv" and c.w is not None and c.w[1] == 1 and c.attrs.get("group", 1) > 1)
    assert has(lambda c: "output_padding" in c.attrs)
    for op in ("max_pool", "average_pool"):
        assert has(lambda c, op=op: c.op == op and bool(c.attrs.get("ceil_mode")))
    assert has(lambda c: c.op == "max_pool" and c.ties)
    assert {c.attrs.get("count_include_pad") for c in TORCH_CASES if c.op == "average_pool"} == {False, True}
    for op in ("conv", "conv_transpose", "max_pool", "average_pool"):
        assert has(lambda c, op=op: c.op == op and (lambda p: p[: len(p) // 2] != p[len(p) // 2 :])(
            list(c.attrs.get("pads", [])))), op  # fmt: skip


def test_max_pool_ties_give_the_gradient_to_the_first_maximum_and_overlaps_accumulate() -> None:
    """Windows [1, 3], [3, 3] and [3, 2]: the first two pick the first 3, the last picks the second."""
    case = OpCase("max_pool[ties]", "max_pool", (np.array([[[1.0, 3.0, 3.0, 2.0]]]),), {"kernel_shape": [2]})
    result = run_op(case, np.array([[[1.0, 10.0, 100.0]]]))
    np.testing.assert_array_equal(result.loss, [[[3.0, 3.0, 3.0]]])
    np.testing.assert_array_equal(result.grads["x0"], [[[0.0, 11.0, 100.0, 0.0]]])


# ---------------------------------------------------------------- against ONNX
ONNX_NAMES = {
    "conv": "Conv",
    "conv_transpose": "ConvTranspose",
    "max_pool": "MaxPool",
    "average_pool": "AveragePool",
}


@dataclass(frozen=True)
class OnnxCase:
    """A forward pass checked against ONNX's reference evaluator (float64), or against onnxruntime
    (float32, which it implements for every op here) where the reference evaluator departs from the
    ONNX spec or fails: it crashes on SAME max pools of stride 1, sizes strided SAME_LOWER max pools
    floor(size / stride) instead of ceil, pads SAME pools by a negative amount when the stride passes
    the kernel (we pad 0, as its Conv does), and crops conv_transpose's output_shape at the end only."""

    op: str
    shapes: tuple[Shape, ...]
    attrs: dict[str, AttrLike]
    oracle: str = "reference"

    @property
    def id(self) -> str:
        return f"{self.op}{list(self.shapes)}{self.attrs}-{self.oracle}"


def onnx_model(op: str, args: Sequence[Array], attrs: dict[str, AttrLike]) -> onnx.ModelProto:
    names = ["x", "w", "b"][: len(args)]
    element = helper.np_dtype_to_tensor_dtype(args[0].dtype)
    onnx_attrs = {key: int(value) if isinstance(value, bool) else value for key, value in attrs.items()}
    graph = helper.make_graph(
        [helper.make_node(ONNX_NAMES[op], names, ["y"], **onnx_attrs)],
        op,
        [helper.make_tensor_value_info(name, element, arg.shape) for name, arg in zip(names, args, strict=True)],
        [helper.make_tensor_value_info("y", element, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def onnx_value(case: OnnxCase, args: Sequence[Array]) -> Array:
    model = onnx_model(case.op, args, case.attrs)
    feeds = dict(zip(["x", "w", "b"], args, strict=False))
    if case.oracle == "reference":
        [value] = ReferenceEvaluator(model).run(None, feeds)
    else:
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        [value] = session.run(None, feeds)
    return value  # type: ignore[no-any-return]


def chainrule_value(op: str, args: Sequence[Array], attrs: dict[str, AttrLike]) -> Array:
    feeds = {f"x{i}": arg for i, arg in enumerate(args)}
    plan = Plan(build_graph(make_graph([*declared_inputs(feeds), node("out", op, *feeds, **attrs)])))
    [value] = plan.forward(feeds, {}, ["out"])
    return value


AUTO_PADS = ("SAME_UPPER", "SAME_LOWER", "VALID")
MAX_POOL_SHAPES: list[tuple[Shape, dict[str, AttrLike]]] = [
    ((1, 2, 7, 6), {"kernel_shape": [3, 4], "strides": [2, 3]}),
    ((2, 1, 9), {"kernel_shape": [4], "strides": [2]}),
    ((1, 1, 4, 5, 3), {"kernel_shape": [2, 3, 2], "strides": [2, 2, 2]}),
]
ONNX_CASES = [
    *(
        OnnxCase(op, shapes, {**attrs, "auto_pad": auto_pad})
        for auto_pad in AUTO_PADS
        for op, shapes, attrs in [
            ("conv", ((1, 2, 7, 6), (3, 2, 3, 2), (3,)), {"strides": [2, 3]}),
            ("conv", ((2, 2, 8), (2, 2, 4)), {"strides": [3]}),
            ("conv", ((1, 2, 4, 5, 3), (2, 2, 2, 3, 2)), {"strides": [1, 2, 2]}),
            ("conv_transpose", ((1, 2, 3, 4), (2, 3, 3, 2), (3,)), {"strides": [2, 3]}),
            ("average_pool", ((1, 2, 7, 6),), {"kernel_shape": [3, 4], "strides": [2, 3]}),
            ("average_pool", ((1, 2, 7, 6),), {"kernel_shape": [3, 4], "strides": [2, 3], "count_include_pad": True}),
            ("average_pool", ((2, 1, 9),), {"kernel_shape": [3]}),
            ("average_pool", ((1, 2, 5, 4, 6),), {"kernel_shape": [2, 3, 3], "strides": [2, 1, 3]}),
        ]
    ),
    *(
        OnnxCase("max_pool", (shape,), {**attrs, "auto_pad": auto_pad},
                 "onnxruntime" if auto_pad == "SAME_LOWER" else "reference")
        for auto_pad in AUTO_PADS
        for shape, attrs in MAX_POOL_SHAPES
    ),
    OnnxCase("max_pool", ((1, 2, 9, 8),), {"kernel_shape": [3, 2], "strides": [2, 1], "dilations": [2, 3],
                                           "pads": [1, 0, 2, 1], "ceil_mode": True}),
    OnnxCase("average_pool", ((1, 2, 9, 8),), {"kernel_shape": [3, 2], "dilations": [2, 3], "pads": [1, 0, 2, 1]}),
    OnnxCase("average_pool", ((1, 2, 9, 8),), {"kernel_shape": [3, 2], "dilations": [2, 3], "pads": [1, 0, 2, 1],
                                               "count_include_pad": True}),
    *(
        OnnxCase("average_pool", ((1, 2, 7, 6),), {"kernel_shape": [3, 2], "strides": [2, 3], "auto_pad": auto_pad,
                                                   "count_include_pad": include}, "onnxruntime")
        for auto_pad in ("SAME_UPPER", "SAME_LOWER")
        for include in (False, True)
    ),
    *(
        OnnxCase("conv_transpose", ((1, 2, 4, 3), (2, 2, 3, 3), (2,)), attrs, "onnxruntime")
        for attrs in [
            {"strides": [2, 2], "output_shape": [8, 6]},
            {"strides": [2, 3], "output_shape": [6, 8]},
            {"strides": [2, 3], "output_shape": [6, 8], "auto_pad": "SAME_UPPER"},
            {"strides": [2, 3], "output_shape": [5, 7], "auto_pad": "SAME_LOWER"},
            {"strides": [2, 1], "output_shape": [9, 4], "output_padding": [1, 0]},
        ]
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", ONNX_CASES, ids=lambda case: case.id)
def test_values_match_onnx(case: OnnxCase) -> None:
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    dtype = np.float64 if case.oracle == "reference" else np.float32
    args = [rng.standard_normal(shape).astype(dtype) for shape in case.shapes]
    tolerance = 1e-10 if dtype == np.float64 else 1e-5
    expected = onnx_value(case, args)
    np.testing.assert_allclose(chainrule_value(case.op, args, case.attrs), expected, rtol=tolerance, atol=tolerance)


def test_every_auto_pad_of_every_windowed_op_is_checked() -> None:
    checked = {(c.op, c.attrs.get("auto_pad")) for c in ONNX_CASES if c.oracle == "reference"}
    checked.add(("max_pool", "SAME_LOWER"))  # only through onnxruntime: see OnnxCase
    assert {(op, auto_pad) for op in ONNX_NAMES for auto_pad in AUTO_PADS} <= checked


# ---------------------------------------------------------------- shape rules and refusals
def inferred_shape(op: str, shapes: Sequence[Sequence[int] | None], dtype: str = "float64", **attrs: AttrLike) -> Any:
    names = [f"x{i}" for i in range(len(shapes))]
    inputs = [input_node(name, dtype, shape) for name, shape in zip(names, shapes, strict=True)]
    return build_graph(make_graph([*inputs, node("out", op, *names, **attrs)])).nodes["out"]["type"].shape


def test_shape_rules_keep_what_is_known() -> None:
    assert inferred_shape("conv", [(-1, 3, -1, 8), (4, 3, 3, 3)], pads=[1, 1, 1, 1]) == (None, 4, None, 8)
    assert inferred_shape("conv", [(2, 3, 8, 8), None]) == (2, None, None, None)
    assert inferred_shape("conv", [None, (4, 3, 3, 3), (4,)]) == (None, 4, None, None)
    assert inferred_shape("conv_transpose", [(2, 4, -1, 5), (4, 3, 3, 3)], group=2, strides=[2, 2]) == (
        2, 6, None, 11,
    )  # fmt: skip
    assert inferred_shape("max_pool", [(-1, 3, 9, -1)], kernel_shape=[3, 3], strides=[2, 2]) == (None, 3, 4, None)
    assert inferred_shape("average_pool", [None], kernel_shape=[3, 3]) is None
    assert inferred_shape("global_max_pool", [(-1, 3, 5, -1)]) == (None, 3, 1, 1)


REFUSED = [
    ("conv", [(2, 3, 8, 8), (4, 2, 3, 3)], {}, "channels"),
    ("conv", [(2, 4, 8, 8), (3, 2, 3, 3)], {"group": 2}, "does not divide"),
    ("conv", [(2, 3, 8, 8), (4, 3, 3, 3), (3,)], {}, "b [3]"),
    ("conv", [(2, 3, 8, 8), (4, 3, 3, 3)], {"group": 0}, "group"),
    ("conv", [(2, 3, 8, 8), (4, 3, 3, 3)], {"pads": [1, 1]}, "pads"),
    ("conv", [(2, 3, 8, 8), (4, 3, 3, 3)], {"pads": [1, -1, 1, 1]}, "negative"),
    ("conv", [(2, 3, 8, 8), (4, 3, 3, 3)], {"strides": [0, 1]}, "strides"),
    ("conv", [(2, 3, 8, 8), (4, 3, 3, 3)], {"dilations": [1, 1, 1]}, "dilations"),
    ("conv", [(2, 3, 8, 8), (4, 3, 3, 3)], {"auto_pad": "SAME"}, "auto_pad"),
    ("conv", [(2, 3, 2, 8), (4, 3, 3, 3)], {}, "window spans 3"),
    ("conv", [(3, 8), (4, 3, 3)], {}, "spatial axes"),
    ("conv", [(2, 3, 8, 8), (4, 3, 3)], {}, "same rank"),
    ("conv", [(1, 1, 2, 2, 2, 2), (1, 1, 1, 1, 1, 1)], {}, "1, 2 or 3 spatial axes"),
    ("conv_transpose", [(2, 3, 4, 4), (4, 2, 3, 3)], {}, "channels"),
    ("conv_transpose", [(2, 4, 4, 4), (4, 2, 3, 3)], {"output_shape": [1, 1, 9, 9]}, "output_shape"),
    ("conv_transpose", [(2, 4, 4, 4), (4, 2, 3, 3)], {"pads": [3, 3, 3, 3]}, "crop"),
    ("max_pool", [(2, 3, 8, 8)], {"kernel_shape": [3]}, "kernel_shape"),
    ("max_pool", [(2, 3, 8, 8)], {"kernel_shape": [3, 3], "storage_order": 2}, "storage_order"),
    ("max_pool", [(2, 3, 8, 8)], {"kernel_shape": [300, 300], "pads": [300] * 4}, "positions"),
    ("average_pool", [(2, 3, 8, 8)], {"kernel_shape": [0, 1]}, "kernel_shape"),
    ("global_average_pool", [(2, 3)], {}, "spatial axes"),
    ("global_max_pool", [(2, 3, 0)], {}, "at least one element"),
]


@pytest.mark.parametrize(("op", "shapes", "attrs", "words"), REFUSED, ids=lambda value: str(value))
def test_bad_shapes_and_attrs_are_refused_naming_the_node(
    op: str, shapes: list[Shape], attrs: dict[str, AttrLike], words: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        inferred_shape(op, shapes, **attrs)
    assert raised.value.subject == "out"
    assert "'out'" in raised.value.message and words in raised.value.message, raised.value.message


@pytest.mark.parametrize("op", ["conv", "conv_transpose", "average_pool"])
def test_int_arguments_are_refused(op: str) -> None:
    shapes = [(1, 2, 4, 4)] if op == "average_pool" else [(1, 2, 4, 4), (2, 2, 1, 1)]
    attrs: dict[str, AttrLike] = {"kernel_shape": [2, 2]} if op == "average_pool" else {}
    if op == "average_pool":  # an int average is a float64, as `mean`'s
        assert inferred_shape(op, shapes, "int32", **attrs) == (1, 2, 3, 3)
        return
    with pytest.raises(InvalidArgument, match="float tensors"):
        inferred_shape(op, shapes, "int32", **attrs)


def test_max_pool_of_ints_keeps_the_dtype_and_has_no_gradient() -> None:
    x = np.array([[[3, -7, 5, 5, 2]]], dtype=np.int64)
    nodes = [input_node("x", "int64", x.shape), node("out", "max_pool", "x", kernel_shape=[2], pads=[1, 0])]
    [value] = Plan(build_graph(make_graph(nodes))).forward({"x": x}, {}, ["out"])
    assert value.dtype == np.int64
    np.testing.assert_array_equal(value, [[[3, 3, 5, 5, 5]]])


def test_shapes_known_only_when_fed_are_checked_then_naming_the_node() -> None:
    nodes = [input_node("x", "float64"), input_node("w", "float64"), node("out", "conv", "x", "w", group=2)]
    plan = Plan(build_graph(make_graph(nodes)))
    with pytest.raises(InvalidArgument) as raised:
        plan.forward({"x": np.zeros((1, 4, 5, 5)), "w": np.zeros((3, 2, 3, 3))}, {}, ["out"])
    assert raised.value.subject == "out" and "does not divide" in raised.value.message


def test_absurd_pads_are_refused_as_out_of_memory_before_allocating() -> None:
    """Pads of 2**40 would ask for terabytes of padded input: refused at once, naming the node."""
    nodes = [input_node("x", "float64"), node("out", "average_pool", "x", kernel_shape=[2], pads=[2**40, 2**40])]
    plan = Plan(build_graph(make_graph(nodes)))
    with pytest.raises(ResourceExhausted) as raised:
        plan.forward({"x": np.zeros((1, 1, 3))}, {}, ["out"])
    assert raised.value.subject == "out"
