"""The structure, reduction and einsum ops: gradients against finite differences and torch.autograd,
forward values against numpy, torch and onnx's reference evaluator, the shape rules, and the refusals.

The rows are tests/op_tables/structure.py; exact rows here pin the conventions at ties and zeros.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from onnx.reference import ReferenceEvaluator

from chainrule.server.errors import InvalidArgument
from chainrule.server.graph import build_graph
from chainrule.server.ops import OPS
from chainrule.server.plan import Plan
from tests.gradcheck import (
    Array,
    OpCase,
    check_grads,
    constant,
    declared_inputs,
    input_node,
    make_graph,
    node,
    run_backward,
    run_op,
)
from tests.op_tables.structure import CASES, INT64_MAX, INT64_MIN, ints

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def torch_in_float64() -> Iterator[None]:
    """PyTorch's references build float64 tensors from Python numbers while this module's tests run,
    and only then: torch's default dtype is process-wide, and later modules expect float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_this_module_leaves_torchs_default_dtype_alone_when_imported() -> None:
    probe = "import torch, tests.test_ops_structure; print(torch.get_default_dtype())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.split() == ["torch.float32"], result.stderr[-2000:]


def forward(case: OpCase, dtype: Any = np.float64) -> Array:
    [value] = Plan(build_graph(make_graph(case.nodes(dtype)))).forward(case.feeds(dtype), {}, ["out"])
    return np.asarray(value)


def forward_as_given(op: str, args: Sequence[Array], attrs: Mapping[str, Any]) -> Array:
    """The op applied to arguments fed with the dtypes they have (OpCase feeds floats in one dtype)."""
    feeds = {f"x{i}": arg for i, arg in enumerate(args)}
    nodes = [*declared_inputs(feeds), node("out", op, *feeds, **attrs)]
    [value] = Plan(build_graph(make_graph(nodes))).forward(feeds, {}, ["out"])
    return np.asarray(value)


def cotangent(case: OpCase) -> Array:
    """A random loss_grad of the output's computed shape (rows with tensor arguments leave it unknown statically)."""
    return np.random.default_rng(len(case.id)).standard_normal(forward(case).shape)


def case_id(case: OpCase) -> str:
    return case.id


# ---------------------------------------------------------------- every row: gradients and dtypes
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradient_matches_finite_differences(case: OpCase) -> None:
    check_grads(case.nodes(), case.feeds(), loss="out", wrt=case.differentiable(), loss_grad=cotangent(case))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_float32_stays_float32(case: OpCase) -> None:
    loss_grad = cotangent(case)
    single = run_op(case, loss_grad, dtype=np.float32)
    double = run_op(case, loss_grad)
    assert single.loss.dtype == np.float32
    np.testing.assert_allclose(single.loss, double.loss, rtol=1e-5, atol=1e-5)
    for name in case.differentiable():
        assert single.grads[name].dtype == np.float32
        np.testing.assert_allclose(single.grads[name], double.grads[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradient_with_released_intermediates(case: OpCase) -> None:
    """Every operand computed, not fed (indices and shape tensors too), so the plan releases what the op's
    `reads` leave out: a VJP that reads a released value gives a different gradient from the fed run's."""
    feeds = case.feeds()
    loss_grad = cotangent(case)
    nodes = [
        *declared_inputs(feeds),
        *(constant(f"zero_{name}", np.zeros((), value.dtype)) for name, value in feeds.items()),
        *(node(f"a_{name}", "add", name, f"zero_{name}") for name in feeds),
        node("out", case.op, *(f"a_{name}" for name in feeds), **case.attrs),
        constant("weights", loss_grad),
        node("weighted", "mul", "out", "weights"),
        node("loss", "sum", "weighted"),
    ]
    released = run_backward(nodes, feeds, loss="loss", wrt=case.differentiable())
    direct = run_op(case, loss_grad)
    for name in case.differentiable():
        np.testing.assert_allclose(released.grads[name], direct.grads[name], rtol=1e-12, atol=1e-12, err_msg=name)


# ---------------------------------------------------------------- references: torch (values and autograd), numpy
Args = list[Any]
"""A row's arguments for a reference: float ones as torch tensors (or numpy arrays), int ones as numpy arrays."""


def given(args: Args, position: int, attrs: Mapping[str, Any], name: str) -> list[int] | None:
    """A shape-like argument as the row gives it: the tensor at `position` when there is one, else the attr."""
    if len(args) > position:
        return [int(entry) for entry in np.asarray(args[position]).reshape(-1)]
    value = attrs.get(name)
    return None if value is None else list(value)


def onnx_positions(size: int, start: int, end: int, step: int) -> Array:
    """The positions ONNX's Slice takes on one axis, written out from the operator's definition."""
    start, end = start + size if start < 0 else start, end + size if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), size), min(max(end, 0), size)
    else:
        start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
    return np.arange(start, end, step)


def slice_positions(shape: Sequence[int], args: Args, attrs: Mapping[str, Any]) -> list[tuple[int, Array]]:
    starts = given(args, 1, attrs, "starts")
    ends = given(args, 2, attrs, "ends")
    assert starts is not None and ends is not None
    axes = given(args, 3, attrs, "axes") or list(range(len(starts)))
    steps = given(args, 4, attrs, "steps") or [1] * len(starts)
    return [
        (axis % len(shape), onnx_positions(shape[axis], start, end, step))
        for axis, start, end, step in zip(axes, starts, ends, steps, strict=True)
    ]


