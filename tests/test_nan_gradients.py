"""Every op's gradients at NaN and at +-inf equal torch.autograd's (issue 10).

Data-driven from the registry: every registered op with a float result takes part, with rows from
the op tables (`tests.test_gradients` and `tests/op_tables/`) and its PyTorch counterpart from
`TORCH` below (the elementwise family's live with its table). One element of one float argument at
a time becomes NaN, +inf or -inf, and every gradient of <cotangent, value> must equal PyTorch's,
NaN for NaN and infinity for infinity; the unchanged row is compared too, which checks the
counterpart itself. A new op joins by registering: the coverage test fails until it has a
counterpart here (or a reason in NO_TORCH_COUNTERPART).
"""

from __future__ import annotations

import importlib
import itertools
import math
import pkgutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tests.op_tables
from chainrule.server.graph import build_graph
from chainrule.server.ops import OPS
from chainrule.server.plan import Plan
from tests.gradcheck import OpCase, make_graph, run_op
from tests.op_tables import elementwise
from tests.op_tables.elementwise import one_torch_thread, torch_run  # noqa: F401 (an autouse fixture)
from tests.test_gradients import OP_CASES

Tensor = torch.Tensor


class Unsupported(Exception):
    """The counterpart cannot express this row's attrs; another row of the op is used."""


# ---------------------------------------------------------------- PyTorch counterparts of the other families
def _dims(x: Tensor, axes: Sequence[int] | None) -> tuple[int, ...]:
    if axes is not None and len(axes) == 0:
        raise Unsupported("torch reads empty dims as every dim")
    return tuple(range(x.ndim)) if axes is None else tuple(axes)


def _given(attr: Any, tensors: Sequence[Tensor], position: int) -> Any:
    """A shape-like attr, or the trailing tensor argument that overrides it."""
    index = position - 1
    return tensors[index].tolist() if len(tensors) > index else attr


def _reduction(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def reference(x: Tensor, *given: Tensor, axes: Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return function(x, _dims(x, _given(axes, given, 1)), keepdims)

    return reference


def _prod(x: Tensor, dims: tuple[int, ...], keepdim: bool) -> Tensor:
    """torch.prod takes one dim: move the reduced ones last and flatten them."""
    dims = tuple(sorted(d % max(x.ndim, 1) for d in dims)) if x.ndim else ()
    kept = [d for d in range(x.ndim) if d not in dims]
    moved = x.permute(*kept, *dims).reshape(*[x.shape[d] for d in kept], math.prod(x.shape[d] for d in dims))
    out = moved.prod(-1)
    return out.reshape([1 if d in dims else x.shape[d] for d in range(x.ndim)]) if keepdim else out


def _logsumexp(x: Tensor, dims: tuple[int, ...], keepdim: bool) -> Tensor:
    return torch.logsumexp(x.reshape(1), 0) if x.ndim == 0 else torch.logsumexp(x, dims, keepdim)


def _reshape(x: Tensor, *given: Tensor, shape: Any = None, allowzero: int = 1) -> Tensor:
    target = list(_given(shape, given, 1))
    if not allowzero:
        target = [x.shape[axis] if size == 0 else size for axis, size in enumerate(target)]
    return x.reshape(target)


def _slice(
    x: Tensor, *given: Tensor, starts: Any = None, ends: Any = None, axes: Any = None, steps: Any = None
) -> Tensor:
    starts, ends = _given(starts, given, 1), _given(ends, given, 2)
    axes, steps = _given(axes, given, 3), _given(steps, given, 4)
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index = np.arange(x.shape[axis])[slice(start, end, step)]  # ONNX's clamping is Python's
        x = torch.index_select(x, axis, torch.tensor(index.tolist(), dtype=torch.int64))
    return x


def _split(
    x: Tensor, *given: Tensor, axis: int = 0, splits: Any = None, num_outputs: Any = None, index: int = 0
) -> Tensor:
    splits = _given(splits, given, 1)
    if splits is None:
        splits = math.ceil(x.shape[axis] / num_outputs)
    return torch.split(x, splits, axis)[index]


def _gather(x: Tensor, indices: Tensor, axis: int = 0) -> Tensor:
    axis %= x.ndim
    flat = torch.remainder(indices.reshape(-1).long(), x.shape[axis])
    return torch.index_select(x, axis, flat).reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])


