"""The GraphService end to end: a real server process, real sockets, the raw generated stubs; on both
backends (a SQLite file, then PostgreSQL)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainrule import tensors
from chainrule.v1 import graph_pb2, tensor_pb2
from chainrule.v1 import graph_service_pb2 as pb
from tests.server_process import ServerProcess

pytestmark = pytest.mark.both_backends


def node(name: str, op: str, *inputs: str, value: np.ndarray | None = None, **attrs: object) -> graph_pb2.Node:
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
            message.attrs[key].ints.values.extend(attr)  # type: ignore[call-overload]
    return message


def lecture_graph() -> graph_pb2.Graph:
    """f = (x + y) z, nodes deliberately out of order."""
    return graph_pb2.Graph(
        name="lecture",
        nodes=[
            node("f", "mul", "q", "z"),
            node("q", "add", "x", "y"),
            node("x", "input"),
            node("y", "input"),
            node("z", "input"),
        ],
    )


def mlp_graph() -> graph_pb2.Graph:
    rng = np.random.default_rng(0)
    return graph_pb2.Graph(
        name="mlp",
        nodes=[
            node("x", "input", dtype="float64", shape=[-1, 3]),
            node("w1", "parameter", value=rng.normal(size=(3, 4))),
            node("b1", "parameter", value=np.zeros(4)),
            node("h", "sigmoid", "a"),
            node("a", "add", "xw", "b1"),
            node("xw", "matmul", "x", "w1"),
            node("w2", "parameter", value=rng.normal(size=(4, 1))),
            node("out", "matmul", "h", "w2"),
            node("loss", "mean", "sq"),
            node("sq", "square", "out"),
        ],
    )


def feeds(**values: object) -> dict[str, tensor_pb2.Tensor]:
    return {name: tensors.encode(np.asarray(value)) for name, value in values.items()}


def expect_error(code: grpc.StatusCode, call: Callable[[], object], *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as raised:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)  # type: ignore[call-overload]
    error = raised.value
    assert error.code() == code, error.details()  # type: ignore[attr-defined]
    details: str = error.details()  # type: ignore[attr-defined]
    for fragment in fragments:
        assert fragment in details
    return details


@pytest.fixture(scope="module")
def stub(server: ServerProcess):  # type: ignore[no-untyped-def]
    return server.stub()


@pytest.fixture(scope="module")
def lecture_id(stub) -> str:  # type: ignore[no-untyped-def]
    return stub.CreateGraph(pb.CreateGraphRequest(graph=lecture_graph())).graph.graph_id


# ---------------------------------------------------------------- graph lifecycle
def test_create_reports_topological_order_inputs_and_parameters(stub) -> None:  # type: ignore[no-untyped-def]
    info = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph(), view=graph_pb2.GRAPH_VIEW_FULL)).graph
    order = list(info.topological_order)
    assert sorted(order) == sorted(n.name for n in mlp_graph().nodes)
    for message in mlp_graph().nodes:
        for argument in message.inputs:
            assert order.index(argument) < order.index(message.name)
    assert list(info.inputs) == ["x"]
    assert sorted(info.parameters) == ["b1", "w1", "w2"]
    assert info.step == 0 and info.node_count == 10 and info.name == "mlp"
    assert stub.GetGraph(pb.GetGraphRequest(graph_id=info.graph_id)).graph == info


def test_list_pages_through_every_graph_and_delete_removes_one(stub) -> None:  # type: ignore[no-untyped-def]
    created = [stub.CreateGraph(pb.CreateGraphRequest(graph=lecture_graph())).graph.graph_id for _ in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = stub.ListGraphs(pb.ListGraphsRequest(page_size=2, page_token=token))
        assert len(page.graphs) <= 2
        seen.extend(info.graph_id for info in page.graphs)
        token = page.next_page_token
        if not token:
            break
    assert seen[-5:] == created and len(seen) == len(set(seen))
    stub.DeleteGraph(pb.DeleteGraphRequest(graph_id=created[0]))
    remaining = [info.graph_id for info in stub.ListGraphs(pb.ListGraphsRequest(page_size=1000)).graphs]
    assert created[0] not in remaining and created[1] in remaining
    expect_error(grpc.StatusCode.NOT_FOUND, lambda: stub.GetGraph(pb.GetGraphRequest(graph_id=created[0])), created[0])
    expect_error(
        grpc.StatusCode.NOT_FOUND, lambda: stub.DeleteGraph(pb.DeleteGraphRequest(graph_id=created[0])), created[0]
    )


# ---------------------------------------------------------------- forward and backward
def test_forward_returns_fetches_in_order_including_intermediates(stub, lecture_id: str) -> None:  # type: ignore[no-untyped-def]
    response = stub.Forward(
        pb.ForwardRequest(graph_id=lecture_id, feeds=feeds(x=-2.0, y=5.0, z=-4.0), fetches=["q", "f", "x"])
    )
    assert [output.name for output in response.outputs] == ["q", "f", "x"]
    values = [tensors.decode(output.tensor) for output in response.outputs]
    assert [float(v) for v in values] == [3.0, -12.0, -2.0]
    assert all(v.shape == () for v in values)


def test_forward_needs_only_the_inputs_the_fetches_depend_on(stub, lecture_id: str) -> None:  # type: ignore[no-untyped-def]
    response = stub.Forward(pb.ForwardRequest(graph_id=lecture_id, feeds=feeds(x=1.0, y=2.0), fetches=["q"]))
    assert float(tensors.decode(response.outputs[0].tensor)) == 3.0


def test_backward_streams_lecture_gradients_in_reverse_topological_order(stub, lecture_id: str) -> None:  # type: ignore[no-untyped-def]
    request = pb.BackwardRequest(
        graph_id=lecture_id, feeds=feeds(x=-2.0, y=5.0, z=-4.0), loss="f", wrt=["x", "y", "z", "q"]
    )
    responses = list(stub.Backward(request))
    order = list(stub.GetGraph(pb.GetGraphRequest(graph_id=lecture_id)).graph.topological_order)
    names = [r.name for r in responses]
    assert sorted(names) == ["q", "x", "y", "z"]
    assert names == sorted(names, key=order.index, reverse=True)
    gradients = {r.name: float(tensors.decode(r.gradient)) for r in responses}
    assert gradients == {"x": -4.0, "y": -4.0, "z": 3.0, "q": -4.0}
    assert responses[0].HasField("loss") and float(tensors.decode(responses[0].loss)) == -12.0
    assert not any(r.HasField("loss") for r in responses[1:])


def test_backward_with_empty_wrt_streams_every_parameter_and_loss_grad_seeds_vector_losses(stub) -> None:  # type: ignore[no-untyped-def]
    graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
    x = np.arange(6.0).reshape(2, 3) / 10
    names = [r.name for r in stub.Backward(pb.BackwardRequest(graph_id=graph_id, feeds=feeds(x=x), loss="loss"))]
    assert sorted(names) == ["b1", "w1", "w2"]
    seed = np.array([[1.0], [-2.0]])
    response = list(
        stub.Backward(
            pb.BackwardRequest(
                graph_id=graph_id, feeds=feeds(x=x), loss="out", wrt=["out", "x"], loss_grad=tensors.encode(seed)
            )
        )
    )
    got = {r.name: tensors.decode(r.gradient) for r in response}
    np.testing.assert_array_equal(got["out"], seed)
    assert got["x"].shape == (2, 3)


def test_node_without_path_to_the_loss_gets_zeros_of_its_shape(stub) -> None:  # type: ignore[no-untyped-def]
    graph = graph_pb2.Graph(
        nodes=[
            node("x", "input"),
            node("unused", "input"),
            node("loss", "sum", "x"),
            node("other", "exp", "unused"),
        ]
    )
    graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=graph)).graph.graph_id
    request = pb.BackwardRequest(
        graph_id=graph_id, feeds=feeds(x=np.ones(3), unused=np.ones((2, 2))), loss="loss", wrt=["unused", "other"]
    )
    for response in stub.Backward(request):
        np.testing.assert_array_equal(tensors.decode(response.gradient), np.zeros((2, 2)))


# ---------------------------------------------------------------- errors a client can cause
def _create(stub, *nodes: graph_pb2.Node) -> Callable[[], object]:  # type: ignore[no-untyped-def]
    return lambda: stub.CreateGraph(pb.CreateGraphRequest(graph=graph_pb2.Graph(nodes=nodes)))


BAD_GRAPHS = [
    ("cycle", [node("a", "neg", "b"), node("b", "neg", "a")], ["cycle", "'a'", "'b'"]),
    ("self_loop", [node("a", "add", "a", "a")], ["cycle", "'a'"]),
    ("unknown_op", [node("a", "frobnicate")], ["'a'", "unknown op 'frobnicate'"]),
    ("unknown_input", [node("a", "neg", "ghost")], ["'a'", "'ghost'"]),
    ("duplicate", [node("a", "input"), node("a", "input")], ["'a'", "twice"]),
    ("empty_name", [node("", "input")], ["empty name"]),
    ("arity", [node("x", "input"), node("a", "add", "x")], ["'a'", "takes 2 input(s), got 1"]),
    ("missing_value", [node("w", "parameter")], ["'w'", "needs a value"]),
    (
        "malformed_value",
        [graph_pb2.Node(name="w", op="constant", value=tensor_pb2.Tensor(dtype=2, shape=[3], data=b"\0" * 5))],
        ["'w'", "5 bytes", "needs 24"],
    ),
    (
        "unspecified_dtype",
        [graph_pb2.Node(name="w", op="constant", value=tensor_pb2.Tensor(shape=[], data=b""))],
        ["'w'", "DATA_TYPE_UNSPECIFIED"],
    ),
    ("int_parameter", [node("w", "parameter", value=np.arange(3))], ["'w'", "float32 or float64"]),
    ("unknown_attr", [node("x", "input"), node("s", "sum", "x", axis=1)], ["'s'", "unknown attr 'axis'"]),
    ("attr_kind", [node("x", "input"), node("s", "sum", "x", keepdims=3)], ["'s'", "'keepdims'", "kind 'b'"]),
    ("missing_attr", [node("x", "input"), node("r", "reshape", "x")], ["'r'", "needs attr 'shape'"]),
    (
        "broadcast",
        [
            node("a", "constant", value=np.ones((2, 3))),
            node("b", "constant", value=np.ones(4)),
            node("c", "add", "a", "b"),
        ],
        ["'c'", "cannot be broadcast", "[2, 3]", "[4]"],
    ),
    (
        "matmul_inner",
        [node("a", "input", shape=[2, 3]), node("b", "input", shape=[4, 5]), node("c", "matmul", "a", "b")],
        ["'c'", "inner dimensions"],
    ),
    (
        "reshape_size",
        [node("a", "constant", value=np.ones(6)), node("r", "reshape", "a", shape=[4, 2])],
        ["'r'", "cannot reshape"],
    ),
    ("input_dtype_attr", [node("x", "input", dtype="complex64")], ["'x'", "complex64"]),
]


@pytest.mark.parametrize("nodes, fragments", [(n, f) for _, n, f in BAD_GRAPHS], ids=[i for i, _, _ in BAD_GRAPHS])
def test_invalid_graphs_are_refused_naming_the_node(stub, nodes, fragments) -> None:  # type: ignore[no-untyped-def]
    before = len(stub.ListGraphs(pb.ListGraphsRequest(page_size=1000)).graphs)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, _create(stub, *nodes), *fragments)
    assert len(stub.ListGraphs(pb.ListGraphsRequest(page_size=1000)).graphs) == before


def test_empty_graph_is_refused(stub) -> None:  # type: ignore[no-untyped-def]
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, _create(stub), "no nodes")


def test_request_errors_name_the_tensor_or_node(stub, lecture_id: str) -> None:  # type: ignore[no-untyped-def]
    good = feeds(x=-2.0, y=5.0, z=-4.0)

    def forward(feed: dict[str, tensor_pb2.Tensor], fetches: list[str], graph_id: str = lecture_id) -> Callable:
        return lambda: stub.Forward(pb.ForwardRequest(graph_id=graph_id, feeds=feed, fetches=fetches))

    def backward(feed: dict[str, tensor_pb2.Tensor], loss: str, wrt: list[str]) -> Callable:
        return lambda: stub.Backward(pb.BackwardRequest(graph_id=lecture_id, feeds=feed, loss=loss, wrt=wrt))

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    expect_error(grpc.StatusCode.NOT_FOUND, forward(good, ["f"], "no-such-graph"), "no-such-graph")
    expect_error(invalid, forward(feeds(x=1.0, y=2.0), ["f"]), "input 'z'", "not fed")
    expect_error(invalid, forward(good, ["ghost"]), "fetch 'ghost'")
    expect_error(invalid, forward({**good, "ghost": tensors.encode(np.ones(1))}, ["f"]), "feed 'ghost'")
    expect_error(invalid, forward({**good, "q": tensors.encode(np.ones(1))}, ["f"]), "feed 'q'", "not an input")
    truncated = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT64, shape=[2], data=b"\0" * 8)
    expect_error(invalid, forward({**good, "x": truncated}, ["f"]), "'x'", "8 bytes", "needs 16")
    expect_error(invalid, forward(good, []), "fetches")
    expect_error(invalid, backward(good, "ghost", ["x"]), "loss 'ghost'")
    expect_error(invalid, backward(good, "f", ["x", "ghost"]), "wrt 'ghost'")
    expect_error(invalid, backward(feeds(x=np.ones(2), y=1.0, z=1.0), "f", ["x"]), "loss 'f'", "scalar")
    expect_error(invalid, backward(feeds(x=np.ones(2), y=np.ones(3), z=1.0), "f", ["x"]), "node 'q' (add)", "broadcast")


def test_declared_input_dtype_and_shape_are_enforced(stub) -> None:  # type: ignore[no-untyped-def]
    graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    def forward(x: np.ndarray) -> Callable:
        return lambda: stub.Forward(pb.ForwardRequest(graph_id=graph_id, feeds=feeds(x=x), fetches=["out"]))

    expect_error(invalid, forward(np.ones((2, 3), dtype=np.int64)), "feed 'x'", "int64", "float64")
    expect_error(invalid, forward(np.ones((2, 4))), "feed 'x'", "[2, 4]", "[?, 3]")
    nan_input = np.full((2, 3), np.nan)
    out = stub.Forward(pb.ForwardRequest(graph_id=graph_id, feeds=feeds(x=nan_input), fetches=["out"])).outputs[0]
    assert np.isnan(tensors.decode(out.tensor)).all()


# ---------------------------------------------------------------- availability and persistence
def test_health_is_served_while_a_long_backward_runs(server: ServerProcess, stub) -> None:  # type: ignore[no-untyped-def]
    chain = [node("x", "input")]
    for index in range(30_000):
        chain.append(node(f"n{index}", "tanh", chain[-1].name))
    graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=graph_pb2.Graph(nodes=chain))).graph.graph_id
    done = threading.Event()
    results: list[int] = []

    def run() -> None:
        request = pb.BackwardRequest(graph_id=graph_id, feeds=feeds(x=0.1), loss=chain[-1].name, wrt=["x"])
        results.append(len(list(stub.Backward(request))))
        done.set()

    worker = threading.Thread(target=run)
    worker.start()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    answered = 0
    while not done.is_set() and answered < 50:
        status = health.Check(health_pb2.HealthCheckRequest(service="chainrule.v1.GraphService"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        answered += 1
    worker.join()
    assert results == [1] and answered >= 1


def test_graphs_survive_sigkill_and_restart(fresh_server: ServerProcess) -> None:
    stub = fresh_server.stub()
    info = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph(), view=graph_pb2.GRAPH_VIEW_FULL)).graph
    x = np.linspace(-1, 1, 6).reshape(2, 3)
    before = stub.Forward(pb.ForwardRequest(graph_id=info.graph_id, feeds=feeds(x=x), fetches=["loss"]))
    fresh_server.kill()
    restarted = ServerProcess(fresh_server.db).start()
    try:
        again = restarted.stub()
        assert again.GetGraph(pb.GetGraphRequest(graph_id=info.graph_id)).graph == info
        after = again.Forward(pb.ForwardRequest(graph_id=info.graph_id, feeds=feeds(x=x), fetches=["loss"]))
        assert after == before
    finally:
        restarted.kill()


def test_sigterm_shuts_down_gracefully(fresh_server: ServerProcess) -> None:
    fresh_server.signal(signal.SIGTERM)
    assert fresh_server.process is not None
    assert fresh_server.process.wait(timeout=30) == 0


def test_health_command_reports_serving(server: ServerProcess) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "chainrule.server.cli", "health", "--address", server.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_request_bytes_that_do_not_parse_get_invalid_argument(server: ServerProcess) -> None:
    channel = grpc.insecure_channel(server.address)
    garbage = b"\xff\xff\xff\xff\x0f"
    for method in ("CreateGraph", "Forward", "ListGraphs"):
        call = channel.unary_unary(f"/chainrule.v1.GraphService/{method}")
        details = expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda call=call: call(garbage), "could not be parsed")
        assert "Request" in details
    backward = channel.unary_stream("/chainrule.v1.GraphService/Backward")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: backward(garbage), "BackwardRequest could not be parsed")
    train = channel.stream_stream("/chainrule.v1.GraphService/Train")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: train(iter([garbage])), "TrainRequest could not be parsed")
