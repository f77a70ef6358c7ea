"""Engine-level gradient tests: every VJP in the op registry, and the reverse pass that chains them.

The tables below are data; `tests.gradcheck` runs each row through the real graph message,
`build_graph` and `Plan.backward`, and compares with float64 central differences, so a new op
or a new broadcasting rule is covered by adding a row, not by writing a new test.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from chainrule.server.errors import Cancelled, InvalidArgument
from chainrule.server.graph import build_graph
from chainrule.server.plan import Plan, StopFlag
from chainrule.v1 import graph_pb2
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
    parameter,
    run_backward,
    run_op,
)

M, N = 3, 4
Shape = tuple[int, ...]
Domain = Callable[[np.random.Generator, Shape], Array]


# ---------------------------------------------------------------- input domains
# Finite differences need inputs away from kinks, ties and the edges of an op's domain.
def real(rng: np.random.Generator, shape: Shape) -> Array:
    return rng.standard_normal(shape)


def positive(rng: np.random.Generator, shape: Shape) -> Array:
    return rng.uniform(0.5, 2.0, shape)


def nonzero(rng: np.random.Generator, shape: Shape) -> Array:
    return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 2.0, shape)


def unit(rng: np.random.Generator, shape: Shape) -> Array:
    return rng.uniform(0.05, 0.95, shape)


def grid_low(rng: np.random.Generator, shape: Shape) -> Array:
    """With grid_high: the two never tie (they differ by at least 0.1), whatever broadcasting pairs up."""
    return 0.2 * rng.integers(-5, 5, shape) + 0.05


def grid_high(rng: np.random.Generator, shape: Shape) -> Array:
    return 0.2 * rng.integers(-5, 5, shape) + 0.15


def distinct(rng: np.random.Generator, shape: Shape) -> Array:
    """All elements at least 0.25 apart, so a max reduction has a unique winner."""
    return (0.25 * rng.permutation(int(np.prod(shape, dtype=np.int64))) - 2.0).reshape(shape)


def draw(case_id: str, domains: Sequence[Domain], shapes: Sequence[Shape]) -> tuple[Array, ...]:
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    return tuple(
        np.asarray(domain(rng, shape), dtype=np.float64) for domain, shape in zip(domains, shapes, strict=True)
    )


def shape_id(shape: Shape) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def op_case(
    op: str, domains: Sequence[Domain], shapes: Sequence[Shape], label: str = "", **attrs: AttrLike | None
) -> OpCase:
    case_id = f"{op}[{label or ','.join(map(shape_id, shapes))}]"
    return OpCase(case_id, op, draw(case_id, domains, shapes), attrs)


# ---------------------------------------------------------------- the op tables
UNARY_DOMAINS: dict[str, Domain] = {
    "neg": real,
    "exp": real,
    "log": positive,
    "sqrt": positive,
    "abs": nonzero,
    "square": real,
    "sigmoid": real,
    "tanh": real,
    "relu": nonzero,
    "softplus": real,
    "log_sigmoid": real,
}
UNARY_CASES = [op_case(op, [domain], [shape]) for op, domain in UNARY_DOMAINS.items() for shape in [(), (N,), (M, N)]]

BINARY_DOMAINS: dict[str, tuple[Domain, Domain]] = {
    "add": (real, real),
    "sub": (real, real),
    "mul": (real, real),
    "div": (real, nonzero),
    "pow": (positive, real),
    "maximum": (grid_low, grid_high),
    "minimum": (grid_low, grid_high),
}
BROADCAST_SHAPES: list[Shape] = [(), (N,), (M, N), (1, N), (M, 1)]
BINARY_CASES = [
    op_case(op, domains, [left, right])
    for op, domains in BINARY_DOMAINS.items()
    for left in BROADCAST_SHAPES
    for right in BROADCAST_SHAPES
]

MATMUL_SHAPES: dict[str, tuple[Shape, Shape]] = {
    "vector@vector": ((N,), (N,)),
    "vector@matrix": ((N,), (N, 2)),
    "matrix@vector": ((M, N), (N,)),
    "matrix@matrix": ((M, N), (N, 2)),
    "batched3d@matrix": ((2, M, N), (N, 2)),
    "matrix@batched3d": ((M, N), (2, N, 5)),
    "vector@batched3d": ((N,), (2, N, 5)),
    "batched3d@vector": ((2, M, N), (N,)),
    "broadcast-batched": ((2, 1, 3, 4), (5, 4, 2)),
}
MATMUL_CASES = [op_case("matmul", [real, real], shapes, label) for label, shapes in MATMUL_SHAPES.items()]

REDUCTION_AXES: list[list[int] | None] = [None, [1], [-1], [0, 2], [2, 0], [-1, -3], [-2, 2], [0, 1, 2]]
REDUCTION_CASES = [
    op_case(op, [distinct], [(2, M, N)], f"2x3x4,axes={axes},keepdims={keepdims}", axes=axes, keepdims=keepdims)
    for op in ("sum", "mean", "max", "logsumexp")
    for axes in REDUCTION_AXES
    for keepdims in (False, True)
] + [
    op_case(op, [distinct], [shape], f"{shape_id(shape)},defaults")
    for op in ("sum", "mean", "max", "logsumexp")
    for shape in [(), (5,)]
]

SHAPE_CASES = [
    *(
        op_case("reshape", [real], [source], f"{shape_id(source)}->{target}", shape=target)
        for source, target in [
            ((2, M, N), [-1]),
            ((2, M, N), [4, -1]),
            ((2, M, N), [-1, 2, 3]),
            ((2, M, N), [2, -1, 2]),
            ((2, M, N), [24, 1]),
            ((2, M, N), [3, 8]),
            ((), [1, -1]),
            ((N,), [2, 2]),
        ]
    ),
    *(
        op_case("transpose", [real], [source], f"{shape_id(source)},perm={perm}", perm=perm)
        for source, perm in [
            ((N,), None),
            ((M, N), None),
            ((2, M, N), None),
            ((2, M, N), [1, 0, 2]),
            ((2, M, N), [2, 0, 1]),
            ((2, M, N), [0, 2, 1]),
        ]
    ),
]

SOFTMAX_CASES = [
    op_case(op, [real], [shape], f"{shape_id(shape)},axis={axis}", axis=axis)
    for op in ("softmax", "log_softmax")
    for shape, axis in [((M, N), 0), ((M, N), -1), ((M, N), 1), ((M, N), -2), ((2, M, N), 1), ((5,), None)]
]

LOSS_CASES = [
    *(op_case("softmax_cross_entropy", [real, unit], [shape, shape]) for shape in [(5,), (M, 5), (2, M, N)]),
    *(
        op_case("sigmoid_cross_entropy", [real, unit], shapes)
        for shapes in [((), ()), ((N,), (N,)), ((M, N), (M, N)), ((M, N), (N,)), ((M, 1), (M, N))]
    ),
]

OP_CASES: list[OpCase] = [
    *UNARY_CASES,
    *BINARY_CASES,
    *MATMUL_CASES,
    *REDUCTION_CASES,
    *SHAPE_CASES,
    *SOFTMAX_CASES,
    *LOSS_CASES,
]


def _largest_case_per_op(cases: Sequence[OpCase]) -> list[OpCase]:
    largest: dict[str, OpCase] = {}
    for case in cases:
        size = sum(arg.size for arg in case.args)
        if case.op not in largest or size > sum(arg.size for arg in largest[case.op].args):
            largest[case.op] = case
    return list(largest.values())


FLOAT32_CASES = _largest_case_per_op(OP_CASES)


def test_every_broadcast_pairing_of_every_binary_op_is_tabled() -> None:
    pairings = {(case.op, case.args[0].shape, case.args[1].shape) for case in BINARY_CASES}
    assert len(pairings) == len(BINARY_DOMAINS) * len(BROADCAST_SHAPES) ** 2


@pytest.mark.parametrize("case", OP_CASES, ids=lambda case: case.id)
def test_op_gradient_matches_finite_differences(case: OpCase) -> None:
    check_op(case)


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=lambda case: case.id)
def test_float32_graph_gives_float32_gradients(case: OpCase) -> None:
    """A float32 graph must stay float32 end to end, with the float64 gradients' values to float32 precision."""
    cotangent = case.cotangent()
    single = run_op(case, cotangent, dtype=np.float32)
    double = run_op(case, cotangent, dtype=np.float64)
    for name, value in case.feeds().items():
        grad = np.asarray(single.grads[name])
        assert grad.dtype == np.float32
        assert grad.shape == value.shape
        np.testing.assert_allclose(grad, double.grads[name], rtol=1e-4, atol=1e-5)


