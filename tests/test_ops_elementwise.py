"""The elementwise, comparison and logic ops: gradients against finite differences and against PyTorch,
values against PyTorch, conventions at kinks and ties, dtypes, and the dtype errors clients see.

The rows come from `tests.op_tables.elementwise` (the ops issue 11 added) and, for the comparison with
PyTorch, also from `tests.test_gradients` (the older elementwise ops).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc
import numpy as np
import pytest

import chainrule.client as cr
from chainrule.server.errors import InvalidArgument
from chainrule.server.graph import build_graph
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
    run_op,
)
from tests.op_tables.elementwise import (  # noqa: F401 (one_torch_thread: an autouse fixture)
    CASES,
    COMPARISONS,
    FLOAT64,
    LOGIC,
    TORCH,
    one_torch_thread,
    torch_run,
)
from tests.server_process import ServerProcess
from tests.test_gradients import OP_CASES

RTOL, ATOL = 1e-7, 1e-12
"""Against PyTorch: the same formulas in float64, up to the last bits of erf and exp (and selu's constants,
which ONNX rounds to float32)."""


def _largest_case_per_op(cases: Sequence[OpCase]) -> list[OpCase]:
    largest: dict[str, OpCase] = {}
    for case in cases:
        size = sum(arg.size for arg in case.args)
        if case.op not in largest or size > sum(arg.size for arg in largest[case.op].args):
            largest[case.op] = case
    return list(largest.values())


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_gradient_matches_finite_differences(case: OpCase) -> None:
    check_op(case)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_gradient_with_released_intermediates(case: OpCase) -> None:
    """Operands and output computed, not fed, so a VJP reading a value its `reads` leave out gets a stand-in."""
    feeds = case.feeds()
    operands = [f"a{i}" for i in range(len(feeds))]
    nodes = [
        *declared_inputs(feeds),
        constant("zero", np.zeros(())),
        constant("false", np.zeros((), np.bool_)),
        *(
            node(
                operand,
                "logical_or" if value.dtype == np.bool_ else "add",
                name,
                "false" if value.dtype == np.bool_ else "zero",
            )
            for operand, (name, value) in zip(operands, feeds.items(), strict=True)
        ),
        node("out", case.op, *operands, **case.attrs),
        constant("weights", case.cotangent()),
        node("weighted", "mul", "out", "weights"),
        node("loss", "sum", "weighted"),
    ]
    check_grads(nodes, feeds, loss="loss", wrt=case.differentiable())


@pytest.mark.parametrize("case", _largest_case_per_op(CASES), ids=lambda case: case.id)
def test_float32_graph_gives_float32_gradients(case: OpCase) -> None:
    cotangent = case.cotangent()
    single = run_op(case, cotangent, dtype=np.float32)
    double = run_op(case, cotangent, dtype=np.float64)
    assert single.loss.dtype == (np.float64 if case.attrs.get("dtype") == "float64" else np.float32)
    for name in case.differentiable():
        grad = np.asarray(single.grads[name])
        assert grad.dtype == np.float32
        np.testing.assert_allclose(grad, double.grads[name], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- against PyTorch
def _torch_rows() -> list[OpCase]:
    older = [case for case in OP_CASES if case.op in TORCH]
    return [*CASES, *_largest_case_per_op(older)]


def assert_matches_torch(case: OpCase, loss_grad: Array | None = None, dtype: np.dtype = FLOAT64) -> None:
    """Our value and every gradient (of <loss_grad, value>; a random one by default) equal torch.autograd's."""
    [ours] = Plan(build_graph(make_graph(case.nodes(dtype)))).forward(case.feeds(dtype), {}, ["out"])
    ours = np.asarray(ours)
    differentiable = ours.dtype.kind == "f" and bool(case.differentiable())
    if differentiable and loss_grad is None:
        loss_grad = case.cotangent()
    value, grads = torch_run(TORCH[case.op], case, loss_grad if differentiable else None, dtype)
    assert ours.dtype == value.dtype
    np.testing.assert_allclose(ours, value, rtol=RTOL, atol=ATOL, err_msg="value")
    if differentiable:
        result = run_op(case, loss_grad, dtype=dtype)
        for name, grad in grads.items():
            np.testing.assert_allclose(result.grads[name], grad, rtol=RTOL, atol=ATOL, err_msg=f"d/d{name}")


