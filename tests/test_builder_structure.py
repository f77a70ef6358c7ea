"""The builder's numpy-like reach into the structure ops: indexing, concat, split, gather, einsum, pad,
reductions as methods. Graphs are checked as messages, evaluated in-process against numpy, and a few
go through a real server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

import chainrule.client as cr
from chainrule.client.builder import INT64_MAX, INT64_MIN
from chainrule.server.graph import build_graph
from chainrule.server.plan import Plan
from tests.server_process import ServerProcess

X = np.arange(24.0).reshape(2, 3, 4) - 11.5


def evaluate(graph: cr.GraphBuilder, node: cr.Node, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The node's value as the server's plan computes it, in-process."""
    [value] = Plan(build_graph(graph.to_proto())).forward(feeds, {}, [node.name])
    return np.asarray(value)


def attrs(node: cr.Node) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in node.attrs.items():
        kind = value.WhichOneof("value")
        found[key] = list(getattr(value, kind).values) if kind in ("ints", "floats") else getattr(value, kind)
    return found


# ---------------------------------------------------------------- indexing
INDEXES: list[tuple[str, Callable[[Any], Any]]] = [
    ("[1:3, ::2]", lambda x: x[1:3, ::2]),
    ("[..., 0]", lambda x: x[..., 0]),
    ("[None]", lambda x: x[None]),
    ("[0]", lambda x: x[0]),
    ("[-1]", lambda x: x[-1]),
    ("[::-1]", lambda x: x[::-1]),
    ("[:, ::-2, 1:]", lambda x: x[:, ::-2, 1:]),
    ("[1, :, -1]", lambda x: x[1, :, -1]),
    ("[..., None, 1:3]", lambda x: x[..., None, 1:3]),
    ("[None, ..., None]", lambda x: x[None, ..., None]),
    ("[:, None, 0, ::3]", lambda x: x[:, None, 0, ::3]),
    ("[..., -2:, :]", lambda x: x[..., -2:, :]),
    ("[0, ..., 1]", lambda x: x[0, ..., 1]),
    ("[5:]", lambda x: x[5:]),
    ("[-100:100]", lambda x: x[-100:100]),
    ("[[1, 0, 1]]", lambda x: x[[1, 0, 1]]),
    ("[:, [2, -1]]", lambda x: x[:, [2, -1]]),
    ("[..., [3, 0]]", lambda x: x[..., [3, 0]]),
    ("[...]", lambda x: x[...]),
    ("[:]", lambda x: x[:]),
    ("[np.int64(1)]", lambda x: x[np.int64(1)]),
]


@pytest.mark.parametrize("index", INDEXES, ids=lambda index: index[0])
def test_indexing_gives_what_numpy_gives(index: tuple[str, Callable[[Any], Any]]) -> None:
    graph = cr.GraphBuilder()
    x = graph.input("x", dtype="float64", shape=[2, 3, 4])
    out = index[1](x)
    expected = index[1](X)
    value = evaluate(graph, out, {"x": X})
    assert value.shape == expected.shape
    np.testing.assert_array_equal(value, expected)
    assert out.name != "x"


def test_slices_and_ints_become_one_slice_node_then_squeeze() -> None:
    graph = cr.GraphBuilder()
    x = graph.input("x", shape=[2, 3, 4])
    y = x[1:3, ::2]
    assert y.op == "slice" and y.inputs == (x,)
    assert attrs(y) == {"starts": [1, 0], "ends": [3, INT64_MAX], "axes": [0, 1], "steps": [1, 2]}
    z = x[..., 0]
    assert z.op == "squeeze" and attrs(z) == {"axes": [-1]}
    assert attrs(z.inputs[0]) == {"starts": [0], "ends": [1], "axes": [-1]}
    last = x[-1]
    assert attrs(last.inputs[0]) == {"starts": [-1], "ends": [INT64_MAX], "axes": [0]}
    backwards = x[::-1]
    assert attrs(backwards) == {"starts": [INT64_MAX], "ends": [INT64_MIN], "axes": [0], "steps": [-1]}
    assert x[None].op == "unsqueeze" and attrs(x[None]) == {"axes": [0]}
    picked = x[:, [2, 0]]
    assert picked.op == "gather" and attrs(picked) == {"axis": 1}
    assert picked.inputs[1].op == "constant"


def test_an_int_node_indexes_by_gather() -> None:
    graph = cr.GraphBuilder()
    x = graph.input("x", dtype="float64", shape=[2, 3, 4])
    rows = graph.input("rows", dtype="int64", shape=[2])
    out = x[:, rows]
    assert out.op == "gather" and out.inputs[1] is rows
    np.testing.assert_array_equal(evaluate(graph, out, {"x": X, "rows": np.array([2, -3])}), X[:, [2, -3]])