def split_sizes(size: int, args: Args, attrs: Mapping[str, Any]) -> list[int]:
    sizes = given(args, 1, attrs, "splits")
    if sizes is not None:
        return sizes
    count = attrs["num_outputs"]
    part = -(-size // count)
    return [part] * (count - 1) + [size - part * (count - 1)]


def reduced_dims(x: Any, args: Args, attrs: Mapping[str, Any]) -> tuple[int, ...]:
    axes = given(args, 1, attrs, "axes")
    return tuple(range(x.ndim)) if not axes else tuple(axis % x.ndim for axis in axes)


def torch_prod(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    """torch.prod over several axes: the reduced axes moved last and merged into one."""
    rest = [axis for axis in range(x.ndim) if axis not in dims]
    out = x.permute(*rest, *dims).reshape(*[x.shape[axis] for axis in rest], -1).prod(-1)
    return out.reshape([1 if axis in dims else x.shape[axis] for axis in range(x.ndim)]) if keepdim else out


def torch_pad(x: torch.Tensor, args: Args, attrs: Mapping[str, Any]) -> torch.Tensor:
    pads = given(args, 1, attrs, "pads")
    assert pads is not None
    rank = x.ndim
    mode = attrs.get("mode", "constant")
    padded = [axis for axis in range(rank) if pads[axis] or pads[axis + rank]]
    first = 0 if mode == "constant" else min(padded)
    widths = [width for axis in reversed(range(first, rank)) for width in (pads[axis], pads[axis + rank])]
    if mode == "constant":
        fill = args[2] if len(args) > 2 else attrs.get("value", 0.0)
        return F.pad(x, widths) + fill * F.pad(torch.zeros_like(x), widths, value=1.0)
    batched = x.unsqueeze(0) if first == 0 else x  # torch pads at most all but one leading axis
    out = F.pad(batched, widths, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])
    return out.reshape(out.shape[-rank:])


def torch_cumsum(x: torch.Tensor, args: Args, attrs: Mapping[str, Any]) -> torch.Tensor:
    axis = int(np.asarray(args[1])) if len(args) > 1 else attrs.get("axis", 0)
    flipped = x.flip(axis) if attrs.get("reverse") else x
    out = torch.cumsum(flipped, axis)
    if attrs.get("exclusive"):
        out = out - flipped
    return out.flip(axis) if attrs.get("reverse") else out


def torch_reshape(x: torch.Tensor, args: Args, attrs: Mapping[str, Any]) -> torch.Tensor:
    target = given(args, 1, attrs, "shape")
    assert target is not None
    if attrs.get("allowzero", 1) == 0:
        target = [x.shape[axis] if dim == 0 else dim for axis, dim in enumerate(target)]
    return x.reshape(target)


def torch_slice(x: torch.Tensor, args: Args, attrs: Mapping[str, Any]) -> torch.Tensor:
    for axis, positions in slice_positions(x.shape, args, attrs):
        x = x.index_select(axis, torch.from_numpy(positions))
    return x


def torch_gather(x: torch.Tensor, args: Args, attrs: Mapping[str, Any]) -> torch.Tensor:
    axis = attrs.get("axis", 0) % x.ndim
    indices = np.asarray(args[1]).astype(np.int64) % x.shape[axis]
    out = x.index_select(axis, torch.from_numpy(indices.reshape(-1)))
    return out.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])


def torch_unsqueeze(x: torch.Tensor, args: Args, attrs: Mapping[str, Any]) -> torch.Tensor:
    axes = given(args, 1, attrs, "axes")
    assert axes is not None
    for axis in sorted(axis % (x.ndim + len(axes)) for axis in axes):
        x = x.unsqueeze(axis)
    return x


def torch_split(x: torch.Tensor, args: Args, attrs: Mapping[str, Any]) -> torch.Tensor:
    axis = attrs.get("axis", 0) % x.ndim
    return torch.split(x, split_sizes(x.shape[axis], args, attrs), dim=axis)[attrs["index"]]


def torch_flatten(x: torch.Tensor, attrs: Mapping[str, Any]) -> torch.Tensor:
    axis = attrs.get("axis", 1)
    axis += x.ndim if axis < 0 else 0
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def torch_squeeze(x: torch.Tensor, args: Args, attrs: Mapping[str, Any]) -> torch.Tensor:
    axes = given(args, 1, attrs, "axes")
    return torch.squeeze(x) if axes is None else torch.squeeze(x, tuple(axes))


def keep(attrs: Mapping[str, Any]) -> bool:
    return bool(attrs.get("keepdims", False))


TorchReference = Callable[[Args, Mapping[str, Any]], torch.Tensor]
TORCH: dict[str, TorchReference] = {
    "concat": lambda a, k: torch.cat(a, dim=k["axis"]),
    "slice": lambda a, k: torch_slice(a[0], a, k),
    "split": lambda a, k: torch_split(a[0], a, k),
    "gather": lambda a, k: torch_gather(a[0], a, k),
    "gather_elements": lambda a, k: torch.gather(
        a[0], k.get("axis", 0), torch.from_numpy(np.asarray(a[1]) % a[0].shape[k.get("axis", 0)]).long()
    ),
    "squeeze": lambda a, k: torch_squeeze(a[0], a, k),
    "unsqueeze": lambda a, k: torch_unsqueeze(a[0], a, k),
    "expand": lambda a, k: torch.broadcast_to(
        a[0], np.broadcast_shapes(tuple(a[0].shape), tuple(given(a, 1, k, "shape") or ()))
    ),
    "tile": lambda a, k: torch.tile(a[0], tuple(given(a, 1, k, "repeats") or ())),
    "flatten": lambda a, k: torch_flatten(a[0], k),
    "reshape": lambda a, k: torch_reshape(a[0], a, k),
    "transpose": lambda a, k: torch.permute(a[0], [axis % a[0].ndim for axis in k["perm"]]),
    "pad": lambda a, k: torch_pad(a[0], a, k),
    "cumsum": lambda a, k: torch_cumsum(a[0], a, k),
    "einsum": lambda a, k: torch.einsum(k["equation"], *a),
    "sum": lambda a, k: torch.sum(a[0], dim=reduced_dims(a[0], a, k), keepdim=keep(k)),
    "mean": lambda a, k: torch.mean(a[0], dim=reduced_dims(a[0], a, k), keepdim=keep(k)),
    "max": lambda a, k: torch.amax(a[0], dim=reduced_dims(a[0], a, k), keepdim=keep(k)),
    "logsumexp": lambda a, k: torch.logsumexp(a[0], dim=reduced_dims(a[0], a, k), keepdim=keep(k)),
    "reduce_min": lambda a, k: torch.amin(a[0], dim=reduced_dims(a[0], a, k), keepdim=keep(k)),
    "reduce_prod": lambda a, k: torch_prod(a[0], reduced_dims(a[0], a, k), keep(k)),
    "reduce_l1": lambda a, k: torch.linalg.vector_norm(a[0], 1, dim=reduced_dims(a[0], a, k), keepdim=keep(k)),
    "reduce_l2": lambda a, k: torch.linalg.vector_norm(a[0], 2, dim=reduced_dims(a[0], a, k), keepdim=keep(k)),
    "reduce_sum_square": lambda a, k: torch.sum(a[0] * a[0], dim=reduced_dims(a[0], a, k), keepdim=keep(k)),
}
TORCH_LACKS = {
    "pad[reflect,twice-over]": "torch reflects at most once (pads below the axis size); numpy's reflection repeats",
    "reduce_min[scalar]": "torch.amin of a 0-d tensor over no axes",
}
TORCH_CASES = [case for case in CASES if case.id not in TORCH_LACKS]


def _torch_args(case: OpCase) -> Args:
    return [
        torch.tensor(value, requires_grad=True) if value.dtype.kind == "f" else value for value in case.feeds().values()
    ]


def _given_attrs(case: OpCase) -> dict[str, Any]:
    return {key: value for key, value in case.attrs.items() if value is not None}