def test_float32_parameters_and_intermediates_stay_float32() -> None:
    rng = np.random.default_rng(7)
    feeds = {"x": rng.standard_normal((5, 3)).astype(np.float32)}
    parameters = {"w": rng.standard_normal((3, 4)).astype(np.float32)}
    nodes = [
        *declared_inputs(feeds),
        parameter("w", parameters["w"]),
        constant("bias", np.full(4, 0.5, dtype=np.float32)),
        node("h", "matmul", "x", "w"),
        node("biased", "add", "h", "bias"),
        node("act", "softplus", "biased"),
        node("loss", "mean", "act"),
    ]
    result = run_backward(nodes, feeds, parameters, loss="loss", wrt=["x", "w", "h", "act"])
    assert result.loss.dtype == np.float32
    assert {name: (grad.dtype, grad.shape) for name, grad in result.grads.items()} == {
        "x": (np.float32, (5, 3)),
        "w": (np.float32, (3, 4)),
        "h": (np.float32, (5, 4)),
        "act": (np.float32, (5, 4)),
    }


# ---------------------------------------------------------------- graphs: sharing, fan-out, odd wrt
@dataclass(frozen=True)
class GraphCase:
    """A whole graph checked against finite differences and, where `expected` says, a closed form."""

    id: str
    nodes: list[graph_pb2.Node]
    feeds: dict[str, Array]
    loss: str
    wrt: list[str]
    parameters: dict[str, Array] = field(default_factory=dict)
    loss_grad: Array | None = None
    expected: Mapping[str, Array] = field(default_factory=dict)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _same_operand_cases() -> list[GraphCase]:
    """The same node as both arguments: both VJPs must reach it and be summed."""
    x = positive(_rng(1), (M, N))
    square = positive(_rng(2), (N, N))
    ct = real(_rng(3), (M, N))
    ct_square = real(_rng(4), (N, N))
    expected = {
        "mul": 2 * x * ct,
        "add": 2 * ct,
        "sub": np.zeros_like(x),
        "div": np.zeros_like(x),
        "maximum": ct,  # a tie with itself everywhere: 0.5 + 0.5
        "minimum": ct,
        "pow": ct * x**x * (np.log(x) + 1),
    }
    cases = [
        GraphCase(
            f"{op}(x,x)",
            [input_node("x", "float64", x.shape), node("out", op, "x", "x")],
            {"x": x},
            loss="out",
            wrt=["x"],
            loss_grad=ct,
            expected={"x": grad},
        )
        for op, grad in expected.items()
    ]
    cases.append(
        GraphCase(
            "matmul(A,A)",
            [input_node("a", "float64", square.shape), node("out", "matmul", "a", "a")],
            {"a": square},
            loss="out",
            wrt=["a"],
            loss_grad=ct_square,
            expected={"a": ct_square @ square.T + square.T @ ct_square},
        )
    )
    return cases


