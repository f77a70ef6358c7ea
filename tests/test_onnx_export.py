"""ExportOnnx of graphs written natively (not imported): the ops whose ONNX form is several ONNX
ops, and numpy's dtype promotions, which ONNX does not do. Every exported model passes
onnx.checker's full check and gives Forward's outputs in onnxruntime (float32: rtol 1e-4)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnxruntime
import pytest

import chainrule.client as cr
from chainrule import tensors
from chainrule.v1 import graph_pb2
from tests.server_process import ServerProcess

RTOL = 1e-4


def node(name: str, op: str, *inputs: str, value: object = None, **attrs: object) -> graph_pb2.Node:
    message = graph_pb2.Node(name=name, op=op, inputs=inputs)
    if value is not None:
        message.value.CopyFrom(tensors.encode(np.asarray(value)))
    for key, attr in attrs.items():
        if isinstance(attr, bool):
            message.attrs[key].b = attr
        elif isinstance(attr, int):
            message.attrs[key].i = attr
        elif isinstance(attr, float):
            message.attrs[key].f = attr
        elif isinstance(attr, str):
            message.attrs[key].s = attr
        else:
            message.attrs[key].ints.SetInParent()  # an empty list is an attr too
            message.attrs[key].ints.values.extend(attr)  # type: ignore[attr-defined]
    return message


def source(name: str, dtype: str, shape: Sequence[int]) -> graph_pb2.Node:
    return node(name, "input", dtype=dtype, shape=list(shape))


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address, timeout=60) as connected:
        yield connected


def round_trip(
    client: cr.Client, nodes: list[graph_pb2.Node], feeds: dict[str, np.ndarray], outputs: list[str]
) -> None:
    info = client.create_graph(graph_pb2.Graph(name="export", nodes=nodes))
    want = client.forward(info.graph_id, feeds, outputs)
    model = client.export_onnx(info.graph_id, outputs=outputs)
    onnx.checker.check_model(onnx.load_from_string(model), full_check=True)
    session = onnxruntime.InferenceSession(model)
    needed = {value.name for value in session.get_inputs()}
    got = session.run(outputs, {name: value for name, value in feeds.items() if name in needed})
    for name, value in zip(outputs, got, strict=True):
        assert value.dtype == want[name].dtype and value.shape == want[name].shape, name
        scale = float(np.abs(want[name]).max()) if want[name].size and want[name].dtype.kind == "f" else 1.0
        np.testing.assert_allclose(value, want[name], rtol=RTOL, atol=RTOL * scale, err_msg=name)


def test_ops_exported_as_several_onnx_ops(client: cr.Client) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5)).astype(np.float32) * 3
    soft = rng.dirichlet(np.ones(5), 4).astype(np.float32)
    targets = (rng.random((4, 5)) > 0.5).astype(np.float32)
    labels = rng.integers(0, 5, (4, 3)).astype(np.int64)
    scores = rng.standard_normal((4, 3, 5)).astype(np.float32)
    nodes = [
        source("x", "float32", [-1, 5]),
        source("soft", "float32", [-1, 5]),
        source("targets", "float32", [-1, 5]),
        source("labels", "int64", [-1, 3]),
        source("scores", "float32", [-1, 3, 5]),
        node("square", "square", "x"),
        node("log_sigmoid", "log_sigmoid", "x"),
        node("silu", "silu", "x"),
        node("soft_loss", "softmax_cross_entropy", "x", "soft"),
        node("class_loss", "softmax_cross_entropy", "scores", "labels", ignore_index=2),
        node("binary_loss", "sigmoid_cross_entropy", "x", "targets"),
        node("not_equal", "not_equal", "labels", "shifted"),
        node("shifted", "constant", value=np.array([0, 1, 2], np.int64)),
        node("logsumexp", "logsumexp", "x", axes=[1]),
        node("nothing_reduced", "sum", "x", axes=[]),
        node("split", "split", "x", axis=1, splits=[2, 3], index=1),
        node("clip", "clip", "x", min=-1.0, max=2.0),
        node("one_hot", "one_hot", "labels", depth=5, on_value=2.5, off_value=-1.0, dtype="float32"),
        node("pad", "pad", "x", pads=[1, 0, 0, 2], mode="reflect"),
        node("dropout", "dropout", "x", ratio=0.3),
        node("maximum", "maximum", "x", "square"),
    ]
    feeds = {"x": x, "soft": soft, "targets": targets, "labels": labels, "scores": scores}
    outputs = [
        "square",
        "log_sigmoid",
        "silu",
        "soft_loss",
        "class_loss",
        "binary_loss",
        "not_equal",
        "logsumexp",
        "nothing_reduced",
        "split",
        "clip",
        "one_hot",
        "pad",
        "dropout",
        "maximum",
    ]
    round_trip(client, nodes, feeds, outputs)


def test_numpy_promotions_become_casts(client: cr.Client) -> None:
    """int / int is float64, float32 + float64 is float64, the mean of ints is float64, exp of a bool is float64."""
    nodes = [
        source("a", "int64", [3]),
        source("b", "int64", [3]),
        source("f", "float32", [3]),
        source("d", "float64", [3]),
        source("flag", "bool", [3]),
        node("quotient", "div", "a", "b"),
        node("mixed", "add", "f", "d"),
        node("average", "mean", "a"),
        node("grown", "exp", "flag"),
        node("chosen", "where", "flag", "f", "d"),
        node("stacked", "concat", "f", "d", axis=0),
        node("compared", "less", "a", "f"),
    ]
    feeds = {
        "a": np.array([7, -7, 9]),
        "b": np.array([2, 2, -4]),
        "f": np.array([0.5, 1.5, -2.0], np.float32),
        "d": np.array([1e-9, 2.0, 3.0]),
        "flag": np.array([True, False, True]),
    }
    round_trip(client, nodes, feeds, ["quotient", "mixed", "average", "grown", "chosen", "stacked", "compared"])


def test_parameters_and_state_export_as_their_current_values(client: cr.Client) -> None:
    """After SetParameters, the exported initializers are the new values; batch_norm exports in inference form."""
    scale = np.array([1.0, 2.0], np.float32)
    nodes = [
        source("x", "float32", [-1, 2, 3]),
        node("scale", "parameter", value=scale),
        node("bias", "parameter", value=np.zeros(2, np.float32)),
        node("mean", "state", value=np.zeros(2, np.float32)),
        node("var", "state", value=np.ones(2, np.float32)),
        node("normalized", "batch_norm", "x", "scale", "bias", "mean", "var", momentum=0.2),
    ]
    info = client.create_graph(graph_pb2.Graph(name="bn", nodes=nodes))
    client.set_parameters(info.graph_id, {"mean": np.array([0.5, -1.0], np.float32), "bias": np.ones(2, np.float32)})
    model = onnx.load_from_string(client.export_onnx(info.graph_id))
    (batch_norm,) = model.graph.node
    momentum = next(attribute.f for attribute in batch_norm.attribute if attribute.name == "momentum")
    assert momentum == pytest.approx(0.8), "ONNX's momentum is PyTorch's 1 - momentum"
    initial = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    np.testing.assert_array_equal(initial["mean"], [0.5, -1.0])
    np.testing.assert_array_equal(initial["bias"], [1.0, 1.0])
    x = np.random.default_rng(1).standard_normal((3, 2, 3)).astype(np.float32)
    want = client.forward(info.graph_id, {"x": x}, ["normalized"])["normalized"]
    (got,) = onnxruntime.InferenceSession(model.SerializeToString()).run(["normalized"], {"x": x})
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)