@pytest.mark.parametrize("case", _torch_rows(), ids=lambda case: case.id)
def test_value_and_gradients_match_torch(case: OpCase) -> None:
    assert_matches_torch(case)


def exact(op: str, args: Sequence[object], label: str, **attrs: AttrLike | None) -> OpCase:
    """A case at chosen points; float lists become float64, bool lists stay bool."""
    return OpCase(f"{op}[{label}]", op, tuple(np.asarray(arg) for arg in args), attrs)


KINKS = [
    exact("relu", [[-1.0, 0.0, -0.0, 2.0]], "0"),
    exact("abs", [[-1.0, 0.0, -0.0, 2.0]], "0"),
    exact("leaky_relu", [[-1.0, 0.0, -0.0, 2.0]], "0", alpha=0.2),
    exact("elu", [[-1.0, 0.0, -0.0, 2.0]], "0", alpha=0.5),
    exact("selu", [[-1.0, 0.0, -0.0, 2.0]], "0"),
    exact("prelu", [[-1.0, 0.0, -0.0, 2.0], [0.25, -0.5, 0.75, 2.0]], "0"),
    exact("sign", [[-1.5, 0.0, -0.0, 2.0]], "0"),
    exact("hard_sigmoid", [[-3.0, -2.0, -1.0, 0.0, 2.0, 3.0]], "corners", alpha=0.25, beta=0.5),
    exact("hard_sigmoid", [[-2.5, 2.5, 0.0, -3.0]], "default-corners"),
    exact("round", [[-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.0]], "halves-to-even"),
    exact("floor", [[-2.5, -1.0, -0.5, 0.5, 1.0, 2.5]], "halves-and-integers"),
    exact("ceil", [[-2.5, -1.0, -0.5, 0.5, 1.0, 2.5]], "halves-and-integers"),
    exact("clip", [[-1.0, -0.5, 0.0, 0.5, 1.0]], "at-attr-bounds", min=-0.5, max=0.5),
    exact("clip", [[-1.0, -0.5, 0.0, 0.5, 1.0]], "min=max", min=0.5, max=0.5),
    exact("clip", [[-1.0, -0.5, 0.0, 0.5, 1.0]], "min>max", min=0.75, max=-0.25),
    exact(
        "clip",
        [[-1.0, -0.5, 0.0, 0.5, 1.0], [-0.5, -0.5, 0.0, 0.0, 1.0], [0.5, 0.5, 0.0, 0.5, -1.0]],
        "at-tensor-bounds",
    ),
    exact("clip", [[-1.0, -0.5, 0.0, 0.5], [[-0.5], [0.5]], 0.0], "tensor-min>max-broadcast"),
    exact("clip", [[-1.0, -0.5, 0.0, 0.5], [[-0.5], [0.5]]], "tensor-min-only-at-bound"),
    exact("maximum", [[1.0, 2.0, 3.0], [1.0, 0.0, 5.0]], "tie"),
    exact("minimum", [[[2.0], [3.0]], [2.0, 4.0]], "broadcast-tie"),
    exact("where", [[True, False, True], [1.0, 2.0, 3.0], [1.0, 5.0, 3.0]], "x=y"),
    exact("reciprocal", [[0.0, -0.0, 4.0]], "0"),
    exact("softsign", [[0.0, 1e8, -1e8]], "0-and-far"),
    exact("gelu", [[0.0, -40.0, 40.0]], "0-and-far"),
    exact("gelu", [[0.0, -40.0, 40.0]], "0-and-far,tanh", approximate="tanh"),
    exact("silu", [[0.0, -800.0, 800.0]], "0-and-far"),
    exact("erf", [[0.0, -30.0, 30.0]], "0-and-far"),
]