@pytest.mark.parametrize(
    ("index", "error", "words"),
    [
        ((Ellipsis, 0, Ellipsis), IndexError, "single ellipsis"),
        (([0], [1]), IndexError, "one index array"),
        (([0], 1), IndexError, "one index array"),
        (np.array([True, False]), IndexError, "boolean masks"),
        (slice(0, 2, 0), ValueError, "step cannot be zero"),
        (slice(0.5, 2), TypeError, "ints"),
        ("a", TypeError, "cannot index"),
    ],
)
def test_indexes_numpy_would_refuse_or_we_cannot_express_are_refused(index: Any, error: type, words: str) -> None:
    x = cr.GraphBuilder().input("x")
    with pytest.raises(error, match=words):
        x[index]


def test_a_node_cannot_be_iterated() -> None:
    x = cr.GraphBuilder().input("x")
    with pytest.raises(TypeError, match="cannot be iterated"):
        list(x)


# ---------------------------------------------------------------- functions and methods
def test_functions_build_their_ops_with_the_attrs_the_server_takes() -> None:
    graph = cr.GraphBuilder()
    a, b = graph.input("a", shape=[2, 3]), graph.input("b", shape=[2, 1])
    assert attrs(cr.concat([a, b], axis=1)) == {"axis": 1}
    assert attrs(cr.gather(a, [1, 0], axis=1)) == {"axis": 1}
    assert cr.gather(a, [1, 0]).inputs[1].value.dtype == cr.encode(np.int64(0)).dtype
    assert attrs(cr.einsum("ij,kj->ik", a, a)) == {"equation": "ij,kj->ik"}
    assert attrs(cr.pad(a, [(1, 0), (0, 2)], mode="edge")) == {"pads": [1, 0, 0, 2], "mode": "edge", "value": 0.0}
    assert attrs(cr.pad(a, [1, 0, 0, 2], value=1.5))["pads"] == [1, 0, 0, 2]
    assert attrs(cr.tile(a, [2, 1])) == {"repeats": [2, 1]}
    assert attrs(cr.expand(b, [2, 3])) == {"shape": [2, 3]}
    hot = cr.one_hot(graph.constant(np.array([0, 2])), 3, dtype=np.float32)
    assert attrs(hot) == {"depth": 3, "axis": -1, "dtype": "float32"}
    assert attrs(cr.argmax(a, axis=1)) == {"axis": 1, "keepdims": False, "select_last_index": False}
    assert attrs(cr.cumsum(a, axis=1, reverse=True)) == {"axis": 1, "exclusive": False, "reverse": True}
    assert cr.flatten(a).op == "flatten" and a.flatten().op == "reshape"
    assert a.T.op == "transpose" and attrs(a.transpose(1, 0)) == {"perm": [1, 0]}
    assert attrs(a.reshape(3, -1)) == {"shape": [3, -1]} and attrs(a.reshape((3, -1))) == {"shape": [3, -1]}
    assert (a.min(axis=0).op, a.prod(1).op, a.max(axis=[0, 1]).op) == ("reduce_min", "reduce_prod", "max")
    assert attrs(a.sum(axis=1)) == attrs(a.sum(axes=1)) == {"axes": [1], "keepdims": False}
    pieces = cr.split(a, [1, 2], axis=1, name="part")
    assert [(piece.name, attrs(piece)) for piece in pieces] == [
        ("part_0", {"axis": 1, "index": 0, "splits": [1, 2]}),
        ("part_1", {"axis": 1, "index": 1, "splits": [1, 2]}),
    ]
    assert [attrs(piece)["num_outputs"] for piece in cr.split(a, 3)] == [3, 3, 3]
    build_graph(graph.to_proto())


