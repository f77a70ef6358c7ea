"""The builder's convolution and pooling functions: the nodes they write, and a small CNN built with
them computing what PyTorch computes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import chainrule.client as cr
from chainrule.server.graph import build_graph
from chainrule.server.plan import Plan
from chainrule.v1 import graph_pb2


def nodes_by_name(graph: graph_pb2.Graph) -> dict[str, graph_pb2.Node]:
    return {node.name: node for node in graph.nodes}


def ints(node: graph_pb2.Node, key: str) -> list[int]:
    return list(node.attrs[key].ints.values)


def test_conv_writes_its_arguments_in_order_and_only_the_attrs_given() -> None:
    g = cr.GraphBuilder()
    x = g.input("x", shape=[-1, 3, 8, 8])
    w, b = g.parameter("w", np.zeros((4, 3, 3, 3))), g.parameter("b", np.zeros(4))
    cr.conv(x, w, b, strides=(2, 2), pads=[1, 1, 1, 1], name="with_bias")
    cr.conv(x, w, group=1, auto_pad="SAME_UPPER", name="without_bias")
    nodes = nodes_by_name(g.to_proto())
    assert list(nodes["with_bias"].inputs) == ["x", "w", "b"]
    assert set(nodes["with_bias"].attrs) == {"strides", "pads"}
    assert ints(nodes["with_bias"], "strides") == [2, 2] and ints(nodes["with_bias"], "pads") == [1, 1, 1, 1]
    assert list(nodes["without_bias"].inputs) == ["x", "w"]
    assert nodes["without_bias"].attrs["group"].i == 1
    assert nodes["without_bias"].attrs["auto_pad"].s == "SAME_UPPER"


def test_conv_transpose_and_pools_write_their_attrs() -> None:
    g = cr.GraphBuilder()
    x = g.input("x", shape=[1, 4, 5, 5])
    cr.conv_transpose(x, np.ones((4, 2, 3, 3)), strides=[2, 2], output_padding=[1, 1], group=2, name="up")
    cr.max_pool(x, [2, 2], strides=[2, 2], ceil_mode=True, name="max")
    cr.average_pool(x, (3, 3), pads=[1, 1, 1, 1], count_include_pad=True, name="avg")
    cr.global_average_pool(x, name="gap")
    cr.global_max_pool(x, name="gmp")
    graph = g.to_proto()
    nodes = nodes_by_name(graph)
    assert nodes["up"].op == "conv_transpose" and nodes["up"].attrs["group"].i == 2
    assert ints(nodes["up"], "output_padding") == [1, 1]
    assert nodes["max"].op == "max_pool" and ints(nodes["max"], "kernel_shape") == [2, 2]
    assert nodes["max"].attrs["ceil_mode"].b and "auto_pad" not in nodes["max"].attrs
    assert nodes["avg"].attrs["count_include_pad"].b and ints(nodes["avg"], "kernel_shape") == [3, 3]
    assert list(nodes["gap"].inputs) == ["x"] and nodes["gmp"].op == "global_max_pool"
    types = {name: data["type"].shape for name, data in build_graph(graph).nodes(data=True)}
    assert types["up"] == (1, 4, 12, 12)
    assert types["max"] == (1, 4, 3, 3)
    assert types["avg"] == (1, 4, 5, 5)
    assert types["gap"] == types["gmp"] == (1, 4, 1, 1)


def test_a_small_cnn_built_with_the_builder_computes_what_pytorch_computes() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 12, 12)).astype(np.float32)
    w1, b1 = rng.standard_normal((4, 1, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    w2 = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)

    g = cr.GraphBuilder("cnn", default_dtype="float32")
    image = g.input("x", dtype="float32", shape=[-1, 1, 12, 12])
    c1 = cr.relu(cr.conv(image, g.parameter("w1", w1), g.parameter("b1", b1), pads=[1, 1, 1, 1]))
    p1 = cr.max_pool(c1, [2, 2], strides=[2, 2])
    c2 = cr.conv(p1, g.parameter("w2", w2), strides=[2, 2])
    cr.global_average_pool(cr.average_pool(c2, [2, 2], ceil_mode=True), name="out")
    [value] = Plan(build_graph(g.to_proto())).forward({"x": x}, {"w1": w1, "b1": b1, "w2": w2}, ["out"])

    t = torch.from_numpy
    h = F.max_pool2d(F.relu(F.conv2d(t(x), t(w1), t(b1), padding=1)), 2, 2)
    expected = F.avg_pool2d(F.conv2d(h, t(w2), stride=2), 2, 1, ceil_mode=True).mean(dim=(2, 3), keepdim=True)
    assert value.dtype == np.float32
    np.testing.assert_allclose(value, expected.numpy(), rtol=1e-5, atol=1e-5)
