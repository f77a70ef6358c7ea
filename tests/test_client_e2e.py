"""The Python client against a real server on each backend (a SQLite file, then PostgreSQL): numpy in
and out, errors, chunked tensors, fit."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

import chainrule.client as cr
from tests.server_process import ServerProcess

pytestmark = pytest.mark.both_backends


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address) as connected:
        yield connected


def logistic_regression(features: int) -> cr.GraphBuilder:
    graph = cr.GraphBuilder("logreg")
    x, y = graph.input("x", dtype="float64", shape=[-1, features]), graph.input("y", shape=[-1, 1])
    w, b = graph.parameter("w", np.zeros((features, 1))), graph.parameter("b", np.zeros(1))
    cr.sigmoid_cross_entropy(x @ w + b, y, name="loss")
    return graph


def test_builder_graph_round_trip(client: cr.Client) -> None:
    graph = cr.GraphBuilder("lecture")
    x, y, z = graph.input("x"), graph.input("y"), graph.input("z")
    ((x + y).named("q") * z).named("f")
    info = client.create_graph(graph)
    assert info.inputs == ("x", "y", "z") and info.node_count == 5
    assert info.graph_id in [listed.graph_id for listed in client.list_graphs(page_size=1)]
    feeds = {"x": -2.0, "y": 5.0, "z": -4.0}
    assert float(client.forward(info.graph_id, feeds, ["f"])["f"]) == -12.0
    loss, gradients = client.gradients(info.graph_id, feeds, loss="f", wrt=["x", "y", "z"])
    assert float(loss) == -12.0
    assert {name: float(value) for name, value in gradients.items()} == {"x": -4.0, "y": -4.0, "z": 3.0}
    client.delete_graph(info.graph_id)
    with pytest.raises(cr.ChainruleError) as raised:
        client.get_graph(info.graph_id)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND


def test_errors_carry_status_reason_and_culprit(client: cr.Client) -> None:
    graph = cr.GraphBuilder()
    graph.op("add", graph.input("a"), name="broken")
    with pytest.raises(cr.ChainruleError) as raised:
        client.create_graph(graph)
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "node 'broken' (add) takes 2 input(s), got 1" in error.message
    assert error.reason == "WRONG_ARITY"
    assert [violation.field for violation in error.violations] == ["broken"]
    assert str(error).startswith("INVALID_ARGUMENT: ")


def test_gradients_over_4_mib_arrive_chunked_to_a_default_client(client: cr.Client) -> None:
    size = 6 * (1 << 20) // 8
    graph = cr.GraphBuilder("big")
    p = graph.parameter("p", np.zeros(size))
    c = graph.constant(np.arange(size, dtype=np.float64), name="c")
    cr.sum(p * c, name="loss")
    info = client.create_graph(graph)
    loss, gradients = client.gradients(info.graph_id, {}, loss="loss", wrt=["p", "c"])
    np.testing.assert_array_equal(gradients["p"], np.arange(size, dtype=np.float64))
    np.testing.assert_array_equal(gradients["c"], np.zeros(size))
    steps = list(
        client.train(
            info.graph_id, [{}] * 2, loss="loss", optimizer=cr.Sgd(0.5), stream_gradients=True, stream_updates=True
        )
    )
    assert [step.step for step in steps] == [1, 2]
    np.testing.assert_array_equal(steps[0].updates["p"], -0.5 * np.arange(size, dtype=np.float64))
    np.testing.assert_array_equal(steps[1].gradients["p"], np.arange(size, dtype=np.float64))
    after = client.forward(info.graph_id, {}, ["loss"])["loss"]
    assert float(after) == -float(np.sum(np.arange(size, dtype=np.float64) ** 2))
    client.delete_graph(info.graph_id)


def test_fit_trains_remotely_and_parameters_round_trip(client: cr.Client) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 3))
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) > 0).astype(np.float64)
    info = client.create_graph(logistic_regression(3))
    history = client.fit(
        info.graph_id, {"x": x, "y": y}, loss="loss", optimizer=cr.Sgd(0.5, momentum=0.9), batch_size=40, epochs=5
    )
    assert len(history) == 50 and history.steps == list(range(1, 51))
    assert np.mean(history.losses[-10:]) < 0.5 * np.mean(history.losses[:5])
    parameters, step = client.get_parameters_with_step(info.graph_id)
    assert step == 50 and parameters["w"].shape == (3, 1)
    assert client.set_parameters(info.graph_id, {"w": np.ones((3, 1)), "b": np.zeros(1)}) == 50
    np.testing.assert_array_equal(client.get_parameters(info.graph_id, ["w"])["w"], np.ones((3, 1)))


def test_cancelling_a_train_stream_stops_it_quietly(client: cr.Client) -> None:
    info = client.create_graph(logistic_regression(2))
    batch = {"x": np.ones((4, 2)), "y": np.ones((4, 1))}

    def endless() -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield batch

    stream = client.train(info.graph_id, endless(), loss="loss", optimizer=cr.Sgd(0.1))
    received = [next(stream) for _ in range(3)]
    stream.cancel()
    assert list(stream) == [] or all(step.step > 3 for step in stream)
    assert [step.step for step in received] == [1, 2, 3]
    assert client.get_parameters_with_step(info.graph_id)[1] >= 3


def test_a_loss_over_4_mib_arrives_chunked_with_its_gradients(client: cr.Client) -> None:
    size = 5 * (1 << 20) // 8
    graph = cr.GraphBuilder("big loss")
    p = graph.parameter("p", np.linspace(-1, 1, size))
    cr.square(p, name="loss")
    info = client.create_graph(graph)
    seed = np.full(size, 0.5)
    loss, gradients = client.gradients(info.graph_id, {}, loss="loss", wrt=["p"], loss_grad=seed)
    np.testing.assert_array_equal(loss, np.linspace(-1, 1, size) ** 2)
    np.testing.assert_array_equal(gradients["p"], np.linspace(-1, 1, size))
    client.delete_graph(info.graph_id)
