"""The builder's reach into the elementwise, comparison and logic ops: functions, operators and methods,
the messages they produce, and one graph of them evaluated by a real server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

import chainrule.client as cr
from chainrule import tensors
from chainrule.server.graph import build_graph
from chainrule.v1 import graph_pb2
from tests.server_process import ServerProcess


def nodes_by_name(graph: graph_pb2.Graph) -> dict[str, graph_pb2.Node]:
    return {node.name: node for node in graph.nodes}


def built(g: cr.GraphBuilder, name: str) -> tuple[graph_pb2.Node, dict[str, graph_pb2.Node]]:
    """The node called `name` and all nodes, after the server's own validator accepted the graph."""
    message = g.to_proto()
    build_graph(message)
    nodes = nodes_by_name(message)
    return nodes[name], nodes


def attrs_of(node: graph_pb2.Node) -> dict[str, object]:
    return {key: getattr(value, value.WhichOneof("value")) for key, value in node.attrs.items()}


UNARY = ["erf", "sin", "cos", "reciprocal", "floor", "ceil", "round", "sign", "silu", "softsign", "isnan"]


@pytest.mark.parametrize("op", UNARY)
def test_unary_functions_create_their_op(op: str) -> None:
    g = cr.GraphBuilder()
    getattr(cr, op)(g.input("x", "float32", [2]), name="out")
    out, _ = built(g, "out")
    assert out.op == op and list(out.inputs) == ["x"] and not out.attrs


@pytest.mark.parametrize(
    ("call", "op", "attrs"),
    [
        (lambda x: cr.leaky_relu(x), "leaky_relu", {}),
        (lambda x: cr.leaky_relu(x, 1), "leaky_relu", {"alpha": 1.0}),
        (lambda x: cr.elu(x, alpha=2), "elu", {"alpha": 2.0}),
        (lambda x: cr.selu(x), "selu", {}),
        (lambda x: cr.selu(x, 1.5, 2), "selu", {"alpha": 1.5, "gamma": 2.0}),
        (lambda x: cr.gelu(x), "gelu", {"approximate": "none"}),
        (lambda x: cr.gelu(x, approximate="tanh"), "gelu", {"approximate": "tanh"}),
        (lambda x: cr.hard_sigmoid(x, 1 / 6), "hard_sigmoid", {"alpha": 1 / 6}),
        (lambda x: cr.isinf(x, detect_negative=False), "isinf", {"detect_positive": True, "detect_negative": False}),
        (lambda x: cr.clip(x, -1, 1), "clip", {"min": -1.0, "max": 1.0}),
        (lambda x: cr.clip(x, max=np.float32(6)), "clip", {"max": 6.0}),
        (lambda x: x.clip(0.0), "clip", {"min": 0.0}),
        (lambda x: cr.cast(x, np.int32), "cast", {"dtype": "int32"}),
        (lambda x: x.astype("float32"), "cast", {"dtype": "float32"}),
        (lambda x: x.astype(bool), "cast", {"dtype": "bool"}),
    ],
)
def test_attrs_are_sent_with_the_kinds_the_server_expects(
    call: Callable[[cr.Node], cr.Node], op: str, attrs: dict[str, object]
) -> None:
    g = cr.GraphBuilder()
    call(g.input("x", "float64", [3])).named("out")
    out, _ = built(g, "out")
    assert out.op == op and list(out.inputs) == ["x"]
    assert attrs_of(out) == attrs


def test_clip_takes_nodes_and_arrays_as_tensor_bounds() -> None:
    g = cr.GraphBuilder()
    x, low, high = g.input("x", "float64", [2, 3]), g.input("low", "float64", [3]), g.input("high", "float64", [2, 1])
    cr.clip(x, low, high, name="both")
    cr.clip(x, low, 2.5, name="tensor-min")
    cr.clip(x, None, high, name="tensor-max")
    cr.clip(x, np.zeros(3), name="array-min")
    _, nodes = built(g, "both")
    assert list(nodes["both"].inputs) == ["x", "low", "high"] and not nodes["both"].attrs
    assert list(nodes["tensor-min"].inputs) == ["x", "low"] and attrs_of(nodes["tensor-min"]) == {"max": 2.5}
    unbounded = nodes["tensor-max"].inputs[1]
    assert tensors.decode(nodes[unbounded].value) == -np.inf and list(nodes["tensor-max"].inputs)[2] == "high"
    np.testing.assert_array_equal(tensors.decode(nodes[nodes["array-min"].inputs[1]].value), np.zeros(3))


COMPARISONS: list[tuple[Callable[[cr.Node, object], cr.Node], str, str, bool]] = [
    # (expression, its op with a node operand, its op with a number or array operand, operand written first)
    (lambda x, y: x == y, "equal", "equal", False),
    (lambda x, y: x != y, "not_equal", "not_equal", False),
    (lambda x, y: x < y, "less", "less", False),
    (lambda x, y: x <= y, "less_equal", "less_equal", False),
    (lambda x, y: x > y, "greater", "greater", False),
    (lambda x, y: x >= y, "greater_equal", "greater_equal", False),
    (lambda x, y: y == x, "equal", "equal", True),
    (lambda x, y: y < x, "less", "greater", True),
    (lambda x, y: y >= x, "greater_equal", "less_equal", True),
    (lambda x, y: x & y, "logical_and", "logical_and", False),
    (lambda x, y: x | y, "logical_or", "logical_or", False),
    (lambda x, y: x ^ y, "logical_xor", "logical_xor", False),
    (lambda x, y: y & x, "logical_and", "logical_and", True),
    (lambda x, y: y | x, "logical_or", "logical_or", True),
    (lambda x, y: y ^ x, "logical_xor", "logical_xor", True),
]