def _graph_cases() -> list[GraphCase]:
    x = real(_rng(10), (N,))
    diamond = GraphCase(
        "diamond",
        [
            input_node("x", "float64", (N,)),
            node("a", "exp", "x"),
            node("b", "tanh", "x"),
            node("c", "mul", "a", "b"),
            node("loss", "sum", "c"),
        ],
        {"x": x},
        loss="loss",
        wrt=["x", "a", "b", "c"],
        expected={
            "x": np.exp(x) * np.tanh(x) + np.exp(x) * (1 - np.tanh(x) ** 2),
            "a": np.tanh(x),
            "b": np.exp(x),
            "c": np.ones(N),
        },
    )

    x2 = real(_rng(11), (M, N))
    three_consumers = GraphCase(
        "three-consumers",
        [
            input_node("x", "float64", (M, N)),
            constant("w", real(_rng(12), (N,))),
            node("u", "sigmoid", "x"),
            node("v", "mul", "x", "w"),
            node("t", "softplus", "x"),
            node("s", "add", "u", "v"),
            node("p", "mul", "s", "t"),
            node("loss", "mean", "p"),
        ],
        {"x": x2},
        loss="loss",
        wrt=["x", "u", "v", "t", "s"],
    )

    column, row = real(_rng(13), (M, 1)), real(_rng(14), (N,))
    broadcast_fan_out = GraphCase(
        "fan-out-through-broadcasting",
        [
            input_node("x", "float64", (M, 1)),
            parameter("y", row),
            node("p", "add", "x", "y"),
            node("q", "mul", "x", "p"),
            node("loss", "logsumexp", "q"),
        ],
        {"x": column},
        parameters={"y": row},
        loss="loss",
        wrt=["x", "y", "p"],
    )

    inputs, labels = real(_rng(15), (5, M)), np.eye(N)[[0, 3, 1, 1, 2]]
    weights, bias = real(_rng(16), (M, N)), real(_rng(17), (N,))
    linear_classifier = GraphCase(
        "linear-classifier",
        [
            input_node("x", "float64", (5, M)),
            input_node("labels", "float64", (5, N)),
            parameter("w", weights),
            parameter("b", bias),
            node("h", "matmul", "x", "w"),
            node("logits", "add", "h", "b"),
            node("loss", "softmax_cross_entropy", "logits", "labels"),
        ],
        {"x": inputs, "labels": labels},
        parameters={"w": weights, "b": bias},
        loss="loss",
        wrt=["x", "w", "b", "logits", "labels"],
    )

    x3 = real(_rng(18), (N,))
    loss_is_wrt = GraphCase(
        "wrt-includes-the-loss",
        [input_node("x", "float64", (N,)), node("e", "exp", "x"), node("loss", "sum", "e")],
        {"x": x3},
        loss="loss",
        wrt=["loss", "x"],
        expected={"loss": np.array(1.0), "x": np.exp(x3)},
    )
    scaled_scalar_loss = GraphCase(
        "loss_grad-on-a-scalar-loss",
        [input_node("x", "float64", (N,)), node("e", "exp", "x"), node("loss", "sum", "e")],
        {"x": x3},
        loss="loss",
        wrt=["loss", "x"],
        loss_grad=np.array(2.5),
        expected={"loss": np.array(2.5), "x": 2.5 * np.exp(x3)},
    )

    x4, w4, ct4 = real(_rng(19), (M, N)), real(_rng(20), (N,)), real(_rng(21), (M, N))
    non_scalar_loss = GraphCase(
        "loss_grad-on-a-non-scalar-loss",
        [input_node("x", "float64", (M, N)), parameter("w", w4), node("y", "mul", "x", "w")],
        {"x": x4},
        parameters={"w": w4},
        loss="y",
        wrt=["x", "w", "y"],
        loss_grad=ct4,
        expected={"x": ct4 * w4, "w": np.sum(ct4 * x4, axis=0), "y": ct4},
    )

    x5, unused = real(_rng(22), (N,)), real(_rng(23), (2, M))
    unused_nodes = GraphCase(
        "unused-inputs-and-nodes",
        [
            input_node("x", "float64", (N,)),
            input_node("u", "float64", (2, M)),
            parameter("p", np.ones((M,))),
            node("d", "exp", "u"),
            node("sq", "square", "x"),
            node("loss", "sum", "sq"),
        ],
        {"x": x5, "u": unused},
        parameters={"p": np.ones((M,))},
        loss="loss",
        wrt=["x", "u", "p", "d"],
        expected={"x": 2 * x5, "u": np.zeros((2, M)), "p": np.zeros((M,)), "d": np.zeros((2, M))},
    )
    return [
        diamond,
        three_consumers,
        broadcast_fan_out,
        linear_classifier,
        loss_is_wrt,
        scaled_scalar_loss,
        non_scalar_loss,
        unused_nodes,
        *_same_operand_cases(),
    ]