def _gather_elements(x: Tensor, indices: Tensor, axis: int = 0) -> Tensor:
    return torch.gather(x, axis, torch.remainder(indices.long(), x.shape[axis]))


def _squeeze(x: Tensor, *given: Tensor, axes: Any = None) -> Tensor:
    axes = _given(axes, given, 1)
    return x.squeeze() if axes is None else x.squeeze(tuple(axes))


def _unsqueeze(x: Tensor, *given: Tensor, axes: Any = None) -> Tensor:
    axes = _given(axes, given, 1)
    rank = x.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _expand(x: Tensor, *given: Tensor, shape: Any = None) -> Tensor:
    return torch.broadcast_to(x, np.broadcast_shapes(tuple(x.shape), tuple(_given(shape, given, 1))))


def _tile(x: Tensor, *given: Tensor, repeats: Any = None) -> Tensor:
    return x.repeat(*_given(repeats, given, 1))


def _flatten(x: Tensor, axis: int = 1) -> Tensor:
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _pad(x: Tensor, *given: Tensor, pads: Any = None, mode: str = "constant", value: float = 0.0) -> Tensor:
    pads = _given(pads, given, 1)
    begins, ends = pads[: x.ndim], pads[x.ndim :]
    if mode == "constant":
        torch_pads = [p for axis in reversed(range(x.ndim)) for p in (begins[axis], ends[axis])]
        if len(given) < 2:
            return F.pad(x, torch_pads, value=value)
        inside = F.pad(torch.ones_like(x.detach()), torch_pads) > 0.5
        return torch.where(inside, F.pad(x, torch_pads), given[1])  # a tensor value takes a gradient
    if any(p < 0 for p in pads):
        raise Unsupported("cropping with reflect, edge or wrap")
    numpy_mode = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode]
    for axis in range(x.ndim):
        index = np.pad(np.arange(x.shape[axis]), (begins[axis], ends[axis]), mode=numpy_mode)
        x = torch.index_select(x, axis, torch.tensor(index.tolist(), dtype=torch.int64))
    return x


def _cumsum(x: Tensor, *given: Tensor, axis: int = 0, exclusive: bool = False, reverse: bool = False) -> Tensor:
    axis = int(given[0]) if given else axis
    if reverse:
        x = x.flip(axis)
    out = torch.cumsum(x, axis)
    if exclusive:
        zeros = torch.zeros_like(out.narrow(axis, 0, 1))
        out = torch.cat([zeros, out.narrow(axis, 0, out.shape[axis] - 1)], axis)
    return out.flip(axis) if reverse else out


