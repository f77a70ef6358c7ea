"""GraphBuilder: the Graph messages it produces, checked field by field and against the server's validator."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import chainrule.client as cr
from chainrule import tensors
from chainrule.server.graph import build_graph
from chainrule.v1 import graph_pb2


def nodes_by_name(graph: graph_pb2.Graph) -> dict[str, graph_pb2.Node]:
    return {node.name: node for node in graph.nodes}


def attr_kinds(node: graph_pb2.Node) -> dict[str, str | None]:
    return {key: value.WhichOneof("value") for key, value in node.attrs.items()}


def test_logistic_regression_graph_lists_ops_and_inputs_in_argument_order() -> None:
    g = cr.GraphBuilder("logreg")
    x, y = g.input("x", shape=[-1, 3]), g.input("y", shape=[None, 1])
    w, b = g.parameter("w", np.zeros((3, 1))), g.parameter("b", 0.0)
    logits = (x @ w + b).named("logits")
    cr.sigmoid_cross_entropy(logits, y, name="loss")

    graph = g.to_proto()
    nodes = nodes_by_name(graph)
    assert graph.name == "logreg"
    assert [node.name for node in graph.nodes] == ["x", "y", "w", "b", "matmul_1", "logits", "loss"]
    assert nodes["matmul_1"].op == "matmul" and list(nodes["matmul_1"].inputs) == ["x", "w"]
    assert nodes["logits"].op == "add" and list(nodes["logits"].inputs) == ["matmul_1", "b"]
    assert nodes["loss"].op == "sigmoid_cross_entropy" and list(nodes["loss"].inputs) == ["logits", "y"]
    assert list(nodes["y"].attrs["shape"].ints.values) == [-1, 1]
    built = build_graph(graph)
    assert built.nodes["loss"]["type"].shape == ()


def test_a_node_used_twice_is_listed_twice() -> None:
    g = cr.GraphBuilder()
    x = g.input("x")
    product = x * x
    assert list(nodes_by_name(g.to_proto())[product.name].inputs) == ["x", "x"]


@pytest.mark.parametrize(
    ("expression", "op", "constant_first"),
    [
        (lambda x: 2.0 - x, "sub", True),
        (lambda x: x - 2.0, "sub", False),
        (lambda x: 2.0 + x, "add", True),
        (lambda x: 2.0 * x, "mul", True),
        (lambda x: 1.0 / x, "div", True),
        (lambda x: x / 2.0, "div", False),
        (lambda x: 2.0**x, "pow", True),
        (lambda x: x**2, "pow", False),
        (lambda x: np.ones((2, 2)) @ x, "matmul", True),
        (lambda x: np.ones(2) + x, "add", True),
    ],
)
def test_operators_turn_numbers_and_arrays_into_constants_on_the_correct_side(
    expression: Callable[[cr.Node], cr.Node], op: str, constant_first: bool
) -> None:
    g = cr.GraphBuilder()
    x = g.input("x")
    result = expression(x)
    assert isinstance(result, cr.Node), "numpy must defer to the Node instead of broadcasting over it"
    nodes = nodes_by_name(g.to_proto())
    inputs = list(nodes[result.name].inputs)
    assert nodes[result.name].op == op
    assert len(inputs) == 2 and "x" in inputs
    constant = inputs[0] if constant_first else inputs[1]
    assert nodes[constant].op == "constant"
    assert inputs[1 if constant_first else 0] == "x"


def test_unary_operators_and_methods() -> None:
    g = cr.GraphBuilder()
    x = g.input("x")
    cases = {
        "neg": -x,
        "abs": abs(x),
        "transpose": x.T,
        "sum": x.sum(axes=1),
        "mean": x.mean(keepdims=True),
        "reshape": x.reshape([-1, 2]),
    }
    nodes = nodes_by_name(g.to_proto())
    for op, node in cases.items():
        assert nodes[node.name].op == op
        assert list(nodes[node.name].inputs) == ["x"]
    assert "perm" not in nodes[cases["transpose"].name].attrs
    assert list(nodes[cases["sum"].name].attrs["axes"].ints.values) == [1]
    assert nodes[cases["sum"].name].attrs["keepdims"].b is False
    assert "axes" not in nodes[cases["mean"].name].attrs
    assert nodes[cases["mean"].name].attrs["keepdims"].b is True
    assert list(nodes[cases["reshape"].name].attrs["shape"].ints.values) == [-1, 2]


UNARY = ["neg", "exp", "log", "sqrt", "abs", "square", "sigmoid", "tanh", "relu", "softplus", "log_sigmoid"]
BINARY = [
    "add",
    "sub",
    "mul",
    "div",
    "pow",
    "maximum",
    "minimum",
    "matmul",
    "softmax_cross_entropy",
    "sigmoid_cross_entropy",
]


@pytest.mark.parametrize("op", UNARY)
def test_unary_functions_create_their_op_and_every_one_passes_the_server_validator(op: str) -> None:
    g = cr.GraphBuilder()
    x = g.input("x", shape=[2, 3])
    node = getattr(cr, op)(x, name="out")
    assert node.name == "out"
    message = nodes_by_name(g.to_proto())["out"]
    assert (message.op, list(message.inputs), dict(message.attrs)) == (op, ["x"], {})
    assert build_graph(g.to_proto()).nodes["out"]["type"].shape == (2, 3)


@pytest.mark.parametrize("op", BINARY)
def test_binary_functions_create_their_op_and_every_one_passes_the_server_validator(op: str) -> None:
    g = cr.GraphBuilder()
    a, b = g.input("a", shape=[3, 3]), g.input("b", shape=[3, 3])
    getattr(cr, op)(a, b, name="out")
    message = nodes_by_name(g.to_proto())["out"]
    assert (message.op, list(message.inputs)) == (op, ["a", "b"])
    build_graph(g.to_proto())


def test_reduction_shape_and_softmax_functions_set_attrs_of_the_kinds_the_server_expects() -> None:
    g = cr.GraphBuilder()
    x = g.input("x", shape=[2, 3, 4])
    made = [
        cr.sum(x, axes=[0, 2], keepdims=True),
        cr.mean(x, axes=(1,)),
        cr.max(x, axes=-1),
        cr.logsumexp(x),
        cr.reshape(x, (4, -1)),
        cr.transpose(x, perm=[2, 0, 1]),
        cr.softmax(x, axis=1),
        cr.log_softmax(x),
    ]
    nodes = nodes_by_name(g.to_proto())
    kinds = {node.op: attr_kinds(nodes[node.name]) for node in made}
    assert kinds == {
        "sum": {"axes": "ints", "keepdims": "b"},
        "mean": {"axes": "ints", "keepdims": "b"},
        "max": {"axes": "ints", "keepdims": "b"},
        "logsumexp": {"keepdims": "b"},
        "reshape": {"shape": "ints"},
        "transpose": {"perm": "ints"},
        "softmax": {"axis": "i"},
        "log_softmax": {"axis": "i"},
    }
    assert nodes[made[6].name].attrs["axis"].i == 1
    assert nodes[made[7].name].attrs["axis"].i == -1
    types = build_graph(g.to_proto()).nodes
    assert [types[node.name]["type"].shape for node in made] == [
        (1, 3, 1),
        (2, 4),
        (2, 3),
        (),
        (4, 6),
        (4, 2, 3),
        (2, 3, 4),
        (2, 3, 4),
    ]


def test_op_converts_attrs_by_python_type_checking_bool_before_int() -> None:
    g = cr.GraphBuilder()
    node = g.op(
        "custom",
        g.input("x"),
        flag=True,
        count=3,
        big=np.int64(7),
        rate=0.5,
        label="s",
        axes=[1, 2],
        scales=(0.5, 2),
        none=[],
    )
    attrs = nodes_by_name(g.to_proto())[node.name].attrs
    assert {key: value.WhichOneof("value") for key, value in attrs.items()} == {
        "flag": "b",
        "count": "i",
        "big": "i",
        "rate": "f",
        "label": "s",
        "axes": "ints",
        "scales": "floats",
        "none": "ints",
    }
    assert attrs["flag"].b is True and attrs["count"].i == 3 and attrs["big"].i == 7 and attrs["rate"].f == 0.5
    assert list(attrs["axes"].ints.values) == [1, 2] and list(attrs["scales"].floats.values) == [0.5, 2.0]


@pytest.mark.parametrize("bad", [[True, 1], ["a"], {"a": 1}, None])
def test_op_refuses_attrs_it_cannot_represent(bad: object) -> None:
    g = cr.GraphBuilder()
    with pytest.raises(TypeError):
        g.op("custom", g.input("x"), bad=bad)  # type: ignore[arg-type]


def test_input_attrs() -> None:
    g = cr.GraphBuilder()
    g.input("free")
    g.input("typed", dtype=np.float32, shape=[None, 3])
    g.input("named_dtype", dtype="int64")
    nodes = nodes_by_name(g.to_proto())
    assert dict(nodes["free"].attrs) == {}
    assert nodes["typed"].attrs["dtype"].s == "float32"
    assert list(nodes["typed"].attrs["shape"].ints.values) == [-1, 3]
    assert nodes["named_dtype"].attrs["dtype"].s == "int64"
    with pytest.raises(ValueError, match="float16"):
        g.input("half", dtype=np.float16)


@pytest.mark.parametrize(
    ("default_dtype", "value", "expected"),
    [
        ("float64", 2.0, np.float64(2.0)),
        ("float32", 2.0, np.float32(2.0)),
        ("float32", 3, np.float32(3.0)),
        ("float32", [1, 2], np.array([1, 2], dtype=np.float32)),
        ("float32", np.array([0.1, 0.2]), np.array([0.1, 0.2], dtype=np.float32)),
        ("float64", np.array([1, 2], dtype=np.int32), np.array([1, 2], dtype=np.int32)),
        ("float64", np.array([True, False]), np.array([True, False])),
    ],
)
def test_constants_take_the_default_dtype_for_numbers_and_float_arrays(
    default_dtype: str, value: object, expected: np.ndarray
) -> None:
    g = cr.GraphBuilder(default_dtype=default_dtype)
    x = g.input("x")
    lifted = x * value  # type: ignore[operator]
    explicit = g.constant(value, name="c")  # type: ignore[arg-type]
    nodes = nodes_by_name(g.to_proto())
    for message in (nodes[lifted.inputs[1].name].value, nodes[explicit.name].value):
        assert message.data == np.asarray(expected).tobytes()
        decoded = tensors.decode(message)
        assert decoded.dtype == expected.dtype and decoded.shape == np.shape(expected)


def test_parameter_values_are_encoded_with_their_shape() -> None:
    g = cr.GraphBuilder(default_dtype="float32")
    g.parameter("w", np.arange(6.0).reshape(2, 3))
    value = nodes_by_name(g.to_proto())["w"].value
    np.testing.assert_array_equal(tensors.decode(value), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_default_dtype_must_be_a_float() -> None:
    with pytest.raises(ValueError, match="default_dtype"):
        cr.GraphBuilder(default_dtype="int64")


def test_renaming_after_use_reaches_every_consumer() -> None:
    g = cr.GraphBuilder()
    x = g.input("x")
    hidden = cr.tanh(x)
    out = hidden * hidden
    assert hidden.named("h") is hidden
    out.named("out")
    nodes = nodes_by_name(g.to_proto())
    assert list(nodes["out"].inputs) == ["h", "h"]
    assert nodes["h"].op == "tanh"


def test_generated_names_are_per_op_counters_that_skip_taken_names() -> None:
    g = cr.GraphBuilder()
    x = g.input("add_1")
    assert [(x + 1.0).name, (x + 1.0).name, (x * 2.0).name] == ["add_2", "add_3", "mul_1"]
    assert [node.name for node in g.to_proto().nodes if node.op == "constant"] == [
        "constant_1",
        "constant_2",
        "constant_3",
    ]


def test_duplicate_names_fail_at_to_proto_and_renaming_resolves_them() -> None:
    g = cr.GraphBuilder("dup")
    first = g.input("x")
    second = cr.exp(first).named("x")
    with pytest.raises(ValueError, match="'x'"):
        g.to_proto()
    second.named("y")
    assert [node.name for node in g.to_proto().nodes] == ["x", "y"]


@pytest.mark.parametrize("bad", ["", 3])
def test_names_must_be_non_empty_strings(bad: object) -> None:
    g = cr.GraphBuilder()
    with pytest.raises(ValueError):
        g.input("x").named(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        g.constant(1.0, name=bad)  # type: ignore[arg-type]


def test_nodes_of_different_builders_cannot_be_mixed() -> None:
    x = cr.GraphBuilder("a").input("x")
    y = cr.GraphBuilder("b").input("y")
    with pytest.raises(ValueError, match="different builders"):
        x + y
    with pytest.raises(ValueError, match="different builders"):
        cr.maximum(x, y)


def test_functions_need_a_node_to_know_their_builder() -> None:
    with pytest.raises(TypeError, match="Node"):
        cr.maximum(1.0, 2.0)


def test_function_with_a_number_first_lifts_it_into_the_nodes_builder() -> None:
    g = cr.GraphBuilder()
    x = g.input("x")
    node = cr.maximum(0.0, x)
    message = nodes_by_name(g.to_proto())[node.name]
    assert message.inputs[1] == "x"
    assert nodes_by_name(g.to_proto())[message.inputs[0]].op == "constant"


def test_values_are_copied_when_the_node_is_created_and_bad_ones_fail_at_once() -> None:
    g = cr.GraphBuilder()
    initial = np.zeros(2)
    g.parameter("w", initial)
    initial[:] = 5.0
    assert tensors.decode(nodes_by_name(g.to_proto())["w"].value).tolist() == [0.0, 0.0]
    with pytest.raises(tensors.TensorError, match="text"):
        g.constant(np.array(["a"]), name="text")