GRAPH_CASES = _graph_cases()


@pytest.mark.parametrize("case", GRAPH_CASES, ids=lambda case: case.id)
def test_graph_gradient_matches_finite_differences(case: GraphCase) -> None:
    result = check_grads(
        case.nodes, case.feeds, case.parameters, loss=case.loss, wrt=case.wrt, loss_grad=case.loss_grad
    )
    for name, expected in case.expected.items():
        np.testing.assert_allclose(result.grads[name], expected, rtol=1e-12, atol=1e-12, err_msg=name)


def test_unused_wrt_gets_exact_zeros_of_its_shape() -> None:
    """A node the loss does not depend on has gradient zero, not a missing entry or a scalar."""
    [case] = [case for case in GRAPH_CASES if case.id == "unused-inputs-and-nodes"]
    result = run_backward(case.nodes, case.feeds, case.parameters, loss=case.loss, wrt=case.wrt)
    for name in ("u", "p", "d"):
        grad = np.asarray(result.grads[name])
        assert grad.shape == case.expected[name].shape
        assert not grad.any()


def test_saving_op_off_the_gradient_path_gives_its_plain_value() -> None:
    """softmax_cross_entropy keeps its log-softmax only for passes that call its VJPs; fetched,
    or named in wrt while the loss does not use it, it yields its scalar value and a zero gradient."""
    logits, labels = real(_rng(30), (M, N)), np.eye(N)[np.arange(M) % N]
    feeds = {"x": logits, "labels": labels}
    nodes = [
        input_node("x", "float64", (M, N)),
        input_node("labels", "float64", (M, N)),
        node("ce", "softmax_cross_entropy", "x", "labels"),
        node("loss", "sum", "x"),
    ]
    plan = Plan(build_graph(make_graph(nodes)))
    shifted = logits - logits.max(axis=1, keepdims=True)
    expected = -np.sum(labels * (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))) / M

    [ce] = plan.forward(feeds, {}, ["ce"])
    assert np.shape(ce) == ()
    np.testing.assert_allclose(ce, expected, rtol=1e-12)

    _, reverse = plan.backward(feeds, {}, "loss", ["ce", "x"])
    grads = dict(reverse)
    assert np.shape(grads["ce"]) == () and grads["ce"] == 0.0
    np.testing.assert_array_equal(grads["x"], np.ones((M, N)))


