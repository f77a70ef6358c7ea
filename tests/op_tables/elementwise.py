"""Gradient rows of the elementwise ops that issue 11 added (the older ones are tabled in `tests.test_gradients`),
comparisons and logic, `where` and `cast`; `tests.test_ops_elementwise` checks them.

Inputs keep away from kinks (0 for the relu family, the bounds of clip, the corners of hard_sigmoid, the
integers and half-integers of floor, ceil and round), where finite differences cannot agree with any one
convention; `tests.test_ops_elementwise` checks the conventions there against PyTorch.

`TORCH` gives each elementwise op, old and new, its PyTorch counterpart, called with torch tensors in the
order of the op's arguments and the op's attrs as keywords.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chainrule.server.ops.elementwise import SELU_ALPHA, SELU_GAMMA
from tests.gradcheck import Array, OpCase
from tests.test_gradients import M, N, Shape, draw, nonzero, op_case, real, shape_id


# ---------------------------------------------------------------- domains away from each op's kinks
def wide(rng: np.random.Generator, shape: Shape) -> Array:
    """Both the flat and the sloped parts of hard_sigmoid (corners at +-2.5)."""
    return rng.uniform(-4.0, 4.0, shape)


def between_integers(rng: np.random.Generator, shape: Shape) -> Array:
    """At least 0.1 from every integer and half-integer."""
    return rng.integers(-3, 3, shape) + rng.choice([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9], shape)


def odd_tenths(rng: np.random.Generator, shape: Shape) -> Array:
    """x for clip against tensor bounds: 0.1 + 0.2k is at least 0.05 from every bound below."""
    return 0.2 * rng.integers(-5, 5, shape) + 0.1


def low_bounds(rng: np.random.Generator, shape: Shape) -> Array:
    return 0.2 * rng.integers(-5, 2, shape) - 0.05


def high_bounds(rng: np.random.Generator, shape: Shape) -> Array:
    """0.1 off every low bound, so the two never tie (some rows have min > max on purpose)."""
    return 0.2 * rng.integers(-2, 5, shape) + 0.05


def away_from_half(rng: np.random.Generator, shape: Shape) -> Array:
    """clip's x for the attr bounds +-0.5 below: at least 0.1 from them."""
    return rng.choice([-1.0, 1.0], shape) * rng.choice([0.05, 0.2, 0.35, 0.65, 0.9, 1.5], shape)


UNARY_DOMAINS = {
    "erf": real,
    "sin": real,
    "cos": real,
    "reciprocal": nonzero,
    "floor": between_integers,
    "ceil": between_integers,
    "round": between_integers,
    "sign": nonzero,
    "leaky_relu": nonzero,
    "elu": nonzero,
    "selu": nonzero,
    "gelu": real,
    "silu": real,
    "softsign": real,
    "hard_sigmoid": wide,
}
UNARY_SHAPES: list[Shape] = [(), (N,), (M, N)]


def _condition(case_id: str, shape: Shape) -> Array:
    (draws,) = draw(case_id + "condition", [real], [shape])
    return draws > 0


def _where_case(shapes: tuple[Shape, Shape, Shape]) -> OpCase:
    case_id = f"where[{','.join(map(shape_id, shapes))}]"
    return OpCase(case_id, "where", (_condition(case_id, shapes[0]), *draw(case_id, [real, real], shapes[1:])))


CASES: list[OpCase] = [
    *(op_case(op, [domain], [shape]) for op, domain in UNARY_DOMAINS.items() for shape in UNARY_SHAPES),
    op_case("leaky_relu", [nonzero], [(M, N)], "3x4,alpha=0.3", alpha=0.3),
    op_case("elu", [nonzero], [(M, N)], "3x4,alpha=0.5", alpha=0.5),
    op_case("selu", [nonzero], [(M, N)], "3x4,alpha=2,gamma=1.5", alpha=2.0, gamma=1.5),
    op_case("gelu", [real], [(M, N)], "3x4,tanh", approximate="tanh"),
    op_case("gelu", [wide], [(M, N)], "3x4,wide,tanh", approximate="tanh"),
    op_case("hard_sigmoid", [wide], [(M, N)], "3x4,alpha=0.5,beta=0.25", alpha=0.5, beta=0.25),
    *(
        op_case("clip", [away_from_half], [(M, N)], label, **bounds)
        for label, bounds in [
            ("attrs", {"min": -0.5, "max": 0.5}),
            ("min-attr", {"min": -0.5}),
            ("max-attr", {"max": 0.5}),
            ("no-bounds", {}),
            ("min>max", {"min": 0.5, "max": -0.5}),
        ]
    ),
    *(
        op_case("clip", [odd_tenths, low_bounds, high_bounds][: len(shapes)], shapes)
        for shapes in [((M, N), (M, N), (M, N)), ((M, N), (N,), (M, 1)), ((N,), (M, 1), ()), ((M, 1), (M, N))]
    ),
    op_case("clip", [odd_tenths, low_bounds], [(M, N), (N,)], "3x4,4,max-attr", max=0.5),
    *(op_case("prelu", [nonzero, real], [x, slope]) for x in [(M, N), (2, M, N)] for slope in [(), (1,), (N,)]),
    op_case("prelu", [nonzero, real], [(2, M, 1, 1), (M, 1, 1)], "channels"),
    op_case("prelu", [nonzero, real], [(N,), (M, N)], "slope-broadcasts-x"),
    *(_where_case(shapes) for shapes in [((M, N), (M, N), (M, N)), ((M, N), (N,), ()), ((M, 1), (1, N), (M, N))]),
    _where_case(((N,), (M, 1), (M, N))),
    op_case("cast", [real], [(M, N)], "float64", dtype="float64"),
]