def test_every_differentiable_op_has_a_torch_reference() -> None:
    assert {case.op for case in CASES} <= set(TORCH)
    assert set(TORCH_LACKS) <= {case.id for case in CASES}


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_forward_and_gradients_match_torch(case: OpCase) -> None:
    loss_grad = cotangent(case)
    ours = run_op(case, loss_grad)
    arguments = _torch_args(case)
    out = TORCH[case.op](arguments, _given_attrs(case))
    np.testing.assert_allclose(ours.loss, out.detach().numpy(), rtol=1e-12, atol=1e-12)
    out.backward(torch.from_numpy(loss_grad))
    for name, argument in zip(case.feeds(), arguments, strict=True):
        if isinstance(argument, torch.Tensor):
            assert argument.grad is not None, name
            np.testing.assert_allclose(ours.grads[name], argument.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


def numpy_pad(x: Array, pads: Sequence[int], mode: str, fill: float) -> Array:
    rank = x.ndim
    pairs = list(zip(pads[:rank], pads[rank:], strict=True))
    crop = tuple(slice(max(-b, 0), size - max(-e, 0)) for size, (b, e) in zip(x.shape, pairs, strict=True))
    widths = [(max(b, 0), max(e, 0)) for b, e in pairs]
    if mode == "constant":
        return np.pad(x[crop], widths, constant_values=fill)
    return np.pad(x[crop], widths, mode=mode)


def numpy_cumsum(x: Array, axis: int, exclusive: bool, reverse: bool) -> Array:
    """Element by element from the definition: out[i] = sum of x[j] for j before i (after, reversed), or up to i."""
    moved = np.moveaxis(x, axis, 0)
    size = moved.shape[0]
    rows = []
    for i in range(size):
        if reverse:
            chosen = range(i + 1 if exclusive else i, size)
        else:
            chosen = range(0, i if exclusive else i + 1)
        rows.append(sum((moved[j] for j in chosen), np.zeros_like(moved[0])))
    return np.moveaxis(np.stack(rows), 0, axis)


def numpy_reference(case: OpCase) -> Array:
    """The row's output computed with numpy, independently of the op's own implementation."""
    a = list(case.feeds().values())
    k = _given_attrs(case)
    x = a[0]
    if case.op == "concat":
        return np.concatenate(a, axis=k["axis"])
    if case.op == "slice":
        for axis, positions in slice_positions(x.shape, a, k):
            x = np.take(x, positions, axis=axis)
        return x
    if case.op == "split":
        axis = k.get("axis", 0) % x.ndim
        bounds = np.cumsum(split_sizes(x.shape[axis], a, k))[:-1]
        return np.split(x, bounds, axis=axis)[k["index"]]
    if case.op == "gather":
        return np.take(x, a[1], axis=k.get("axis", 0))
    if case.op == "gather_elements":
        axis = k.get("axis", 0) % x.ndim
        cut = x[tuple(slice(n) if i != axis else slice(None) for i, n in enumerate(a[1].shape))]
        return np.take_along_axis(cut, a[1] % x.shape[axis], axis=axis)
    if case.op == "squeeze":
        axes = given(a, 1, k, "axes")
        return np.squeeze(x) if axes is None else np.squeeze(x, tuple(axes))
    if case.op == "unsqueeze":
        return np.expand_dims(x, tuple(given(a, 1, k, "axes") or ()))
    if case.op == "expand":
        return x * np.ones(given(a, 1, k, "shape") or ())
    if case.op == "tile":
        return np.tile(x, given(a, 1, k, "repeats") or ())
    if case.op == "flatten":
        return torch_flatten(torch.from_numpy(x), k).numpy()
    if case.op == "reshape":
        return torch_reshape(torch.from_numpy(x), a, k).numpy()
    if case.op == "transpose":
        return np.transpose(x, k["perm"])
    if case.op == "pad":
        fill = float(a[2]) if len(a) > 2 else k.get("value", 0.0)
        return numpy_pad(x, given(a, 1, k, "pads") or (), k.get("mode", "constant"), fill)
    if case.op == "cumsum":
        axis = int(a[1]) if len(a) > 1 else k.get("axis", 0)
        return numpy_cumsum(x, axis, k.get("exclusive", False), k.get("reverse", False))
    if case.op == "einsum":
        return np.einsum(k["equation"], *a)
    dims = reduced_dims(x, a, k)
    reductions: dict[str, Callable[[Array], Array]] = {
        "sum": lambda v: np.sum(v, axis=dims, keepdims=keep(k)),
        "mean": lambda v: np.mean(v, axis=dims, keepdims=keep(k)),
        "max": lambda v: np.max(v, axis=dims, keepdims=keep(k)),
        "logsumexp": lambda v: np.log(np.sum(np.exp(v), axis=dims, keepdims=keep(k))),
        "reduce_min": lambda v: np.min(v, axis=dims, keepdims=keep(k)),
        "reduce_prod": lambda v: np.prod(v, axis=dims, keepdims=keep(k)),
        "reduce_l1": lambda v: np.sum(np.abs(v), axis=dims, keepdims=keep(k)),
        "reduce_l2": lambda v: np.sqrt(np.sum(v**2, axis=dims, keepdims=keep(k))),
        "reduce_sum_square": lambda v: np.sum(v**2, axis=dims, keepdims=keep(k)),
    }
    return reductions[case.op](x)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_numpy(case: OpCase) -> None:
    ours = forward(case)
    expected = numpy_reference(case)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- ops without gradients: shape, one_hot, argmax, argmin
def row(op: str, label: str, *args: Array, **attrs: Any) -> OpCase:
    return OpCase(f"{op}[{label}]", op, tuple(np.asarray(arg) for arg in args), attrs)


TIES = np.array([[3.0, 1.0, 3.0, 0.5], [-1.0, -1.0, 2.0, -1.0], [0.0, 4.0, 4.0, 4.0]])
WITH_NAN = np.array([[1.0, np.nan, 3.0], [np.nan, 0.0, np.nan], [2.0, 2.0, -1.0]])
UNDIFFERENTIATED = [
    row("shape", "2x3x4", np.zeros((2, 3, 4))),
    row("shape", "start=1", np.zeros((2, 3, 4)), start=1),
    row("shape", "start=-2,end=-1", np.zeros((2, 3, 4)), start=-2, end=-1),
    row("shape", "scalar", np.zeros(())),
    row("one_hot", "depth=4", ints(0, 3, 1, 1), depth=4),
    row("one_hot", "axis=0,float32", ints(0, 2, 1, 2, dtype=np.int32).reshape(2, 2), depth=3, axis=0, dtype="float32"),
    row("one_hot", "on-off", ints(1, 0), depth=2, on_value=5.0, off_value=-1.0, dtype="float64"),
    row("argmax", "ties-first", TIES, axis=1),
    row("argmax", "ties-last,keepdims", TIES, axis=1, keepdims=True, select_last_index=True),
    row("argmax", "axis=0", TIES),
    row("argmin", "ties-first", TIES, axis=-1),
    row("argmin", "ties-last", TIES, axis=0, select_last_index=True),
    row("argmax", "nan-wins", WITH_NAN, axis=1),
    row("argmin", "nan-wins", WITH_NAN, axis=1),
]


def torch_undifferentiated(case: OpCase) -> Array:
    x = torch.from_numpy(case.args[0])
    k = _given_attrs(case)
    if case.op == "shape":
        return np.array(x.shape[k.get("start", 0) : k.get("end")], dtype=np.int64)
    if case.op == "one_hot":
        depth = k["depth"]
        hot = F.one_hot(x.long(), depth).movedim(-1, k.get("axis", -1))
        out = torch.where(hot == 1, k.get("on_value", 1.0), k.get("off_value", 0.0))
        return out.numpy().astype(k.get("dtype", "int64"))
    pick = torch.argmax if case.op == "argmax" else torch.argmin
    axis = k.get("axis", 0)
    keepdim = k.get("keepdims", False)
    if k.get("select_last_index"):
        return (x.shape[axis] - 1 - pick(x.flip(axis), dim=axis, keepdim=keepdim)).numpy()
    return pick(x, dim=axis, keepdim=keepdim).numpy()


@pytest.mark.parametrize("case", UNDIFFERENTIATED, ids=case_id)
def test_int_valued_ops_match_torch_and_pass_no_gradient(case: OpCase) -> None:
    ours = forward(case)
    expected = torch_undifferentiated(case)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)
    assert all(vjp is None for vjp in OPS[case.op].vjps)