def test_non_scalar_loss_needs_loss_grad() -> None:
    nodes = [input_node("x", "float64", (N,)), node("y", "exp", "x")]
    plan = Plan(build_graph(make_graph(nodes)))
    with pytest.raises(InvalidArgument) as raised:
        plan.backward({"x": np.zeros(N)}, {}, "y", ["x"])
    assert raised.value.reason == "SHAPE_MISMATCH"


# ---------------------------------------------------------------- kinks: PyTorch's conventions
@dataclass(frozen=True)
class ExactCase:
    """An op at a point where the answer is known exactly: a kink, a tie, or an extreme input."""

    case: OpCase
    loss_grad: Array
    grads: tuple[Array, ...]
    value: Array | None = None


def exact(
    op: str,
    args: Sequence[object],
    loss_grad: object,
    grads: Sequence[object],
    label: str,
    value: object = None,
    **attrs: AttrLike | None,
) -> ExactCase:
    case = OpCase(
        f"{op}[{label}]",
        op,
        tuple(np.asarray(arg, dtype=np.float64) for arg in args),
        attrs,
    )
    return ExactCase(
        case,
        np.asarray(loss_grad, dtype=np.float64),
        tuple(np.asarray(grad, dtype=np.float64) for grad in grads),
        None if value is None else np.asarray(value, dtype=np.float64),
    )


