"""Pictures of graphs: the DOT text, Graphviz's SVG, and `Client.render` against a real server.

Graphviz is a CI requirement (apt package `graphviz`), so the SVG tests fail rather than skip
when `dot` is missing: a skipped picture test would let a broken renderer land unnoticed.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import chainrule.client as cr
from chainrule.client.render import (
    GRADIENT_COLOR,
    VALUE_COLOR,
    RenderError,
    computable_nodes,
    format_tensor,
    gradient_nodes,
    render_png,
    render_svg,
    to_dot,
)
from chainrule.v1 import graph_pb2
from tests.server_process import ServerProcess

DOCS_PICTURE = Path(__file__).resolve().parent.parent / "docs" / "lecture-graph.svg"
LECTURE_FEEDS = {"x": -2.0, "y": 5.0, "z": -4.0}
# The lecture's numbers for f = (x + y) z at x=-2, y=5, z=-4.
LECTURE_VALUES = {"x": -2.0, "y": 5.0, "z": -4.0, "q": 3.0, "f": -12.0}
LECTURE_GRADIENTS = {"x": -4.0, "y": -4.0, "z": 3.0, "q": -4.0, "f": 1.0}


def lecture() -> cr.GraphBuilder:
    graph = cr.GraphBuilder("lecture")
    x, y, z = graph.input("x"), graph.input("y"), graph.input("z")
    ((x + y).named("q") * z).named("f")
    return graph


def node_line(dot: str, name: str) -> str:
    (line,) = [line for line in dot.splitlines() if line.startswith(f'  "{name}" [')]
    return line


def colored(dot_or_svg: str, color: str) -> list[str]:
    """The texts drawn in `color`, in DOT's FONT tags or SVG's fill attributes, unescaped."""
    pattern = rf'(?:<FONT COLOR="{color}">|fill="{color}">)([^<]*)<'
    return [html.unescape(text) for text in re.findall(pattern, dot_or_svg)]


def arrays(numbers: dict[str, float]) -> dict[str, np.ndarray]:
    return {name: np.asarray(number) for name, number in numbers.items()}


# ---------------------------------------------------------------- DOT text
def test_lecture_graph_shows_every_node_value_and_gradient_left_to_right() -> None:
    dot = to_dot(lecture().to_proto(), arrays(LECTURE_VALUES), arrays(LECTURE_GRADIENTS), loss="f")
    assert "rankdir=LR;" in dot
    assert 'label="lecture"' in dot
    for name, op in [("x", "input"), ("y", "input"), ("z", "input"), ("q", "add"), ("f", "mul")]:
        assert f'<B>{name}</B>  <FONT COLOR="#566573">{op}</FONT>' in node_line(dot, name)
    assert colored(dot, VALUE_COLOR) == ["-2", "5", "-4", "3", "-12"]
    assert colored(dot, GRADIENT_COLOR) == ["∂f/∂x = -4", "∂f/∂y = -4", "∂f/∂z = 3", "∂f/∂q = -4", "∂f/∂f = 1"]
    assert GRADIENT_COLOR != VALUE_COLOR
    edges = {line.strip() for line in dot.splitlines() if "->" in line}
    assert edges == {'"x" -> "q";', '"y" -> "q";', '"q" -> "f";', '"z" -> "f";'}
    assert '{ rank=min; "x" "y" "z" }' in dot
    assert "penwidth=2" in node_line(dot, "f") and "penwidth" not in node_line(dot, "q")


def test_structure_alone_draws_names_and_ops_without_numbers() -> None:
    dot = to_dot(lecture().to_proto(), title="")
    assert colored(dot, VALUE_COLOR) == [] and colored(dot, GRADIENT_COLOR) == []
    assert "<B>q</B>" in node_line(dot, "q") and 'label=""' in dot


def test_gradients_without_a_loss_name_are_labelled_gradient() -> None:
    dot = to_dot(lecture().to_proto(), gradients={"q": np.asarray(-4.0)})
    assert colored(dot, GRADIENT_COLOR) == ["gradient = -4"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (np.asarray(-12.0), "-12"),
        (np.asarray(1 / 3, dtype=np.float32), "0.3333"),
        (np.asarray([1.0, 2.5]), "[1, 2.5]"),
        (np.asarray([[1, 2], [3, 4]], dtype=np.int64), "[[1, 2], [3, 4]]"),
        (np.asarray([True, False]), "[true, false]"),
        (np.asarray([-12.0]), "[-12]"),
        (np.zeros((0, 3)), "[]"),
        (np.arange(12.0).reshape(3, 4), "shape [3, 4], L2 norm 22.49"),
        (np.ones(5, dtype=np.int32), "shape [5], L2 norm 2.236"),
    ],
)
def test_small_tensors_show_numbers_and_large_ones_shape_and_norm(value: np.ndarray, text: str) -> None:
    assert format_tensor(value) == text


def test_large_tensors_in_labels_show_shape_and_norm_in_both_colors() -> None:
    graph = cr.GraphBuilder("big")
    (graph.parameter("w", np.zeros((3, 4))).sum()).named("s")
    weights = np.full((3, 4), 2.0)
    dot = to_dot(graph.to_proto(), {"w": weights, "s": np.asarray(24.0)}, {"w": np.ones((3, 4))}, loss="s")
    assert colored(dot, VALUE_COLOR) == ["shape [3, 4], L2 norm 6.928", "24"]
    assert colored(dot, GRADIENT_COLOR) == ["∂s/∂w: shape [3, 4], L2 norm 3.464"]


def test_an_argument_used_twice_is_one_edge_labelled_x2() -> None:
    graph = cr.GraphBuilder("square")
    x = graph.input("x")
    (x * x + x).named("y")
    dot = to_dot(graph.to_proto())
    edges = [line.strip() for line in dot.splitlines() if "->" in line]
    assert edges == ['"x" -> "mul_1" [label="×2"];', '"mul_1" -> "y";', '"x" -> "y";']


def test_attrs_are_shown_and_names_are_escaped() -> None:
    definition = graph_pb2.Graph(
        name='say "hi"',
        nodes=[
            graph_pb2.Node(name="a<&>b", op="input"),
            graph_pb2.Node(name="total", op="sum", inputs=["a<&>b"]),
        ],
    )
    definition.nodes[1].attrs["axes"].ints.values.extend([0, 1])
    definition.nodes[1].attrs["keepdims"].b = True
    dot = to_dot(definition)
    assert 'digraph "say \\"hi\\"" {' in dot
    assert node_line(dot, "a<&>b").startswith('  "a<&>b" [') and "<B>a&lt;&amp;&gt;b</B>" in dot
    assert "axes=[0, 1], keepdims=true" in node_line(dot, "total")
    assert '"a<&>b" -> "total";' in dot


def test_computable_nodes_are_those_the_fed_inputs_determine() -> None:
    graph = cr.GraphBuilder("partial")
    x, y = graph.input("x"), graph.input("y")
    w = graph.parameter("w", 2.0)
    (x * w).named("xw")
    (y + w).named("yw")
    (x * y).named("xy")
    definition = graph.to_proto()
    order = [node.name for node in definition.nodes]
    assert computable_nodes(definition, order, {"x"}) == ["x", "w", "xw"]
    assert computable_nodes(definition, order, ()) == ["w"]
    assert computable_nodes(definition, order, {"x", "y"}) == order


def test_gradient_nodes_are_the_float_ancestors_of_the_loss() -> None:
    graph = cr.GraphBuilder("mixed")
    x, k = graph.input("x"), graph.input("k", dtype="int64")
    w = graph.parameter("w", 2.0)
    (x * w * k).named("loss")
    (x + 1.0).named("unrelated")
    definition = graph.to_proto()
    order = [node.name for node in definition.nodes]
    values = {"x": np.asarray(1.0), "k": np.asarray(3), "w": np.asarray(2.0)}
    assert gradient_nodes(definition, order, "loss", values) == ["x", "w", "mul_1", "loss"]
    # Unknown names and non-float losses stay in so the server can say what is wrong.
    assert gradient_nodes(definition, order, "nope", values) == ["nope"]
    assert gradient_nodes(definition, order, "k", values) == ["k"]


# ---------------------------------------------------------------- Graphviz
def test_render_svg_draws_an_svg_document_with_the_gradient_color() -> None:
    dot = to_dot(lecture().to_proto(), arrays(LECTURE_VALUES), arrays(LECTURE_GRADIENTS), loss="f")
    svg = render_svg(dot)
    assert "<svg" in svg and svg.rstrip().endswith("</svg>")
    assert sorted(colored(svg, GRADIENT_COLOR)) == sorted(colored(dot, GRADIENT_COLOR))
    assert render_png(dot).startswith(b"\x89PNG\r\n\x1a\n")


def test_missing_graphviz_names_the_package_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RenderError) as raised:
        render_svg(to_dot(lecture().to_proto()))
    message = str(raised.value)
    assert "Graphviz's `dot` program, which is not on PATH" in message
    assert "apt-get install graphviz" in message and "brew install graphviz" in message


def test_dot_refusing_the_text_is_a_render_error() -> None:
    with pytest.raises(RenderError, match="Graphviz dot exited with status"):
        render_svg("digraph {")


def test_the_committed_docs_picture_shows_the_lecture_numbers() -> None:
    svg = DOCS_PICTURE.read_text(encoding="utf-8")
    assert "<svg" in svg
    assert sorted(colored(svg, VALUE_COLOR)) == sorted(["-2", "5", "-4", "3", "-12"])
    assert sorted(colored(svg, GRADIENT_COLOR)) == sorted(
        ["∂f/∂x = -4", "∂f/∂y = -4", "∂f/∂z = 3", "∂f/∂q = -4", "∂f/∂f = 1"]
    )


# ---------------------------------------------------------------- Client.render
@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address, timeout=30) as connected:
        yield connected


def test_client_render_draws_the_servers_values_and_gradients(client: cr.Client) -> None:
    graph_id = client.create_graph(lecture()).graph_id
    dot = client.render(graph_id, LECTURE_FEEDS, loss="f", format="dot")
    assert colored(dot, VALUE_COLOR) == ["-2", "5", "-4", "3", "-12"]
    assert colored(dot, GRADIENT_COLOR) == ["∂f/∂x = -4", "∂f/∂y = -4", "∂f/∂z = 3", "∂f/∂q = -4", "∂f/∂f = 1"]
    svg = client.render(graph_id, LECTURE_FEEDS, loss="f")
    assert "<svg" in svg and len(colored(svg, GRADIENT_COLOR)) == 5
    structure = client.render(graph_id, format="dot")
    assert colored(structure, VALUE_COLOR) == [] and "<B>q</B>" in structure


def test_client_render_of_a_partly_fed_graph_draws_what_the_feeds_determine(client: cr.Client) -> None:
    graph = cr.GraphBuilder("mixed")
    x, k, labels = graph.input("x"), graph.input("k", dtype="int64"), graph.input("labels")
    w = graph.parameter("w", np.array([1.0, 2.0]))
    scaled = (x * w * k).named("scaled")
    cr.sum((scaled - labels) ** 2, name="loss")
    graph_id = client.create_graph(graph).graph_id
    partial = client.render(graph_id, {"x": np.array([1.0, 1.0]), "k": np.array(3)}, format="dot")
    assert "[3, 6]" in node_line(partial, "scaled") and VALUE_COLOR not in node_line(partial, "loss")
    feeds = {"x": np.array([1.0, 1.0]), "k": np.array(3), "labels": np.array([3.0, 5.0])}
    dot = client.render(graph_id, feeds, loss="loss", format="dot")
    assert GRADIENT_COLOR not in node_line(dot, "k")  # an int input has no gradient
    assert "∂loss/∂w = [0, 6]" in node_line(dot, "w")  # 2 (x w k - labels) k x
    assert "∂loss/∂loss = 1" in node_line(dot, "loss")


def test_client_render_reports_the_servers_errors(client: cr.Client) -> None:
    graph_id = client.create_graph(lecture()).graph_id
    with pytest.raises(cr.ChainruleError) as raised:
        client.render(graph_id, {"x": -2.0}, loss="f")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "was not fed" in raised.value.message
    with pytest.raises(cr.ChainruleError) as raised:
        client.render(graph_id, LECTURE_FEEDS, loss="nope")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "'nope'" in raised.value.message
    with pytest.raises(cr.ChainruleError) as raised:
        client.render("no-such-graph")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ValueError, match="format must be 'svg' or 'dot'"):
        client.render(graph_id, format="png")  # type: ignore[arg-type]
