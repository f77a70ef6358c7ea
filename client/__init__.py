"""Python client for chainrule: build graphs with numpy-like expressions, run them remotely.

import chainrule.client as cr

g = cr.GraphBuilder("logreg")
x, y = g.input("x", shape=[-1, 3]), g.input("y", shape=[-1, 1])
w, b = g.parameter("w", np.zeros((3, 1))), g.parameter("b", 0.0)
loss = cr.sigmoid_cross_entropy(x @ w + b, y).named("loss")

with cr.Client("127.0.0.1:50051") as client:
    graph = client.create_graph(g)
    history = client.fit(graph.graph_id, {"x": xs, "y": ys}, loss="loss", optimizer=cr.Adam(0.1), batch_size=32)
    history.plot("loss.png")  # needs matplotlib
    svg = client.render(graph.graph_id, {"x": xs, "y": ys}, loss="loss")  # needs Graphviz's dot
"""

from chainrule.tensors import decode, encode

from .builder import (
    GraphBuilder,
    Node,
    abs,
    add,
    average_pool,
    batch_norm,
    conv,
    conv_transpose,
    div,
    dropout,
    exp,
    global_average_pool,
    global_max_pool,
    group_norm,
    instance_norm,
    layer_norm,
    log,
    log_sigmoid,
    log_softmax,
    logsumexp,
    lrn,
    matmul,
    max,
    max_pool,
    maximum,
    mean,
    minimum,
    mul,
    neg,
    pow,
    relu,
    reshape,
    sigmoid,
    sigmoid_cross_entropy,
    softmax,
    softmax_cross_entropy,
    softplus,
    sqrt,
    square,
    sub,
    sum,
    tanh,
    transpose,
)
from .client import Client, GraphInfo
from .errors import ChainruleError, Violation
from .render import RenderError, render_png, render_svg, to_dot
from .streams import GradientStream, TrainStream
from .training import Adam, History, Optimizer, Sgd, TrainStep

__all__ = [
    "Adam",
    "ChainruleError",
    "Client",
    "GradientStream",
    "GraphBuilder",
    "GraphInfo",
    "History",
    "Node",
    "Optimizer",
    "RenderError",
    "Sgd",
    "TrainStep",
    "TrainStream",
    "Violation",
    "abs",
    "add",
    "average_pool",
    "batch_norm",
    "conv",
    "conv_transpose",
    "decode",
    "div",
    "dropout",
    "encode",
    "exp",
    "global_average_pool",
    "global_max_pool",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "log",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "lrn",
    "matmul",
    "max",
    "max_pool",
    "maximum",
    "mean",
    "minimum",
    "mul",
    "neg",
    "pow",
    "relu",
    "render_png",
    "render_svg",
    "reshape",
    "sigmoid",
    "sigmoid_cross_entropy",
    "softmax",
    "softmax_cross_entropy",
    "softplus",
    "sqrt",
    "square",
    "sub",
    "sum",
    "tanh",
    "to_dot",
    "transpose",
]