def test_a_float_one_hot_still_passes_no_gradient() -> None:
    """one_hot of float dtype feeds a loss, but nothing flows back to its float indices."""
    feeds = {"i": np.array([0.0, 2.0])}
    nodes = [
        *declared_inputs(feeds),
        node("hot", "one_hot", "i", depth=3, dtype="float64"),
        node("loss", "sum", "hot"),
    ]
    result = run_backward(nodes, feeds, loss="loss", wrt=["i"])
    np.testing.assert_array_equal(result.grads["i"], np.zeros(2))


# ---------------------------------------------------------------- onnx's reference evaluator
ONNX_OPSET = 21


def onnx_reference(op_type: str, inputs: Sequence[Array], outputs: int = 1, **attrs: Any) -> list[Array]:
    names = [f"in{i}" for i in range(len(inputs))]
    graph = helper.make_graph(
        [helper.make_node(op_type, names, [f"out{i}" for i in range(outputs)], **attrs)],
        "reference",
        [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
            for name, value in zip(names, inputs, strict=True)
        ],
        [helper.make_tensor_value_info(f"out{i}", onnx.TensorProto.UNDEFINED, None) for i in range(outputs)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    return [np.asarray(value) for value in ReferenceEvaluator(model).run(None, dict(zip(names, inputs, strict=True)))]


def arange(*shape: int) -> Array:
    return np.arange(math.prod(shape), dtype=np.float64).reshape(shape) - 3.5


OnnxRow = tuple[str, str, tuple[Array, ...], dict[str, Any], dict[str, Any], int, int]
"""(id, ONNX op, inputs, ONNX attrs, our attrs beyond them, ONNX outputs, the output our node is)."""
ONNX_ROWS: list[OnnxRow] = [
    ("slice-clamps", "Slice", (arange(3, 4, 5), ints(-100, 1, 4), ints(100, -1, INT64_MIN), ints(0, -2, 2),
                               ints(1, 1, -2)), {}, {}, 1, 0),
    ("slice-int64-max-start", "Slice", (arange(4, 3), ints(INT64_MAX), ints(-INT64_MAX), ints(0), ints(-1)), {}, {},
     1, 0),
    ("slice-out-of-range-empty", "Slice", (arange(4, 3), ints(5, 0), ints(9, 3), ints(0, 1)), {}, {}, 1, 0),
    ("split-num-outputs", "Split", (arange(2, 7),), {"axis": 1, "num_outputs": 3}, {"index": 2}, 3, 2),
    ("split-even", "Split", (arange(6, 2),), {"num_outputs": 3}, {"index": 1}, 3, 1),
    ("split-sizes", "Split", (arange(2, 7), ints(2, 3, 2)), {"axis": -1}, {"index": 1}, 3, 1),
    ("pad-constant-value", "Pad", (arange(2, 3), ints(1, 0, 0, 2), np.array(1.5)), {}, {}, 1, 0),
    ("pad-reflect", "Pad", (arange(3, 4), ints(0, 2, 1, 1)), {"mode": "reflect"}, {}, 1, 0),
    ("pad-edge", "Pad", (arange(3, 4), ints(2, 0, 1, 3)), {"mode": "edge"}, {}, 1, 0),
    ("pad-wrap", "Pad", (arange(3, 4), ints(1, 2, 0, 1)), {"mode": "wrap"}, {}, 1, 0),
    ("cumsum-exclusive-reverse", "CumSum", (arange(2, 4), np.array(1)), {"exclusive": 1, "reverse": 1}, {}, 1, 0),
    ("cumsum-exclusive", "CumSum", (arange(3, 2), np.array(0, np.int32)), {"exclusive": 1}, {}, 1, 0),
    ("cumsum-reverse", "CumSum", (arange(5), np.array(-1)), {"reverse": 1}, {}, 1, 0),
    ("cumsum-int32", "CumSum", (ints(3, -1, 4, dtype=np.int32), np.array(0)), {"exclusive": 1}, {}, 1, 0),
    ("one-hot-negative-and-out-of-range", "OneHot", (ints(0, -1, 3, -4, 2, -3).reshape(2, 3), np.array(3),
                                                     np.array([0.0, 5.0], np.float32)), {"axis": 1}, {}, 1, 0),
    ("one-hot-last-axis", "OneHot", (ints(1, 0, -2), np.array(4), ints(-1, 7)), {"axis": -1}, {}, 1, 0),
    ("gather-negative", "Gather", (arange(4, 3), ints(-1, 0, 2, -4).reshape(2, 2)), {"axis": 0}, {}, 1, 0),
    ("gather-elements", "GatherElements", (arange(3, 4), ints(0, -1, 3, 1, 2, 0).reshape(3, 2)), {"axis": 1}, {}, 1,
     0),
    ("expand-both-ways", "Expand", (arange(3, 1), ints(2, 1, 4)), {}, {}, 1, 0),
    ("tile", "Tile", (arange(2, 3), ints(2, 2)), {}, {}, 1, 0),
    ("flatten-axis-0", "Flatten", (arange(2, 3, 4),), {"axis": 0}, {}, 1, 0),
    ("flatten-axis-2", "Flatten", (arange(2, 3, 4),), {"axis": 2}, {}, 1, 0),
    ("squeeze", "Squeeze", (arange(1, 3, 1), ints(0, -1)), {}, {}, 1, 0),
    ("unsqueeze", "Unsqueeze", (arange(3, 2), ints(-1, 0)), {}, {}, 1, 0),
    ("shape-slice", "Shape", (arange(2, 3, 4),), {"start": -2}, {}, 1, 0),
    ("argmax-last", "ArgMax", (TIES,), {"axis": 1, "keepdims": 0, "select_last_index": 1}, {}, 1, 0),
    ("argmin-keepdims", "ArgMin", (TIES,), {"axis": 0, "keepdims": 1}, {}, 1, 0),
    ("reduce-prod", "ReduceProd", (arange(2, 3, 4), ints(1)), {"keepdims": 0}, {}, 1, 0),
    ("reduce-min", "ReduceMin", (arange(2, 3, 4), ints(0, 2)), {"keepdims": 1}, {}, 1, 0),
    ("reduce-l1", "ReduceL1", (arange(2, 3, 4), ints(-1)), {"keepdims": 0}, {}, 1, 0),
    ("reduce-l2", "ReduceL2", (arange(2, 3, 4), ints(0, 1)), {"keepdims": 0}, {}, 1, 0),
    ("reduce-sum-square", "ReduceSumSquare", (arange(2, 3), ints(1)), {"keepdims": 1}, {}, 1, 0),
    ("reduce-sum-empty-axes", "ReduceSum", (arange(2, 3), np.zeros(0, np.int64)), {"keepdims": 0}, {}, 1, 0),
    ("reduce-max", "ReduceMax", (arange(2, 3), ints(-1)), {"keepdims": 0}, {}, 1, 0),
    ("reduce-log-sum-exp", "ReduceLogSumExp", (arange(2, 3), ints(0)), {"keepdims": 1}, {}, 1, 0),
    ("reduce-log-sum-exp-empty", "ReduceLogSumExp", (np.zeros((2, 0)), ints(1)), {"keepdims": 0}, {}, 1, 0),
    ("einsum-implicit", "Einsum", (arange(2, 3), arange(3, 4)), {"equation": "ij,jk"}, {}, 1, 0),
    ("einsum-ellipsis", "Einsum", (arange(2, 3, 4), arange(4)), {"equation": "...j,j->..."}, {}, 1, 0),
    ("concat", "Concat", (arange(2, 1), arange(2, 3)), {"axis": -1}, {}, 1, 0),
    ("reshape-allowzero-0", "Reshape", (arange(2, 3, 4), ints(0, -1)), {"allowzero": 0}, {}, 1, 0),
]  # fmt: skip
OUR_NAMES = {
    "Slice": "slice", "Split": "split", "Pad": "pad", "CumSum": "cumsum", "OneHot": "one_hot", "Gather": "gather",
    "GatherElements": "gather_elements", "Expand": "expand", "Tile": "tile", "Flatten": "flatten",
    "Squeeze": "squeeze", "Unsqueeze": "unsqueeze", "Shape": "shape", "ArgMax": "argmax", "ArgMin": "argmin",
    "ReduceProd": "reduce_prod", "ReduceMin": "reduce_min", "ReduceL1": "reduce_l1", "ReduceL2": "reduce_l2",
    "ReduceSumSquare": "reduce_sum_square", "ReduceSum": "sum", "ReduceMax": "max", "ReduceLogSumExp": "logsumexp",
    "Einsum": "einsum", "Concat": "concat", "Reshape": "reshape",
}  # fmt: skip
BOOL_ATTRS = {"keepdims", "exclusive", "reverse", "select_last_index"}


@pytest.mark.parametrize("onnx_row", ONNX_ROWS, ids=lambda onnx_row: onnx_row[0])
def test_forward_matches_onnx_reference_evaluator(onnx_row: OnnxRow) -> None:
    """Shape-like inputs passed as tensors, exactly as ONNX passes them, and attrs of the same names."""
    label, op_type, inputs, onnx_attrs, extra, outputs, output = onnx_row
    expected = onnx_reference(op_type, inputs, outputs, **onnx_attrs)[output]
    attrs = {key: bool(value) if key in BOOL_ATTRS else value for key, value in onnx_attrs.items()}
    ours = forward_as_given(OUR_NAMES[op_type], inputs, {**attrs, **extra})
    assert ours.dtype == expected.dtype, (ours.dtype, expected.dtype)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-12)


SHAPE_LIKE_ATTRS = {
    "slice": ("starts", "ends", "axes", "steps"), "split": ("splits",), "pad": ("pads", "value"),
    "cumsum": ("axis",), "expand": ("shape",), "tile": ("repeats",), "squeeze": ("axes",), "unsqueeze": ("axes",),
    "reduce_prod": ("axes",), "reduce_min": ("axes",), "reduce_l1": ("axes",), "reduce_l2": ("axes",),
    "reduce_sum_square": ("axes",), "max": ("axes",), "logsumexp": ("axes",), "reshape": ("shape",),
}  # fmt: skip


@pytest.mark.parametrize(
    "onnx_row", [r for r in ONNX_ROWS if OUR_NAMES[r[1]] in SHAPE_LIKE_ATTRS and len(r[2]) > 1], ids=lambda r: r[0]
)
def test_shape_like_attrs_give_what_their_tensors_give(onnx_row: OnnxRow) -> None:
    label, op_type, inputs, onnx_attrs, extra, _, _ = onnx_row
    op = OUR_NAMES[op_type]
    base = {key: bool(value) if key in BOOL_ATTRS else value for key, value in onnx_attrs.items()} | extra
    attrs = dict(base)
    for name, value in zip(SHAPE_LIKE_ATTRS[op], inputs[1:], strict=False):
        attrs[name] = float(value) if value.dtype.kind == "f" else int(value) if value.ndim == 0 else value.tolist()
    from_tensors = forward_as_given(op, inputs, base)
    from_attrs = forward_as_given(op, inputs[:1], attrs)
    np.testing.assert_array_equal(from_attrs, from_tensors)


# ---------------------------------------------------------------- exact values at ties, zeros and NaN
NAN = np.nan
ExactRow = tuple[str, str, Array, dict[str, Any], Array, Array]
"""(id, op, x, attrs, loss_grad, the gradient PyTorch gives)."""
EXACT_ROWS: list[ExactRow] = [
    ("reduce_min-ties", "reduce_min", np.array([[1.0, 1.0, 3.0], [2.0, 0.0, 0.0]]), {"axes": [1]},
     np.array([1.0, 2.0]), np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 1.0]])),
    ("reduce_min-ties-all-axes", "reduce_min", np.array([[2.0, 1.0], [1.0, 3.0]]), {}, np.array(4.0),
     np.array([[0.0, 2.0], [2.0, 0.0]])),
    ("reduce_min-nan-slice", "reduce_min", np.array([[1.0, NAN, 3.0], [2.0, 0.0, 5.0]]), {"axes": [1]},
     np.array([1.0, 1.0]), np.array([[NAN, NAN, NAN], [0.0, 1.0, 0.0]])),
    ("reduce_prod-zeros", "reduce_prod", np.array([[0.0, 2.0, 3.0], [0.0, 0.0, 1.0], [1.0, 2.0, 3.0]]),
     {"axes": [1]}, np.array([1.0, 1.0, 2.0]), np.array([[6.0, 0.0, 0.0], [0.0, 0.0, 0.0], [12.0, 6.0, 4.0]])),
    ("reduce_prod-all-zero,keepdims", "reduce_prod", np.zeros((2, 2)), {"axes": [0], "keepdims": True},
     np.array([[1.0, 1.0]]), np.zeros((2, 2))),
    ("reduce_l2-zero-slice", "reduce_l2", np.array([[0.0, 0.0], [3.0, 4.0]]), {"axes": [1]}, np.array([1.0, 5.0]),
     np.array([[0.0, 0.0], [3.0, 4.0]])),
    ("reduce_l1-at-zero", "reduce_l1", np.array([0.0, -2.0, 3.0]), {}, np.array(2.0), np.array([0.0, -2.0, 2.0])),
]  # fmt: skip
TORCH_OF_EXACT: dict[str, Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]] = {
    "reduce_min": lambda x, k: torch.amin(x, dim=k.get("axes", ()), keepdim=k.get("keepdims", False)),
    "reduce_prod": lambda x, k: torch.prod(x, dim=k["axes"][0], keepdim=k.get("keepdims", False)),
    "reduce_l2": lambda x, k: torch.linalg.vector_norm(x, 2, dim=k.get("axes")),
    "reduce_l1": lambda x, k: torch.linalg.vector_norm(x, 1, dim=k.get("axes")),
}