COMPARISONS = ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal")
LOGIC = ("logical_and", "logical_or", "logical_xor", "logical_not")
NOT_DIFFERENTIABLE = {"isnan", "isinf", *COMPARISONS, *LOGIC}


# ---------------------------------------------------------------- PyTorch's counterparts
Tensor = torch.Tensor


def _clip(x: Tensor, *bounds: Tensor, min: float | None = None, max: float | None = None) -> Tensor:
    low = bounds[0] if bounds else min
    high = bounds[1] if len(bounds) > 1 else max
    if low is None and high is None:
        return x.clone()
    if not bounds:
        return torch.clamp(x, low, high)
    given = [torch.tensor(b, dtype=x.dtype) if isinstance(b, float) else b for b in (low, high) if b is not None]
    x, *given = torch.broadcast_tensors(x, *given)  # clamp's backward fails when the bounds broadcast x
    if high is None:
        return torch.clamp(x, min=given[0])
    return torch.clamp(x, *given)


def _selu(x: Tensor, alpha: float = SELU_ALPHA, gamma: float = SELU_GAMMA) -> Tensor:
    """torch.selu has the constants in double precision; ONNX's (our defaults) are their float32 roundings."""
    if (alpha, gamma) == (SELU_ALPHA, SELU_GAMMA):
        return torch.selu(x)
    return gamma * F.elu(x, alpha)


def _hard_sigmoid(x: Tensor, alpha: float = 0.2, beta: float = 0.5) -> Tensor:
    """torch's hardsigmoid is relu6(u + 3) / 6; u = 6 (alpha x + beta) - 3 makes it ONNX's
    max(0, min(1, alpha x + beta)), with torch's strict kinks and gradient alpha between them."""
    return F.hardsigmoid(6.0 * (alpha * x + beta) - 3.0)


FLOAT64 = np.dtype(np.float64)
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int32": torch.int32, "int64": torch.int64}
TORCH_DTYPES["bool"] = torch.bool

TORCH: dict[str, Callable[..., Tensor]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "neg": torch.neg,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "abs": torch.abs,
    "square": torch.square,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "softplus": F.softplus,
    "log_sigmoid": F.logsigmoid,
    "erf": torch.erf,
    "sin": torch.sin,
    "cos": torch.cos,
    "reciprocal": torch.reciprocal,
    "floor": torch.floor,
    "ceil": torch.ceil,
    "round": torch.round,
    "sign": torch.sign,
    "clip": _clip,
    "leaky_relu": lambda x, alpha=0.01: F.leaky_relu(x, alpha),
    "elu": lambda x, alpha=1.0: F.elu(x, alpha),
    "selu": _selu,
    "gelu": lambda x, approximate="none": F.gelu(x, approximate=approximate),
    "silu": F.silu,
    "softsign": F.softsign,
    "hard_sigmoid": _hard_sigmoid,
    "prelu": lambda x, slope: torch._prelu_kernel(*torch.broadcast_tensors(x, slope)),
    "isnan": torch.isnan,
    "isinf": lambda x, detect_positive=True, detect_negative=True: (
        (torch.isposinf(x) & detect_positive) | (torch.isneginf(x) & detect_negative)
    ),
    "equal": torch.eq,
    "not_equal": torch.ne,
    "less": torch.lt,
    "less_equal": torch.le,
    "greater": torch.gt,
    "greater_equal": torch.ge,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
    "logical_not": torch.logical_not,
    "where": torch.where,
    "cast": lambda x, dtype: x.to(TORCH_DTYPES[dtype]),
}


def torch_run(
    reference: Callable[..., Tensor], case: OpCase, cotangent: Array | None, dtype: np.dtype = FLOAT64
) -> tuple[Array, dict[str, Array]]:
    """The case's value through its PyTorch counterpart and, given a cotangent, torch.autograd's gradient of
    <cotangent, value> for every float argument (zeros where autograd reaches none)."""
    tensors = {
        name: torch.tensor(value, requires_grad=value.dtype.kind == "f") for name, value in case.feeds(dtype).items()
    }
    attrs = {key: value for key, value in case.attrs.items() if value is not None}
    out = reference(*tensors.values(), **attrs)
    grads: dict[str, Array] = {}
    if cotangent is not None:
        differentiable = [tensor for tensor in tensors.values() if tensor.requires_grad]
        found = torch.autograd.grad(
            out, differentiable, torch.tensor(cotangent, dtype=out.dtype), allow_unused=True, materialize_grads=True
        )
        names = [name for name, tensor in tensors.items() if tensor.requires_grad]
        grads = {name: grad.numpy() for name, grad in zip(names, found, strict=True)}
    return out.detach().numpy(), grads


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """PyTorch on one thread while a module compares with it: on tiny tensors its thread pool only costs
    time (seven times as much on two busy cores); the setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