@pytest.mark.parametrize("case", KINKS, ids=lambda case: case.id)
def test_kinks_ties_and_extremes_follow_torch(case: OpCase) -> None:
    assert_matches_torch(case, np.asarray(np.random.default_rng(3).uniform(1.0, 2.0, case.output_shape())))


def test_hard_sigmoid_and_clip_at_their_corners_give_the_documented_gradients() -> None:
    """The conventions as the README states them, not only as torch computes them."""
    kinks = {case.id: case for case in KINKS}
    corners = run_op(kinks["hard_sigmoid[corners]"], np.ones(6))
    np.testing.assert_array_equal(corners.grads["x0"], [0.0, 0.0, 0.25, 0.25, 0.0, 0.0])
    bounds = run_op(kinks["clip[at-attr-bounds]"], np.ones(5))
    np.testing.assert_array_equal(bounds.grads["x0"], [0.0, 1.0, 1.0, 1.0, 0.0])
    upside_down = run_op(kinks["clip[min>max]"], np.ones(5))
    np.testing.assert_array_equal(upside_down.loss, [-0.25] * 5)
    np.testing.assert_array_equal(upside_down.grads["x0"], np.zeros(5))


def _comparison_cases() -> Iterator[OpCase]:
    nan, inf = np.nan, np.inf
    left = np.array([[1.0, nan, inf, -inf, 0.0, -0.0], [2.0, 3.0, nan, inf, 1.0, -1.0]])
    right = np.array([1.0, nan, inf, inf, -0.0, 0.0])
    for op in COMPARISONS:
        yield OpCase(f"{op}[nan,inf,broadcast]", op, (left, right))
        yield OpCase(f"{op}[int,float]", op, (np.array([1, 2, 3], np.int32), np.array([[2.0], [1.5]])))
        yield OpCase(f"{op}[bool,int]", op, (np.array([True, False]), np.array([[1], [0]], np.int64)))
    a = np.array([[True, False, True, False]])
    b = np.array([[True], [False]])
    for op in LOGIC:
        yield OpCase(f"{op}[broadcast]", op, (a, b) if op != "logical_not" else (a,))
    x = np.array([1.0, np.nan, np.inf, -np.inf, 0.0])
    yield OpCase("isnan[specials]", "isnan", (x,))
    for positive in (True, False):
        for negative in (True, False):
            yield OpCase(
                f"isinf[specials,{positive},{negative}]",
                "isinf",
                (x,),
                {"detect_positive": positive, "detect_negative": negative},
            )
    yield OpCase("isnan[int]", "isnan", (np.array([1, 2], np.int32),))
    yield OpCase("isinf[bool]", "isinf", (np.array([True]),))


@pytest.mark.parametrize("case", list(_comparison_cases()), ids=lambda case: case.id)
def test_comparisons_and_logic_match_torch(case: OpCase) -> None:
    assert_matches_torch(case)


def test_cast_gradient_casts_back_between_float_types() -> None:
    x = np.array([1.0 / 3.0, 2.5, -1e-30])
    case = OpCase("cast[float64->float32]", "cast", (x,), {"dtype": "float32"})
    result = run_op(case, np.array([0.1, 0.2, 0.3], np.float32))
    assert result.loss.dtype == np.float32 and result.grads["x0"].dtype == np.float64
    np.testing.assert_array_equal(result.grads["x0"], np.array([0.1, 0.2, 0.3], np.float32).astype(np.float64))
    assert_matches_torch(case, np.array([0.1, 0.2, 0.3]))
    assert_matches_torch(
        OpCase("cast[float32->float64]", "cast", (x,), {"dtype": "float64"}), None, np.dtype("float32")
    )