@pytest.mark.parametrize("exact_row", EXACT_ROWS, ids=lambda exact_row: exact_row[0])
def test_ties_zeros_and_nan_follow_torch(exact_row: ExactRow) -> None:
    label, op, x, attrs, loss_grad, expected = exact_row
    result = run_op(OpCase(label, op, (x,), attrs), loss_grad)
    np.testing.assert_allclose(result.grads["x0"], expected, rtol=1e-15)
    tensor = torch.tensor(x, requires_grad=True)
    TORCH_OF_EXACT[op](tensor, attrs).backward(torch.from_numpy(loss_grad))
    assert tensor.grad is not None
    np.testing.assert_allclose(tensor.grad.numpy(), expected, rtol=1e-15)


def test_gather_accumulates_repeated_indices() -> None:
    result = run_op(OpCase("gather[repeats]", "gather", (np.arange(3.0), ints(0, 0, 2, -3))), np.array([1.0, 2, 3, 4]))
    np.testing.assert_array_equal(result.grads["x0"], [7.0, 0.0, 3.0])


def test_concat_of_one_node_twice_sums_both_gradients() -> None:
    feeds = {"x": np.array([1.0, 2.0])}
    nodes = [*declared_inputs(feeds), node("out", "concat", "x", "x", axis=0)]
    result = run_backward(nodes, feeds, loss="out", wrt=["x"], loss_grad=np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(result.grads["x"], [4.0, 6.0])


def test_einsum_of_one_node_twice_is_a_square() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    feeds = {"x": x}
    nodes = [*declared_inputs(feeds), node("out", "einsum", "x", "x", equation="ij,jk->ik")]
    result = check_grads(nodes, feeds, loss="out", wrt=["x"], loss_grad=np.ones((2, 2)))
    np.testing.assert_allclose(result.loss, x @ x)


# ---------------------------------------------------------------- shape rules: what is known before anything runs
def inferred(nodes: Sequence[Any]) -> Any:
    return build_graph(make_graph(nodes)).nodes["out"]["type"]


def declared(name: str, dtype: str, shape: Sequence[int]) -> Any:
    return input_node(name, dtype, shape)


INFERRED_ROWS = [
    ("slice-starts-tensor", [declared("x", "float64", (2, 3, 4)), declared("s", "int64", (1,)),
                             declared("e", "int64", (1,)), node("out", "slice", "x", "s", "e", axes=[1])],
     (2, None, 4), "float64"),
    ("slice-axes-tensor", [declared("x", "float32", (2, 3)), declared("s", "int32", (1,)), declared("e", "int32", (1,)),
                           declared("a", "int32", (1,)), node("out", "slice", "x", "s", "e", "a")],
     (None, None), "float32"),
    ("sum-axes-tensor", [declared("x", "float64", (2, 3, 4)), declared("a", "int64", (2,)),
                         node("out", "sum", "x", "a")], (None,), "float64"),
    ("sum-axes-tensor-keepdims", [declared("x", "float64", (2, 1, 4)), declared("a", "int64", (-1,)),
                                  node("out", "sum", "x", "a", keepdims=True)], (None, 1, None), "float64"),
    ("sum-of-bool", [declared("x", "bool", (2, 3)), node("out", "sum", "x", axes=[0])], (3,), "int64"),
    ("reduce_l2-of-int32", [declared("x", "int32", (2, 3)), node("out", "reduce_l2", "x")], (), "float64"),
    ("reshape-shape-tensor", [declared("x", "float64", (2, 3)), declared("s", "int64", (3,)),
                              node("out", "reshape", "x", "s")], (None, None, None), "float64"),
    ("reshape-allowzero-unknown", [declared("x", "float64", (-1, 3, 4)),
                                   node("out", "reshape", "x", shape=[0, 12], allowzero=0)], (None, 12), "float64"),
    ("one_hot-depth-tensor", [declared("i", "int64", (3,)), declared("d", "int64", ()),
                              node("out", "one_hot", "i", "d", axis=0)], (None, 3), "int64"),
    ("one_hot-values", [declared("i", "int32", (3,)), declared("d", "int64", (1,)), declared("v", "float32", (2,)),
                        node("out", "one_hot", "i", "d", "v")], (3, None), "float32"),
    ("expand-shape-tensor", [declared("x", "float64", (3, 1)), declared("s", "int64", (3,)),
                             node("out", "expand", "x", "s")], (None, 3, None), "float64"),
    ("split-splits-tensor", [declared("x", "float64", (5, 2)), declared("s", "int64", (2,)),
                             node("out", "split", "x", "s", index=0)], (None, 2), "float64"),
    ("split-unknown-axis", [declared("x", "float64", (-1, 2)), node("out", "split", "x", splits=[2, 3], index=1)],
     (3, 2), "float64"),
    ("concat-unknown-size", [declared("x", "float64", (-1, 3)), declared("y", "float64", (2, -1)),
                             node("out", "concat", "x", "y", axis=0)], (None, 3), "float64"),
    ("concat-promotes", [declared("x", "int32", (2,)), declared("y", "float32", (1,)),
                         node("out", "concat", "x", "y", axis=0)], (3,), "float64"),
    ("einsum-unknown-size", [declared("a", "float64", (-1, 3)), declared("b", "float64", (3, 4)),
                             node("out", "einsum", "a", "b", equation="ij,jk->ki")], (4, None), "float64"),
    ("einsum-broadcast", [declared("a", "float64", (1, 3)), declared("b", "float64", (2, 3)),
                          node("out", "einsum", "a", "b", equation="ij,ij->ij")], (2, 3), "float64"),
    ("cumsum-int32", [declared("x", "int32", (4,)), node("out", "cumsum", "x")], (4,), "int32"),
    ("cumsum-bool", [declared("x", "bool", (4,)), node("out", "cumsum", "x")], (4,), "int64"),
    ("tile-repeats-tensor", [declared("x", "float64", (0, 3)), declared("r", "int64", (2,)),
                             node("out", "tile", "x", "r")], (0, None), "float64"),
    ("squeeze-unknown", [declared("x", "float64", (1, -1)), node("out", "squeeze", "x")], None, "float64"),
    ("pad-pads-tensor", [declared("x", "float64", (2, 3)), declared("p", "int64", (4,)),
                         node("out", "pad", "x", "p")], (None, None), "float64"),
    ("shape-unknown-rank", [input_node("x"), node("out", "shape", "x")], (None,), "int64"),
]  # fmt: skip


@pytest.mark.parametrize("inferred_row", INFERRED_ROWS, ids=lambda inferred_row: inferred_row[0])
def test_shape_rules_leave_unknown_only_what_run_time_decides(inferred_row: tuple[Any, ...]) -> None:
    _, nodes, shape, dtype = inferred_row
    found = inferred(nodes)
    assert found.shape == shape
    assert found.dtype == np.dtype(dtype)


# ---------------------------------------------------------------- refusals: INVALID_ARGUMENT naming the node
REFUSED_AT_CREATION = [
    ("concat-axis", [declared("x", "float64", (2, 3)), node("out", "concat", "x", "x", axis=2)], "out of range"),
    ("concat-shapes", [declared("x", "float64", (2, 3)), declared("y", "float64", (3, 3)),
                       node("out", "concat", "x", "y", axis=1)], "agree"),
    ("concat-scalar", [declared("x", "float64", ()), node("out", "concat", "x", axis=0)], "scalar"),
    ("slice-step-0", [declared("x", "float64", (4,)), node("out", "slice", "x", starts=[0], ends=[2], steps=[0])],
     "steps"),
    ("slice-lengths", [declared("x", "float64", (4, 4)), node("out", "slice", "x", starts=[0, 1], ends=[2])],
     "length"),
    ("slice-too-many", [declared("x", "float64", (4,)), node("out", "slice", "x", starts=[0, 1], ends=[2, 2])],
     "rank 1"),
    ("slice-no-starts", [declared("x", "float64", (4,)), node("out", "slice", "x", ends=[2])], "needs attr"),
    ("slice-float-tensor", [declared("x", "float64", (4,)), declared("s", "float64", (1,)),
                            declared("e", "int64", (1,)), node("out", "slice", "x", "s", "e")], "int32 or int64"),
    ("gather-float-indices", [declared("x", "float64", (4,)), declared("i", "float64", (2,)),
                              node("out", "gather", "x", "i")], "int32 or int64"),
    ("gather-elements-rank", [declared("x", "float64", (4, 2)), declared("i", "int64", (2,)),
                              node("out", "gather_elements", "x", "i")], "rank"),
    ("squeeze-not-one", [declared("x", "float64", (2, 3)), node("out", "squeeze", "x", axes=[0])], "size 1"),
    ("unsqueeze-no-axes", [declared("x", "float64", (2, 3)), node("out", "unsqueeze", "x")], "needs attr"),
    ("unsqueeze-twice", [declared("x", "float64", (2, 3)), node("out", "unsqueeze", "x", axes=[0, -4])], "twice"),
    ("expand-mismatch", [declared("x", "float64", (2, 3)), node("out", "expand", "x", shape=[4, 3])], "broadcast"),
    ("tile-count", [declared("x", "float64", (2, 3)), node("out", "tile", "x", repeats=[2])], "one repeat per axis"),
    ("tile-negative", [declared("x", "float64", (2,)), node("out", "tile", "x", repeats=[-1])], "negative"),
    ("flatten-axis", [declared("x", "float64", (2, 3)), node("out", "flatten", "x", axis=3)], "out of range"),
    ("pad-count", [declared("x", "float64", (2, 3)), node("out", "pad", "x", pads=[1, 1])], "2 * rank"),
    ("pad-mode", [declared("x", "float64", (2, 3)), node("out", "pad", "x", pads=[0, 0, 0, 0], mode="circular")],
     "mode"),
    ("pad-crop-too-much", [declared("x", "float64", (2, 3)), node("out", "pad", "x", pads=[-3, 0, 0, 0])], "crop"),
    ("pad-reflect-empty", [declared("x", "float64", (0, 3)), node("out", "pad", "x", pads=[1, 0, 0, 0],
                                                                mode="reflect")], "empty"),
    ("split-sizes-sum", [declared("x", "float64", (5,)), node("out", "split", "x", splits=[2, 2], index=0)], "add up"),
    ("split-index", [declared("x", "float64", (6,)), node("out", "split", "x", num_outputs=3, index=3)],
     "out of range"),
    ("split-both", [declared("x", "float64", (6,)), node("out", "split", "x", splits=[6], num_outputs=1, index=0)],
     "not both"),
    ("split-too-many", [declared("x", "float64", (5,)), node("out", "split", "x", num_outputs=4, index=0)],
     "cannot be split"),
    ("one_hot-dtype", [declared("i", "int64", (2,)), node("out", "one_hot", "i", depth=3, dtype="float16")], "dtype"),
    ("one_hot-depth", [declared("i", "int64", (2,)), node("out", "one_hot", "i", depth=0)], "at least 1"),
    ("one_hot-bool", [declared("i", "bool", (2,)), node("out", "one_hot", "i", depth=2)], "numbers"),
    ("argmax-empty", [declared("x", "float64", (0, 2)), node("out", "argmax", "x")], "non-empty"),
    ("cumsum-axis", [declared("x", "float64", (2,)), node("out", "cumsum", "x", axis=1)], "out of range"),
    ("cumsum-axis-tensor", [declared("x", "float64", (2,)), declared("a", "int64", (2,)),
                            node("out", "cumsum", "x", "a")], "one element"),
    ("einsum-operands", [declared("x", "float64", (2,)), node("out", "einsum", "x", equation="i,i->")], "operand"),
    ("einsum-letters", [declared("x", "float64", (2, 3)), node("out", "einsum", "x", equation="i->i")], "letters"),
    ("einsum-characters", [declared("x", "float64", (2,)), node("out", "einsum", "x", equation="1->")], "letters"),
    ("einsum-sizes", [declared("x", "float64", (2,)), declared("y", "float64", (3,)),
                      node("out", "einsum", "x", "y", equation="i,i->i")], "sizes"),
    ("einsum-output-letter", [declared("x", "float64", (2,)), node("out", "einsum", "x", equation="i->j")],
     "no operand"),
    ("einsum-output-ellipsis", [declared("x", "float64", (2, 3)), node("out", "einsum", "x", equation="...i->i")],
     "'...'"),
    ("reshape-no-shape", [declared("x", "float64", (2, 3)), node("out", "reshape", "x")], "needs attr"),
    ("reshape-allowzero", [declared("x", "float64", (2, 3)), node("out", "reshape", "x", shape=[6], allowzero=2)],
     "allowzero"),
    ("transpose-perm", [declared("x", "float64", (2, 3)), node("out", "transpose", "x", perm=[0, 2])], "out of range"),
    ("transpose-repeat", [declared("x", "float64", (2, 3)), node("out", "transpose", "x", perm=[1, -1])],
     "permutation"),
    ("sum-axes-tensor-float", [declared("x", "float64", (2, 3)), declared("a", "float64", (1,)),
                               node("out", "sum", "x", "a")], "int32 or int64"),
    ("reduce_min-axes-tensor-rank", [declared("x", "float64", (2, 3)), declared("a", "int64", (1, 1)),
                                     node("out", "reduce_min", "x", "a")], "1-D"),
]  # fmt: skip


@pytest.mark.parametrize("refused", REFUSED_AT_CREATION, ids=lambda refused: refused[0])
def test_bad_attrs_and_argument_types_are_refused_naming_the_node(refused: tuple[Any, ...]) -> None:
    _, nodes, words = refused
    with pytest.raises(InvalidArgument) as raised:
        build_graph(make_graph(nodes))
    assert "node 'out'" in str(raised.value)
    assert words in str(raised.value)
    assert raised.value.subject == "out"
    reasons = {"int32 or int64": "DTYPE_MISMATCH", "dtype": "DTYPE_MISMATCH", "numbers": "DTYPE_MISMATCH"}
    reasons |= {"needs attr": "BAD_ATTR"}
    assert raised.value.reason == reasons.get(words, "SHAPE_MISMATCH")


REFUSED_AT_RUN_TIME = [
    ("gather-out-of-range", [input_node("x"), input_node("i"), node("out", "gather", "x", "i")],
     {"x": np.zeros(3), "i": ints(3)}, "[-3, 2]"),
    ("gather-elements-out-of-range", [input_node("x"), input_node("i"), node("out", "gather_elements", "x", "i")],
     {"x": np.zeros(3), "i": ints(-4)}, "[-3, 2]"),
    ("slice-float-tensor", [input_node("x"), input_node("s"), input_node("e"), node("out", "slice", "x", "s", "e")],
     {"x": np.zeros(3), "s": np.zeros(1), "e": ints(2)}, "int32 or int64"),
    ("slice-tensor-rank", [input_node("x"), input_node("s"), input_node("e"), node("out", "slice", "x", "s", "e")],
     {"x": np.zeros(3), "s": np.zeros((1, 1), np.int64), "e": ints(2)}, "1-D"),
    ("expand-absurd", [input_node("x"), input_node("s"), node("out", "expand", "x", "s")],
     {"x": np.zeros(1), "s": ints(1 << 20, 1 << 20)}, "at run time"),
    ("tile-absurd", [input_node("x"), input_node("r"), node("out", "tile", "x", "r")],
     {"x": np.zeros(2), "r": ints(1 << 40)}, "at run time"),
    ("pad-absurd", [input_node("x"), input_node("p"), node("out", "pad", "x", "p")],
     {"x": np.zeros(2), "p": ints(0, 1 << 40)}, "at run time"),
    ("one_hot-absurd", [input_node("i"), input_node("d"), node("out", "one_hot", "i", "d")],
     {"i": ints(0, 1), "d": np.array(1 << 40)}, "at run time"),
    ("one_hot-depth-0", [input_node("i"), input_node("d"), node("out", "one_hot", "i", "d")],
     {"i": ints(0, 1), "d": np.array(0)}, "at least 1"),
    ("reshape-tensor", [input_node("x"), input_node("s"), node("out", "reshape", "x", "s")],
     {"x": np.zeros(6), "s": ints(4, -1)}, "reshape"),
    ("squeeze-tensor-not-one", [input_node("x"), input_node("a"), node("out", "squeeze", "x", "a")],
     {"x": np.zeros((2, 1)), "a": ints(0)}, "size 1"),
    ("split-tensor-sum", [input_node("x"), input_node("s"), node("out", "split", "x", "s", index=0)],
     {"x": np.zeros(5), "s": ints(1, 1)}, "add up"),
    ("cumsum-axis-tensor", [input_node("x"), input_node("a"), node("out", "cumsum", "x", "a")],
     {"x": np.zeros(2), "a": np.array(3)}, "out of range"),
    ("sum-axes-tensor", [input_node("x"), input_node("a"), node("out", "sum", "x", "a")],
     {"x": np.zeros(2), "a": ints(0, 0)}, "twice"),
]  # fmt: skip


@pytest.mark.parametrize("refused", REFUSED_AT_RUN_TIME, ids=lambda refused: refused[0])
def test_bad_run_time_values_are_refused_naming_the_node(refused: tuple[Any, ...]) -> None:
    _, nodes, feeds, words = refused
    with pytest.raises(InvalidArgument) as raised:
        Plan(build_graph(make_graph(nodes))).forward(feeds, {}, ["out"])
    assert "node 'out'" in str(raised.value)
    assert words in str(raised.value)
    assert raised.value.subject == "out"
    assert raised.value.reason == ("DTYPE_MISMATCH" if words == "int32 or int64" else "SHAPE_MISMATCH")