@pytest.mark.parametrize(("expression", "node_op", "lifted_op", "operand_first"), COMPARISONS)
@pytest.mark.parametrize("other", ["node", "number", "array"])
def test_comparison_and_logic_operators_create_bool_ops(
    expression: Callable[[cr.Node, object], cr.Node], node_op: str, lifted_op: str, operand_first: bool, other: str
) -> None:
    """A number or array written first makes Python reflect a comparison (2 < x is x > 2), while reflected
    logic (True & x) keeps the order as written; a node written first is simply the left operand."""
    logic = node_op.startswith("logical")
    dtype = "bool" if logic else "float64"
    g = cr.GraphBuilder()
    x = g.input("x", dtype, [3])
    operand: object = {
        "node": g.input("y", dtype, [3]),
        "number": True if logic else 2.0,
        "array": np.array([True, False, True]) if logic else np.arange(3.0),
    }[other]
    result = expression(x, operand).named("out")
    assert isinstance(result, cr.Node)
    out, nodes = built(g, "out")
    assert out.op == (node_op if other == "node" else lifted_op)
    arguments = list(out.inputs)
    assert arguments.index("x") == (1 if operand_first and (other == "node" or logic) else 0)
    lifted = arguments[1 - arguments.index("x")]
    if other != "node":
        assert nodes[lifted].op == "constant"
        assert tensors.decode(nodes[lifted].value).dtype == np.dtype(dtype)


def test_invert_is_logical_not() -> None:
    g = cr.GraphBuilder()
    (~(g.input("x", "float64", [2]) > 0)).named("out")
    out, nodes = built(g, "out")
    assert out.op == "logical_not" and nodes[out.inputs[0]].op == "greater"


def test_a_node_has_no_truth_value_and_hashes_by_identity() -> None:
    g = cr.GraphBuilder()
    x, y = g.input("x"), g.input("y")
    with pytest.raises(TypeError, match="truth value of node 'x'"):
        bool(x)
    with pytest.raises(TypeError, match="cr.where"):
        if x == y:
            pass
    assert len({x, y, x}) == 2 and {x: 1}[x] == 1
    assert x in [x, y] and x is not y


def test_where_lifts_bool_arrays_and_numbers() -> None:
    g = cr.GraphBuilder(default_dtype="float32")
    x = g.input("x", "float32", [2])
    cr.where(np.array([True, False]), x, 0.0, name="out")
    out, nodes = built(g, "out")
    condition, otherwise = (tensors.decode(nodes[name].value) for name in (out.inputs[0], out.inputs[2]))
    assert out.op == "where" and condition.dtype == np.bool_ and otherwise.dtype == np.float32


def test_astype_refuses_a_dtype_the_wire_lacks() -> None:
    g = cr.GraphBuilder()
    with pytest.raises(ValueError, match="float16"):
        g.input("x").astype(np.float16)


def test_prelu_takes_a_slope_array() -> None:
    g = cr.GraphBuilder()
    cr.prelu(g.input("x", "float64", [2, 3]), np.full(3, 0.25), name="out")
    out, nodes = built(g, "out")
    assert out.op == "prelu" and nodes[out.inputs[1]].op == "constant"


# ---------------------------------------------------------------- one graph of them through a real server
@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address) as client:
        yield client


def test_a_graph_of_comparisons_where_and_clip_runs_and_differentiates_as_numpy(client: cr.Client) -> None:
    g = cr.GraphBuilder("masks")
    x, w = g.input("x", "float64", [5]), g.parameter("w", np.array([0.5, -1.0, 2.0, 1.5, -0.25]))
    positive = (x > 0) & ~cr.isnan(x)
    scaled = cr.where(positive, x * w, cr.leaky_relu(x, 0.1)).named("scaled")
    clipped = scaled.clip(-1.0, 1.0).named("clipped")
    (clipped.astype("float32") != 0).named("nonzero")
    cr.sum(clipped * clipped, name="loss")
    graph_id = client.create_graph(g).graph_id

    xs = np.array([2.0, -3.0, 0.25, np.nan, 0.0])
    values = client.forward(graph_id, {"x": xs}, ["scaled", "clipped", "nonzero"])
    weights = np.array([0.5, -1.0, 2.0, 1.5, -0.25])
    with np.errstate(invalid="ignore"):
        expected = np.where((xs > 0) & ~np.isnan(xs), xs * weights, np.where(xs > 0, xs, 0.1 * xs))
    np.testing.assert_array_equal(values["scaled"], expected)
    np.testing.assert_array_equal(values["clipped"], np.clip(expected, -1.0, 1.0))
    np.testing.assert_array_equal(values["nonzero"], np.clip(expected, -1.0, 1.0).astype(np.float32) != 0)

    _, gradients = client.gradients(graph_id, {"x": xs}, loss="loss", wrt=["w"])
    inside = (np.abs(expected) <= 1.0) & ((xs > 0) & ~np.isnan(xs))
    # As in PyTorch, the NaN x still reaches w through x * w (0 * NaN), though `where` took the other branch.
    np.testing.assert_array_equal(gradients["w"], np.where(inside, 2 * expected, 0.0) * xs)