KINK_CASES = [
    exact("relu", [[-1.0, 0.0, 2.0]], [3.0, 5.0, 7.0], [[0.0, 0.0, 7.0]], "relu'(0)=0"),
    exact("abs", [[-1.0, 0.0, 2.0]], [3.0, 5.0, 7.0], [[-3.0, 0.0, 7.0]], "abs'(0)=0"),
    exact("maximum", [[1.0, 2.0, 3.0], [1.0, 0.0, 5.0]], [2.0, 4.0, 6.0], [[1.0, 4.0, 0.0], [1.0, 0.0, 6.0]], "tie"),
    exact("minimum", [[1.0, 2.0, 3.0], [1.0, 0.0, 5.0]], [2.0, 4.0, 6.0], [[1.0, 0.0, 6.0], [1.0, 4.0, 0.0]], "tie"),
    exact("maximum", [2.0, [2.0, 2.0, 1.0]], [1.0, 1.0, 1.0], [2.0, [0.5, 0.5, 0.0]], "broadcast-tie"),
    exact("minimum", [[[2.0], [3.0]], [2.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]], [[[2.5], [4.0]], [3.5, 0.0]],
          "broadcast-tie"),
    exact("max", [[[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]], [1.0, 3.0], [[[0.0, 0.5, 0.5], [1.0, 1.0, 1.0]]],
          "ties,axes=[1]", axes=[1]),
    exact("max", [[[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]], [[1.0], [3.0]], [[[0.0, 0.5, 0.5], [1.0, 1.0, 1.0]]],
          "ties,axes=[-1],keepdims", axes=[-1], keepdims=True),
    exact("max", [[[3.0, 1.0], [3.0, 3.0]]], 1.0, [[[1 / 3, 0.0], [1 / 3, 1 / 3]]], "ties,all-axes"),
    exact("max", [[[1.0, 2.0], [1.0, 0.0]]], [2.0, 5.0], [[[1.0, 5.0], [1.0, 0.0]]], "ties,axes=[0]", axes=[0]),
]  # fmt: skip


def _run_exact(row: ExactCase) -> None:
    result = run_op(row.case, row.loss_grad)
    if row.value is not None:
        assert np.all(np.isfinite(result.loss))
        np.testing.assert_allclose(result.loss, row.value, rtol=1e-12, atol=1e-12)
    for i, expected in enumerate(row.grads):
        grad = np.asarray(result.grads[f"x{i}"])
        assert np.all(np.isfinite(grad)), f"x{i}: {grad}"
        np.testing.assert_allclose(grad, expected, rtol=1e-12, atol=1e-12, err_msg=f"x{i}")


@pytest.mark.parametrize("row", KINK_CASES, ids=lambda row: row.case.id)
def test_kinks_and_ties_follow_pytorch(row: ExactCase) -> None:
    _run_exact(row)


# ---------------------------------------------------------------- numerical stability at +-1000
BIG = 1000.0
LOG2 = float(np.log(2.0))
STABLE_CASES = [
    exact("sigmoid", [[BIG, -BIG, 0.0]], [1.0, 1.0, 1.0], [[0.0, 0.0, 0.25]], "+-1000", value=[1.0, 0.0, 0.5]),
    exact("softplus", [[BIG, -BIG]], [1.0, 1.0], [[1.0, 0.0]], "+-1000", value=[BIG, 0.0]),
    exact("log_sigmoid", [[BIG, -BIG]], [1.0, 1.0], [[0.0, 1.0]], "+-1000", value=[0.0, -BIG]),
    exact("logsumexp", [[BIG, -BIG]], 1.0, [[1.0, 0.0]], "1000,-1000", value=BIG),
    exact("logsumexp", [[BIG, BIG]], 1.0, [[0.5, 0.5]], "1000,1000", value=BIG + LOG2),
    exact("logsumexp", [[-BIG, -BIG]], 1.0, [[0.5, 0.5]], "-1000,-1000", value=-BIG + LOG2),
    exact("logsumexp", [[[BIG, -BIG], [-BIG, -BIG]]], [1.0, 2.0], [[[1.0, 0.0], [1.0, 1.0]]], "rows",
          value=[BIG, -BIG + LOG2], axes=[1]),
    exact("softmax", [[BIG, -BIG]], [1.0, 0.0], [[0.0, 0.0]], "+-1000", value=[1.0, 0.0]),
    exact("log_softmax", [[BIG, -BIG]], [1.0, 1.0], [[-1.0, 1.0]], "+-1000", value=[0.0, -2 * BIG]),
    exact("log_softmax", [[[BIG], [-BIG]]], [[1.0], [1.0]], [[[-1.0], [1.0]]], "+-1000,axis=0",
          value=[[0.0], [-2 * BIG]], axis=0),
    exact("softmax_cross_entropy", [[BIG, -BIG], [0.0, 1.0]], 1.0, [[1.0, -1.0], [0.0, 2 * BIG]], "+-1000",
          value=2 * BIG),
    exact("softmax_cross_entropy", [[[BIG, -BIG], [-BIG, BIG]], [[1.0, 0.0], [1.0, 0.0]]], 1.0,
          [[[0.0, 0.0], [-0.5, 0.5]], [[0.0, BIG], [BIG, 0.0]]], "rows", value=BIG),
    exact("sigmoid_cross_entropy", [BIG, 0.0], 1.0, [1.0, -BIG], "logit=1000,target=0", value=BIG),
    exact("sigmoid_cross_entropy", [-BIG, 1.0], 1.0, [-1.0, BIG], "logit=-1000,target=1", value=BIG),
    exact("sigmoid_cross_entropy", [[BIG, -BIG], [1.0, 0.0]], 1.0, [[0.0, 0.0], [-BIG / 2, BIG / 2]],
          "confident-and-right", value=0.0),
]  # fmt: skip


def test_every_op_prone_to_overflow_has_a_stability_row() -> None:
    assert {row.case.op for row in STABLE_CASES} >= {
        "sigmoid", "softplus", "log_sigmoid", "logsumexp", "log_softmax", "softmax_cross_entropy",
        "sigmoid_cross_entropy",
    }  # fmt: skip


@pytest.mark.parametrize("row", STABLE_CASES, ids=lambda row: row.case.id)
def test_extreme_inputs_give_finite_exact_values_and_gradients(row: ExactCase) -> None:
    _run_exact(row)


# ---------------------------------------------------------------- the reverse pass itself
def test_hundred_thousand_node_chain_has_no_recursion_limit() -> None:
    """A deep network is a long chain; any recursive walk (ours or networkx's) would overflow the stack."""
    pairs = 50_000
    shift, scale = 0.5, 1.0 + 1e-5
    nodes = [input_node("x", "float64", ()), constant("shift", shift), constant("scale", scale)]
    previous = "x"
    for i in range(pairs):
        nodes.append(node(f"shifted{i}", "add", previous, "shift"))
        nodes.append(node(f"scaled{i}", "mul", f"shifted{i}", "scale"))
        previous = f"scaled{i}"
    x = np.array(0.25)
    result = run_backward(nodes, {"x": x}, loss=previous, wrt=["x", "shifted0"], check_types=False)
    # h <- (h + shift) * scale, `pairs` times: h = x s^n + shift * s (s^n - 1) / (s - 1).
    growth = scale**pairs
    assert result.streamed == ["shifted0", "x"]
    np.testing.assert_allclose(result.loss, x * growth + shift * scale * (growth - 1) / (scale - 1), rtol=1e-9)
    np.testing.assert_allclose(result.grads["x"], growth, rtol=1e-9)
    np.testing.assert_allclose(result.grads["shifted0"], growth, rtol=1e-9)


def _streaming_graph() -> tuple[list[graph_pb2.Node], dict[str, Array], dict[str, Array]]:
    feeds = {"x": real(_rng(30), (N,))}
    parameters = {"w": real(_rng(31), (N,))}
    nodes = [
        *declared_inputs(feeds),
        parameter("w", parameters["w"]),
        node("h", "mul", "x", "w"),
        node("e", "exp", "h"),
        node("t", "tanh", "h"),
        node("s", "add", "e", "t"),
        node("loss", "sum", "s"),
    ]
    return nodes, feeds, parameters


def test_gradients_stream_in_reverse_topological_order() -> None:
    nodes, feeds, parameters = _streaming_graph()
    wrt = ["x", "loss", "e", "w", "h", "t", "s"]
    graph = build_graph(make_graph(nodes))
    loss_value, stream = Plan(graph).backward(feeds, parameters, "loss", wrt)
    streamed = [name for name, _ in stream]
    order = graph.graph["order"]
    assert streamed == [name for name in reversed(order) if name in wrt]
    assert streamed[0] == "loss"
    assert streamed.index("h") > max(streamed.index("e"), streamed.index("t"))


def test_loss_value_comes_before_any_reverse_work() -> None:
    """The loss is known after the forward pass; the reverse pass runs only as the stream is read."""
    nodes, feeds, parameters = _streaming_graph()
    stop = StopFlag()
    loss_value, stream = Plan(build_graph(make_graph(nodes))).backward(feeds, parameters, "loss", ["x", "w"], stop=stop)
    h = feeds["x"] * parameters["w"]
    np.testing.assert_allclose(loss_value, np.sum(np.exp(h) + np.tanh(h)), rtol=1e-12)
    assert iter(stream) is stream
    stop.stopped = True
    with pytest.raises(Cancelled):
        next(stream)


def test_streamed_gradients_are_never_modified_afterwards() -> None:
    """A fan-out sums contributions; doing it in place would corrupt a gradient the client already holds.

    q = x + r passes its incoming gradient through unchanged to both x and r, so the array
    streamed for q is the very object that first lands in x's and r's slots; r = exp(x) then
    adds a second contribution to x.
    """
    x = real(_rng(40), (N,))
    weights, cotangent = real(_rng(41), (N,)), real(_rng(42), (N,))
    nodes = [
        input_node("x", "float64", (N,)),
        constant("w", weights),
        node("r", "exp", "x"),
        node("q", "add", "x", "r"),
        node("m", "mul", "q", "w"),
    ]
    feeds = {"x": x.copy()}
    loss_grad = cotangent.copy()
    _, stream = Plan(build_graph(make_graph(nodes))).backward(feeds, {}, "m", ["q", "r", "x"], loss_grad)
    held: dict[str, Array] = {}
    copies: dict[str, Array] = {}
    for name, grad in stream:
        held[name], copies[name] = grad, np.array(grad, copy=True)
    for name in held:
        np.testing.assert_array_equal(held[name], copies[name], err_msg=name)
    np.testing.assert_array_equal(loss_grad, cotangent)
    np.testing.assert_array_equal(feeds["x"], x)
    np.testing.assert_allclose(held["x"], cotangent * weights * (1 + np.exp(x)), rtol=1e-12)


# ---------------------------------------------------------------- the seed lecture, at the engine level
def test_lecture_example_sum_times_product() -> None:
    """f = (x + y) z at x=-2, y=5, z=-4, the circuit the lecture works by hand."""
    scalars = {"x": np.array(-2.0), "y": np.array(5.0), "z": np.array(-4.0)}
    nodes = [*declared_inputs(scalars), node("q", "add", "x", "y"), node("f", "mul", "q", "z")]
    result = check_grads(nodes, scalars, loss="f", wrt=["x", "y", "z", "q"])
    assert result.loss == -12.0
    assert {name: float(grad) for name, grad in result.grads.items()} == {"x": -4.0, "y": -4.0, "z": 3.0, "q": -4.0}


def test_lecture_two_layer_sigmoid_network() -> None:
    """The lecture's hand-derived backprop for a 2-layer sigmoid net, against what the engine streams.

    J = y* log y + (1 - y*) log(1 - y) is built from log, sub, mul and add, as a client would.
    """
    rng = _rng(50)
    inputs, hidden = 3, 4
    x = rng.standard_normal(inputs)
    alpha = rng.standard_normal((hidden, inputs))
    beta = rng.standard_normal(hidden)
    target = np.array(0.7)
    feeds = {"x": x, "y_star": target}
    parameters = {"alpha": alpha, "beta": beta}
    nodes = [
        *declared_inputs(feeds),
        parameter("alpha", alpha),
        parameter("beta", beta),
        constant("one", 1.0),
        node("a", "matmul", "alpha", "x"),
        node("z", "sigmoid", "a"),
        node("b", "matmul", "beta", "z"),
        node("y", "sigmoid", "b"),
        node("log_y", "log", "y"),
        node("one_minus_y", "sub", "one", "y"),
        node("log_one_minus_y", "log", "one_minus_y"),
        node("one_minus_y_star", "sub", "one", "y_star"),
        node("hit", "mul", "y_star", "log_y"),
        node("miss", "mul", "one_minus_y_star", "log_one_minus_y"),
        node("J", "add", "hit", "miss"),
    ]
    wrt = ["x", "alpha", "beta", "a", "z", "b", "y"]
    result = check_grads(nodes, feeds, parameters, loss="J", wrt=wrt)

    def sigmoid(v: Array) -> Array:
        return 1 / (1 + np.exp(-v))

    a = alpha @ x
    z = sigmoid(a)
    b = beta @ z
    y = sigmoid(b)
    dJ_dy = target / y + (1 - target) / (y - 1)
    dJ_db = dJ_dy * y * (1 - y)
    dJ_dbeta = dJ_db * z
    dJ_dz = dJ_db * beta
    dJ_da = dJ_dz * z * (1 - z)
    dJ_dalpha = np.outer(dJ_da, x)
    # The lecture's last line writes dJ/dx_i = dJ/da_j alpha_ji, dropping the sum over j:
    # x_i feeds every hidden unit, so its gradient sums all of their contributions.
    dJ_dx = np.sum(dJ_da[:, np.newaxis] * alpha, axis=0)
    expected = {"x": dJ_dx, "alpha": dJ_dalpha, "beta": dJ_dbeta, "a": dJ_da, "z": dJ_dz, "b": dJ_db, "y": dJ_dy}

    np.testing.assert_allclose(result.loss, target * np.log(y) + (1 - target) * np.log(1 - y), rtol=1e-12)
    for name, grad in expected.items():
        np.testing.assert_allclose(result.grads[name], grad, rtol=1e-10, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("case", OP_CASES, ids=lambda case: case.id)
def test_op_gradient_with_released_intermediates(case: OpCase) -> None:
    """Each operand and the output computed, not fed, so the plan releases whatever the op's
    declared `reads` leave out; a VJP that reads a released value then gives a wrong gradient."""
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


@pytest.mark.parametrize("op", ["exp", "log", "sqrt", "tanh", "sigmoid", "softplus", "log_sigmoid"])
def test_float_valued_ops_take_bool_and_int_inputs_as_float64(op: str) -> None:
    """The shape rules promise float64 for these ops of bool and int arguments; the values agree."""
    for fed in (np.array([True, False]), np.array([1, 2], dtype=np.int32)):
        nodes = [input_node("x"), node("out", op, "x")]
        [value] = Plan(build_graph(make_graph(nodes))).forward({"x": fed}, {}, ["out"])
        [expected] = Plan(build_graph(make_graph(nodes))).forward({"x": fed.astype(np.float64)}, {}, ["out"])
        assert value.dtype == np.float64
        np.testing.assert_array_equal(value, expected)