def test_functions_and_methods_compute_what_numpy_computes() -> None:
    graph = cr.GraphBuilder()
    x = graph.input("x", dtype="float64", shape=[2, 3, 4])
    cases: dict[str, tuple[cr.Node, np.ndarray]] = {
        "concat": (cr.concat([x, x[:, :1]], axis=1), np.concatenate([X, X[:, :1]], axis=1)),
        "gather": (cr.gather(x, [[2, -1]], axis=-1), np.take(X, [[2, -1]], axis=-1)),
        "gather_elements": (
            cr.gather_elements(x, np.zeros((2, 1, 4), np.int64) + 2, axis=1),
            np.take_along_axis(X, np.zeros((2, 1, 4), np.int64) + 2, axis=1),
        ),
        "einsum": (cr.einsum("bij,bkj->bik", x, x), np.einsum("bij,bkj->bik", X, X)),
        "pad": (cr.pad(x, [(0, 0), (1, 1), (2, 0)], mode="reflect"), np.pad(X, [(0, 0), (1, 1), (2, 0)], "reflect")),
        "tile": (cr.tile(x, [1, 2, 1]), np.tile(X, [1, 2, 1])),
        "expand": (cr.expand(x[:, :1], [2, 3, 4]), np.broadcast_to(X[:, :1], (2, 3, 4))),
        "flatten": (cr.flatten(x, axis=2), X.reshape(6, 4)),
        "x.flatten": (x.flatten(), X.flatten()),
        "unsqueeze": (cr.unsqueeze(x, [0, -1]), X[None, ..., None]),
        "squeeze": (cr.squeeze(x[:1]), X[0]),
        "shape": (cr.shape(x), np.array([2, 3, 4])),
        "one_hot": (cr.one_hot(x.argmax(axis=1)[0], 3), np.eye(3, dtype=np.int64)[X.argmax(axis=1)[0]]),
        "argmax": (x.argmax(axis=2), X.argmax(axis=2)),
        "argmin": (cr.argmin(x, axis=1, keepdims=True), X.argmin(axis=1)[:, None]),
        "cumsum": (x.cumsum(axis=1), X.cumsum(axis=1)),
        "prod": (x.prod(axis=(0, 2)), X.prod(axis=(0, 2))),
        "min": (x.min(axis=-1, keepdims=True), X.min(axis=-1, keepdims=True)),
        "max": (x.max(), X.max()),
        "mean": (x.mean(axis=[0, 1]), X.mean(axis=(0, 1))),
        "reduce_l2": (cr.reduce_l2(x, 1), np.linalg.norm(X, axis=1)),
        "reduce_l1": (cr.reduce_l1(x), np.abs(X).sum()),
        "reduce_sum_square": (cr.reduce_sum_square(x, [0]), (X**2).sum(axis=0)),
        "split": (cr.split(x, [1, 3], axis=2)[1], X[:, :, 1:]),
        "T": (x.T, X.T),
        "transpose": (x.transpose(2, 0, 1), X.transpose(2, 0, 1)),
        "reshape": (x.reshape(4, -1), X.reshape(4, -1)),
    }
    names = [node.name for node, _ in cases.values()]
    values = Plan(build_graph(graph.to_proto())).forward({"x": X}, {}, names)
    for (label, (_, expected)), value in zip(cases.items(), values, strict=True):
        assert np.shape(value) == expected.shape, label
        np.testing.assert_allclose(value, expected, rtol=1e-12, err_msg=label)


# ---------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address) as connected:
        yield connected


def test_indexing_and_structure_round_trip_through_a_server(client: cr.Client) -> None:
    graph = cr.GraphBuilder("structure")
    x = graph.input("x", dtype="float64", shape=[-1, 3, 4])
    w = graph.parameter("w", np.linspace(-1, 1, 12).reshape(3, 4))
    window = x[1:3, ::2].named("window")
    mixed = cr.einsum("bij,ij->bi", x, w).named("mixed")
    joined = cr.concat([mixed, x[..., 0]], axis=1).named("joined")
    first, rest = cr.split(joined, [2, 4], axis=1, name="piece")
    loss = (cr.pad(first, [(0, 0), (1, 1)], mode="edge").sum() + rest.max(axis=1).sum() + window.sum()).named("loss")
    info = client.create_graph(graph)
    x_value = np.arange(36.0).reshape(3, 3, 4) / 10
    fetched = client.forward(info.graph_id, {"x": x_value}, ["window", "mixed", "joined", "piece_1", "loss"])
    w_value = np.linspace(-1, 1, 12).reshape(3, 4)
    np.testing.assert_array_equal(fetched["window"], x_value[1:3, ::2])
    np.testing.assert_allclose(fetched["mixed"], np.einsum("bij,ij->bi", x_value, w_value))
    joined_value = np.concatenate([fetched["mixed"], x_value[..., 0]], axis=1)
    np.testing.assert_allclose(fetched["joined"], joined_value)
    np.testing.assert_allclose(fetched["piece_1"], joined_value[:, 2:])
    _, gradients = client.gradients(info.graph_id, {"x": x_value}, loss=loss.name, wrt=["x", "w"])
    x_torch = torch.tensor(x_value, requires_grad=True)
    w_torch = torch.tensor(w_value, requires_grad=True)
    joined_torch = torch.cat([torch.einsum("bij,ij->bi", x_torch, w_torch), x_torch[..., 0]], dim=1)
    padded = torch.nn.functional.pad(joined_torch[:, :2], (1, 1), mode="replicate")
    (padded.sum() + joined_torch[:, 2:].amax(dim=1).sum() + x_torch[1:3, ::2].sum()).backward()
    assert x_torch.grad is not None and w_torch.grad is not None
    np.testing.assert_allclose(gradients["x"], x_torch.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(gradients["w"], w_torch.grad.numpy(), rtol=1e-12)
    client.delete_graph(info.graph_id)


def test_a_bad_index_reaches_the_server_as_invalid_argument_naming_the_node(client: cr.Client) -> None:
    graph = cr.GraphBuilder("bad")
    x = graph.input("x", dtype="float64", shape=[2, 3])
    cr.gather(x, [5], axis=1).named("picked")
    info = client.create_graph(graph)
    with pytest.raises(cr.ChainruleError) as raised:
        client.forward(info.graph_id, {"x": np.zeros((2, 3))}, ["picked"])
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "node 'picked' (gather)" in raised.value.message
    client.delete_graph(info.graph_id)