def _channels(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(1, -1, *[1] * (x.ndim - 2))


def _batch_norm(
    x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor, epsilon: float = 1e-5, momentum: float = 0.1
) -> Tensor:
    """Inference mode, written out: torch's batch_norm passes no gradient to the running statistics."""
    return (x - _channels(mean, x)) / torch.sqrt(_channels(var, x) + epsilon) * _channels(scale, x) + _channels(bias, x)


def _layer_norm(x: Tensor, *affine: Tensor, axis: int = -1, epsilon: float = 1e-5) -> Tensor:
    normalized = tuple(x.shape[axis % x.ndim :])
    if all(tuple(t.shape) == normalized for t in affine):
        return F.layer_norm(x, normalized, *affine, eps=epsilon)
    out = F.layer_norm(x, normalized, eps=epsilon)
    if affine:
        out = out * affine[0]
    return out + affine[1] if len(affine) > 1 else out


def _lrn(x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0) -> Tensor:
    if size % 2 == 0:
        raise Unsupported("ONNX and torch centre an even window differently")
    return F.local_response_norm(x, size, alpha, beta, bias)


def _softmax_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    classes = logits.shape[-1]
    rows = logits.reshape(-1, classes)
    if labels.dtype.is_floating_point:
        return F.cross_entropy(rows, labels.reshape(-1, classes))
    return F.cross_entropy(rows, labels.reshape(-1).long(), ignore_index=ignore_index)


def _spatial(x: Tensor, name: str) -> Callable[..., Tensor]:
    rank = x.ndim - 2
    if not 1 <= rank <= 3:
        raise Unsupported(f"{rank}-D {name}")
    return getattr(F, f"{name}{rank}d")  # type: ignore[no-any-return]


def _symmetric(x: Tensor, pads: Any, auto_pad: str) -> list[int]:
    rank = x.ndim - 2
    pads = [0] * 2 * rank if pads is None else list(pads)
    if auto_pad != "NOTSET" or pads[:rank] != pads[rank:]:
        raise Unsupported("asymmetric or automatic padding")
    return pads[:rank]


def _conv(
    x: Tensor,
    w: Tensor,
    *bias: Tensor,
    strides: Any = None,
    pads: Any = None,
    dilations: Any = None,
    group: int = 1,
    auto_pad: str = "NOTSET",
) -> Tensor:
    rank = x.ndim - 2
    pads = [0] * 2 * rank if pads is None else list(pads)
    kernel = w.shape[2:]
    strides = strides or [1] * rank
    dilations = dilations or [1] * rank
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 2 * rank
        for axis in range(rank):
            size = x.shape[2 + axis]
            total = max(
                (math.ceil(size / strides[axis]) - 1) * strides[axis] + (kernel[axis] - 1) * dilations[axis] + 1 - size,
                0,
            )
            small = total // 2
            pads[axis], pads[rank + axis] = (
                (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
            )
    elif auto_pad == "VALID":
        pads = [0] * 2 * rank
    padded = F.pad(x, [p for axis in reversed(range(rank)) for p in (pads[axis], pads[rank + axis])])
    return _spatial(x, "conv")(padded, w, bias[0] if bias else None, strides, 0, dilations, group)


def _conv_transpose(
    x: Tensor,
    w: Tensor,
    *bias: Tensor,
    strides: Any = None,
    pads: Any = None,
    dilations: Any = None,
    group: int = 1,
    auto_pad: str = "NOTSET",
    output_padding: Any = None,
    output_shape: Any = None,
) -> Tensor:
    if auto_pad != "NOTSET" or output_shape is not None:
        raise Unsupported("automatic padding or output_shape")
    rank = x.ndim - 2
    pads = [0] * 2 * rank if pads is None else list(pads)
    full = _spatial(x, "conv_transpose")(
        x, w, bias[0] if bias else None, strides or 1, 0, output_padding or 0, group, dilations or 1
    )
    for axis in range(rank):
        length = full.shape[2 + axis]
        full = full.narrow(2 + axis, pads[axis], length - pads[axis] - pads[rank + axis])
    return full


def _max_pool(
    x: Tensor,
    kernel_shape: Any,
    strides: Any = None,
    pads: Any = None,
    dilations: Any = None,
    ceil_mode: bool = False,
    auto_pad: str = "NOTSET",
    storage_order: int = 0,
) -> Tensor:
    padding = _symmetric(x, pads, auto_pad)
    return _spatial(x, "max_pool")(
        x, kernel_shape, strides or [1] * len(kernel_shape), padding, dilations or 1, ceil_mode
    )


def _average_pool(
    x: Tensor,
    kernel_shape: Any,
    strides: Any = None,
    pads: Any = None,
    dilations: Any = None,
    ceil_mode: bool = False,
    auto_pad: str = "NOTSET",
    count_include_pad: bool = False,
) -> Tensor:
    if dilations is not None and any(d != 1 for d in dilations):
        raise Unsupported("torch's average pooling has no dilations")
    padding = _symmetric(x, pads, auto_pad)
    return _spatial(x, "avg_pool")(
        x, kernel_shape, strides or [1] * len(kernel_shape), padding, ceil_mode, count_include_pad
    )


def _global_max_pool(x: Tensor) -> Tensor:
    """torch.onnx exports adaptive max pooling to size 1 as GlobalMaxPool."""
    return _spatial(x, "adaptive_max_pool")(x, 1)


TORCH: dict[str, Callable[..., Tensor]] = {
    **elementwise.TORCH,
    "matmul": torch.matmul,
    "sum": _reduction(torch.sum),
    "mean": _reduction(torch.mean),
    "max": _reduction(torch.amax),
    "reduce_min": _reduction(torch.amin),
    "logsumexp": _reduction(_logsumexp),
    "reduce_prod": _reduction(_prod),
    "reduce_l1": _reduction(lambda x, dims, keepdim: torch.linalg.vector_norm(x, 1, dims, keepdim)),
    "reduce_l2": _reduction(lambda x, dims, keepdim: torch.linalg.vector_norm(x, 2, dims, keepdim)),
    "reduce_sum_square": _reduction(lambda x, dims, keepdim: torch.sum(torch.square(x), dims, keepdim)),
    "reshape": _reshape,
    "transpose": lambda x, perm=None: x.permute(*(reversed(range(x.ndim)) if perm is None else perm)),
    "concat": lambda *xs, axis: torch.cat(xs, axis),
    "slice": _slice,
    "split": _split,
    "gather": _gather,
    "gather_elements": _gather_elements,
    "squeeze": _squeeze,
    "unsqueeze": _unsqueeze,
    "expand": _expand,
    "tile": _tile,
    "flatten": _flatten,
    "pad": _pad,
    "cumsum": _cumsum,
    "einsum": lambda *xs, equation: torch.einsum(equation.replace(" ", ""), *xs),
    "softmax": lambda x, axis=-1: torch.softmax(x, axis),
    "log_softmax": lambda x, axis=-1: torch.log_softmax(x, axis),
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "instance_norm": lambda x, scale, bias, epsilon=1e-5: F.instance_norm(x, weight=scale, bias=bias, eps=epsilon),
    "group_norm": lambda x, scale, bias, num_groups, epsilon=1e-5: F.group_norm(x, num_groups, scale, bias, epsilon),
    "lrn": _lrn,
    "dropout": lambda x, ratio=0.5: F.dropout(x, ratio, training=False),
    "softmax_cross_entropy": _softmax_cross_entropy,
    "sigmoid_cross_entropy": lambda x, t: F.binary_cross_entropy_with_logits(*torch.broadcast_tensors(x, t)),
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "max_pool": _max_pool,
    "average_pool": _average_pool,
    "global_average_pool": lambda x: x.mean(tuple(range(2, x.ndim)), keepdim=True),
    "global_max_pool": _global_max_pool,
}
NO_TORCH_COUNTERPART: dict[str, str] = {}
"""Ops PyTorch has nothing to compare with, and why."""


# ---------------------------------------------------------------- the rows
def _tables() -> list[Any]:
    return [
        importlib.import_module(f"tests.op_tables.{module.name}")
        for module in pkgutil.iter_modules(tests.op_tables.__path__)
    ]


TABLES = _tables()
NOT_DIFFERENTIABLE: set[str] = set().union(*(table.NOT_DIFFERENTIABLE for table in TABLES))
ALL_CASES: list[OpCase] = [*OP_CASES, *itertools.chain.from_iterable(table.CASES for table in TABLES)]
DIFFERENTIABLE_OPS = sorted(
    name for name, op in OPS.items() if not op.is_source and name not in NOT_DIFFERENTIABLE and name in TORCH
)
SPECIALS = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


def _accepted(case: OpCase) -> bool:
    try:
        torch_run(TORCH[case.op], case, None)
    except Unsupported:
        return False
    return True


def _rows_of(op: str) -> list[OpCase]:
    """Among the rows the counterpart takes: the first, middle and last whose float arguments all have
    elements (a reduction over some axes as well as over all), and the largest."""
    cases = [case for case in ALL_CASES if case.op == op and _accepted(case)]
    shaped = [case for case in cases if all(arg.ndim and arg.size for arg in case.args if arg.dtype.kind == "f")]
    chosen = [*shaped[:1], *shaped[len(shaped) // 2 :][:1], *shaped[-1:]]
    chosen += sorted(cases, key=lambda case: -sum(arg.size for arg in case.args))[:1]
    return list({case.id: case for case in chosen}.values())


def _with_special(case: OpCase, position: int, special: str) -> OpCase:
    args = [np.array(arg, copy=True) for arg in case.args]
    args[position].reshape(-1)[0] = SPECIALS[special]
    return OpCase(f"{case.id}:x{position}={special}", case.op, tuple(args), case.attrs)


def _rows() -> list[OpCase]:
    rows: list[OpCase] = []
    for op in DIFFERENTIABLE_OPS:
        for case in _rows_of(op):
            rows.append(case)
            floats = [i for i, arg in enumerate(case.args) if arg.dtype.kind == "f" and arg.size]
            rows += [_with_special(case, i, special) for i in floats for special in SPECIALS]
    return rows


ROWS = _rows()
DISAGREEMENTS: list[tuple[Callable[[OpCase], bool], str]] = []
"""Rows where another family's op still differs from PyTorch, and what its owner must change. They run and
must still fail (strict xfail), so a fix shows up as an unexpected pass that asks to delete the entry."""
KNOWN_DISAGREEMENTS = {row.id: why for row in ROWS for matches, why in DISAGREEMENTS if matches(row)}


def test_every_differentiable_op_has_a_torch_counterpart_and_rows() -> None:
    registered = {name for name, op in OPS.items() if not op.is_source}
    missing = registered - NOT_DIFFERENTIABLE - set(TORCH) - set(NO_TORCH_COUNTERPART)
    assert missing == set(), f"give these ops a PyTorch counterpart in TORCH: {sorted(missing)}"
    unrowed = [op for op in DIFFERENTIABLE_OPS if not _rows_of(op)]
    assert unrowed == [], f"no row of these ops is one their PyTorch counterpart can express: {unrowed}"


def _marks(row: OpCase) -> Any:
    reason = KNOWN_DISAGREEMENTS.get(row.id)
    return pytest.param(row, id=row.id, marks=pytest.mark.xfail(reason=reason, strict=True) if reason else ())


EXACT = set(elementwise.TORCH)
"""Ops whose every NaN and infinity must be PyTorch's own: their VJPs are PyTorch's backward formulas term for
term. Elsewhere a non-finite gradient only has to be non-finite where PyTorch's is: whether it comes out NaN or
inf depends on the order in which a fused backward kernel adds and multiplies (inf - inf against inf * 0
later), which is no convention anyone relies on."""


def assert_same_gradient(ours: np.ndarray, theirs: np.ndarray, exact: bool, message: str) -> None:
    if exact:
        np.testing.assert_allclose(ours, theirs, rtol=1e-7, atol=1e-12, equal_nan=True, err_msg=message)
        return
    finite = np.isfinite(theirs)
    np.testing.assert_array_equal(np.isfinite(ours), finite, err_msg=f"{message}: where the gradient is finite")
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-7, atol=1e-12, err_msg=message)


@pytest.mark.parametrize("row", [_marks(row) for row in ROWS])
def test_gradients_at_nan_and_infinities_match_torch(row: OpCase) -> None:
    [value] = Plan(build_graph(make_graph(row.nodes()))).forward(row.feeds(), {}, ["out"])
    cotangent = np.random.default_rng(0).standard_normal(np.shape(value))
    ours = run_op(row, cotangent)
    _, theirs = torch_run(TORCH[row.op], row, cotangent)
    for name, grad in theirs.items():
        assert_same_gradient(np.asarray(ours.grads[name]), grad, row.op in EXACT, f"{row.id}: d/d{name}")