@pytest.mark.parametrize("target", ["int32", "int64", "bool"])
def test_cast_to_int_or_bool_passes_no_gradient(target: str) -> None:
    x = np.array([1.5, -2.5, 0.0, np.nan])
    nodes = [
        input_node("x", "float64", [4]),
        node("c", "cast", "x", dtype=target),
        node("back", "cast", "c", dtype="float64"),
        node("both", "add", "back", "x"),
        node("loss", "sum", "both"),
    ]
    plan = Plan(build_graph(make_graph(nodes)))
    [value] = plan.forward({"x": x}, {}, ["c"])
    if target == "bool":
        np.testing.assert_array_equal(value, [True, True, False, True])
    else:
        np.testing.assert_array_equal(value[:3], [1, -2, 0])
    _, stream = plan.backward({"x": x}, {}, "loss", ["x"])
    np.testing.assert_array_equal(dict(stream)["x"], np.ones(4))


# ---------------------------------------------------------------- dtypes
FLOAT_VALUED = [
    "erf",
    "sin",
    "cos",
    "reciprocal",
    "leaky_relu",
    "elu",
    "selu",
    "gelu",
    "silu",
    "softsign",
    "hard_sigmoid",
]
INTEGRAL = ["floor", "ceil", "round", "sign", "relu", "abs"]


def _forward(nodes: Sequence[object], feeds: dict[str, Array], fetch: str = "out") -> Array:
    graph = build_graph(make_graph(nodes))  # type: ignore[arg-type]
    [value] = Plan(graph).forward(feeds, {}, [fetch])
    assert graph.nodes[fetch]["type"].dtype == np.asarray(value).dtype, "the shape rule's dtype"
    return np.asarray(value)


@pytest.mark.parametrize("dtype", ["bool", "int32", "int64"])
def test_float_valued_ops_of_int_and_bool_compute_in_float64(dtype: str) -> None:
    fed = np.array([True, False, True]).astype(dtype)
    for op in FLOAT_VALUED:
        nodes = [input_node("x", dtype, [3]), node("out", op, "x")]
        value = _forward(nodes, {"x": fed})
        assert value.dtype == np.float64, op
        expected = _forward([input_node("x", "float64", [3]), node("out", op, "x")], {"x": fed.astype(np.float64)})
        np.testing.assert_array_equal(value, expected, err_msg=op)


@pytest.mark.parametrize("dtype", ["bool", "int32", "int64", "float32"])
def test_integral_ops_keep_their_dtype(dtype: str) -> None:
    fed = np.array([1, 0, 1]).astype(dtype)
    for op in INTEGRAL:
        value = _forward([input_node("x", dtype, [3]), node("out", op, "x")], {"x": fed})
        assert value.dtype == np.dtype(dtype), op
        np.testing.assert_array_equal(value, fed, err_msg=op)


@pytest.mark.parametrize(
    ("x", "bounds", "attrs", "dtype"),
    [
        (np.array([1, 5, -3], np.int32), [], {"min": 0.5, "max": 3.5}, np.float64),
        (np.array([1, 5, -3], np.int32), [], {}, np.int32),
        (np.array([1, 5, -3], np.int32), [np.array(0, np.int32), np.array(3, np.int64)], {}, np.int64),
        (np.array([1, 5, -3], np.float32), [], {"min": 0.5}, np.float32),
        (np.array([1, 5, -3], np.float32), [np.array([0.0, 1.0, 2.0])], {"max": 3.0}, np.float64),
    ],
)
def test_clip_promotes_as_torch_clamp(x: Array, bounds: list[Array], attrs: dict[str, float], dtype: type) -> None:
    feeds = {"x": x, **{f"b{i}": bound for i, bound in enumerate(bounds)}}
    nodes = [*declared_inputs(feeds), node("out", "clip", *feeds, **attrs)]
    value = _forward(nodes, feeds)
    assert value.dtype == dtype
    expected = np.clip(x, feeds.get("b0", attrs.get("min")), feeds.get("b1", attrs.get("max")))
    np.testing.assert_array_equal(value, expected)


def test_where_promotes_and_broadcasts_as_numpy() -> None:
    feeds = {"c": np.array([[True], [False]]), "x": np.array([1, 2, 3], np.int32), "y": np.array(0.5, np.float32)}
    value = _forward([*declared_inputs(feeds), node("out", "where", "c", "x", "y")], feeds)
    np.testing.assert_array_equal(value, np.where(feeds["c"], feeds["x"], feeds["y"]))
    assert value.dtype == np.float64


# ---------------------------------------------------------------- dtype errors name the node
DTYPE_ERRORS = [
    ("sub-of-bools", [input_node("a", "bool"), input_node("b", "bool"), node("difference", "sub", "a", "b")]),
    ("neg-of-bool", [input_node("a", "bool"), node("negated", "neg", "a")]),
    ("and-of-floats", [input_node("a", "float64"), input_node("b", "bool"), node("both", "logical_and", "b", "a")]),
    ("not-of-int", [input_node("a", "int32"), node("flipped", "logical_not", "a")]),
    ("where-float-condition", [*(input_node(n, "float64") for n in "abc"), node("picked", "where", "a", "b", "c")]),
    ("cast-to-float16", [input_node("a", "float64"), node("half", "cast", "a", dtype="float16")]),
]


@pytest.mark.parametrize(("label", "nodes"), DTYPE_ERRORS, ids=[label for label, _ in DTYPE_ERRORS])
def test_declared_dtypes_an_op_cannot_take_are_refused_when_the_graph_is_built(label: str, nodes: list) -> None:
    with pytest.raises(InvalidArgument) as raised:
        build_graph(make_graph(nodes))
    assert raised.value.reason == "DTYPE_MISMATCH"
    assert f"node '{nodes[-1].name}' ({nodes[-1].op})" in str(raised.value)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address) as client:
        yield client


def _refusal(call: object) -> cr.ChainruleError:
    with pytest.raises(cr.ChainruleError) as raised:
        call()  # type: ignore[operator]
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return raised.value


def test_server_refuses_a_graph_whose_declared_dtypes_an_op_cannot_take(client: cr.Client) -> None:
    g = cr.GraphBuilder("bools")
    (g.input("a", "bool") - g.input("b", "bool")).named("difference")
    error = _refusal(lambda: client.create_graph(g))
    assert error.reason == "DTYPE_MISMATCH"
    assert "node 'difference' (sub)" in error.message
    assert [violation.field for violation in error.violations] == ["difference"]


@pytest.mark.parametrize(
    ("op", "feeds", "culprit"),
    [
        ("sub", {"a": np.array([True]), "b": np.array([False])}, "sub"),
        ("neg", {"a": np.array([True, False])}, "neg"),
        ("pow", {"a": np.array([2, 3], np.int64), "b": np.array([1, -1], np.int64)}, "pow"),
        ("logical_or", {"a": np.array([1.0]), "b": np.array([True])}, "logical_or"),
    ],
)
def test_server_names_the_node_whose_fed_dtypes_it_cannot_take(
    client: cr.Client, op: str, feeds: dict[str, Array], culprit: str
) -> None:
    """Undeclared inputs: the dtypes are known only when fed, and the error still says DTYPE_MISMATCH."""
    g = cr.GraphBuilder(f"fed-{op}")
    g.op(op, *(g.input(name) for name in feeds), name=culprit)
    graph_id = client.create_graph(g).graph_id
    error = _refusal(lambda: client.forward(graph_id, feeds, [culprit]))
    assert error.reason == "DTYPE_MISMATCH", error.message
    assert f"node '{culprit}' ({op})" in error.message
    assert [violation.field for violation in error.violations] == [culprit]


def test_plan_without_a_request_limit_names_the_node_of_a_numpy_dtype_error() -> None:
    """Without --max-request-bytes no shape rule runs on fed types: numpy's own TypeError is mapped."""
    nodes = [input_node("a"), input_node("b"), node("difference", "sub", "a", "b")]
    with pytest.raises(InvalidArgument) as raised:
        Plan(build_graph(make_graph(nodes))).forward({"a": np.array([True]), "b": np.array([True])}, {}, ["difference"])
    assert raised.value.reason == "DTYPE_MISMATCH"
    assert "node 'difference' (sub)" in str(raised.value)
