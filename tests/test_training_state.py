"""Training mode and graph state end to end, against a real server process.

A small classifier with batch normalization (its running mean and variance are `state` nodes) and
dropout, trained over Train: running statistics equal torch.nn.BatchNorm1d's after the same steps,
GetParameters shows state and SetParameters sets it, Forward and Backward use the running statistics
unless `training` is set (which never changes state), two graphs of one definition trained on the same
batches with the same seed end bit for bit equal, and the state survives a server restart.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chainrule.client as cr
from chainrule import tensors
from chainrule.v1 import graph_pb2
from chainrule.v1 import graph_service_pb2 as pb
from tests.server_process import ServerProcess

RNG = np.random.default_rng(2024)
FEATURES, HIDDEN, CLASSES, ROWS = 4, 3, 2, 8
W1 = RNG.standard_normal((FEATURES, HIDDEN))
W2 = RNG.standard_normal((HIDDEN, CLASSES))
SCALE, BIAS = RNG.uniform(0.5, 1.5, HIDDEN), RNG.standard_normal(HIDDEN) * 0.1
BATCHES = [{"x": RNG.standard_normal((ROWS, FEATURES)) * 2 + 1, "y": RNG.integers(0, CLASSES, ROWS)} for _ in range(6)]
LEARNING_RATE = 0.1
MOMENTUM = 0.2


def model(ratio: float = 0.0) -> graph_pb2.Graph:
    """x @ w1 -> batch_norm (running statistics as state) -> relu -> dropout -> @ w2 -> cross-entropy."""
    g = cr.GraphBuilder("bn-dropout")
    x, y = g.input("x", "float64", [-1, FEATURES]), g.input("y", "int64", [-1])
    mean, var = g.state("mean", np.zeros(HIDDEN)), g.state("var", np.ones(HIDDEN))
    hidden = cr.batch_norm(
        x @ g.parameter("w1", W1), g.parameter("scale", SCALE), g.parameter("bias", BIAS), mean, var,
        momentum=MOMENTUM, name="bn",
    )  # fmt: skip
    dropped = cr.dropout(cr.relu(hidden), ratio, name="drop")
    logits = (dropped @ g.parameter("w2", W2)).named("logits")
    cr.softmax_cross_entropy(logits, y, name="loss")
    return g.to_proto()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address) as connected:
        yield connected


def stored(server: ServerProcess, graph_id: str, names: list[str] | None = None) -> tuple[dict[str, np.ndarray], int]:
    response = server.stub().GetParameters(pb.GetParametersRequest(graph_id=graph_id, names=names or []))
    return {item.name: tensors.decode(item.tensor) for item in response.parameters}, response.step


def train(client: cr.Client, graph_id: str, seed: int = 0, batches: list[dict[str, np.ndarray]] = BATCHES) -> None:
    history = client.fit(graph_id, batches, loss="loss", optimizer=cr.Sgd(LEARNING_RATE), seed=seed)
    assert len(history) == len(batches)


def test_graph_info_lists_state_apart_from_parameters(client: cr.Client, server: ServerProcess) -> None:
    info = client.create_graph(model())
    assert info.state == ("mean", "var")
    assert set(info.parameters) == {"w1", "scale", "bias", "w2"}
    assert client.get_graph(info.graph_id).state == ("mean", "var")
    values, step = stored(server, info.graph_id)
    assert sorted(values) == ["bias", "mean", "scale", "var", "w1", "w2"] and step == 0
    np.testing.assert_array_equal(values["var"], np.ones(HIDDEN))
    only, _ = stored(server, info.graph_id, ["var"])
    assert list(only) == ["var"]
    gradients = dict(client.backward(info.graph_id, BATCHES[0], "loss"))
    assert sorted(gradients) == ["bias", "scale", "w1", "w2"]  # empty wrt: the trainable parameters only


def test_running_statistics_and_parameters_equal_torch_after_several_steps(
    client: cr.Client, server: ServerProcess
) -> None:
    graph_id = client.create_graph(model(ratio=0.0)).graph_id
    losses = client.fit(graph_id, BATCHES, loss="loss", optimizer=cr.Sgd(LEARNING_RATE)).losses

    w1, w2 = (torch.tensor(w, requires_grad=True) for w in (W1, W2))
    norm = torch.nn.BatchNorm1d(HIDDEN, momentum=MOMENTUM, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(SCALE))
        norm.bias.copy_(torch.tensor(BIAS))
    optimizer = torch.optim.SGD([w1, norm.weight, norm.bias, w2], lr=LEARNING_RATE)
    torch_losses = []
    for batch in BATCHES:
        optimizer.zero_grad()
        logits = F.relu(norm(torch.tensor(batch["x"]) @ w1)) @ w2
        loss = F.cross_entropy(logits, torch.tensor(batch["y"]))
        loss.backward()
        optimizer.step()
        torch_losses.append(loss.item())

    np.testing.assert_allclose(losses, torch_losses, rtol=1e-12)
    values, step = stored(server, graph_id)
    assert step == len(BATCHES)
    expected = {
        "mean": norm.running_mean,
        "var": norm.running_var,
        "w1": w1,
        "w2": w2,
        "scale": norm.weight,
        "bias": norm.bias,
    }
    for name, tensor in expected.items():
        np.testing.assert_allclose(values[name], tensor.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
    assert not np.allclose(values["mean"], 0)  # the statistics moved


def test_set_parameters_sets_state_and_forward_normalizes_with_it(client: cr.Client, server: ServerProcess) -> None:
    graph_id = client.create_graph(model()).graph_id
    mean, var = np.array([0.5, -1.0, 2.0]), np.array([4.0, 0.25, 1.0])
    assert client.set_parameters(graph_id, {"mean": mean, "var": var}) == 0
    values, _ = stored(server, graph_id, ["mean", "var"])
    np.testing.assert_array_equal(values["mean"], mean)
    np.testing.assert_array_equal(values["var"], var)
    x = BATCHES[0]["x"]
    out = client.forward(graph_id, {"x": x}, ["bn"])["bn"]
    np.testing.assert_allclose(out, (x @ W1 - mean) / np.sqrt(var + 1e-5) * SCALE + BIAS, rtol=1e-12)
    with pytest.raises(cr.ChainruleError) as raised:
        client.set_parameters(graph_id, {"mean": np.zeros(4)})
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "'mean'" in raised.value.message


def test_forward_and_backward_use_running_statistics_unless_training_which_changes_nothing(
    client: cr.Client, server: ServerProcess
) -> None:
    graph_id = client.create_graph(model(ratio=0.5)).graph_id
    train(client, graph_id, batches=BATCHES[:2])
    before, step = stored(server, graph_id)
    x = BATCHES[3]["x"]
    h = x @ before["w1"]

    inference = client.forward(graph_id, {"x": x}, ["bn", "drop"])
    expected = (h - before["mean"]) / np.sqrt(before["var"] + 1e-5) * before["scale"] + before["bias"]
    np.testing.assert_allclose(inference["bn"], expected, rtol=1e-12)
    np.testing.assert_array_equal(inference["drop"], np.maximum(inference["bn"], 0))  # no dropout

    training = client.forward(graph_id, {"x": x}, ["bn", "drop"], training=True, seed=9)
    batch = (h - h.mean(axis=0)) / np.sqrt(h.var(axis=0) + 1e-5) * before["scale"] + before["bias"]
    np.testing.assert_allclose(training["bn"], batch, rtol=1e-12)
    kept = training["drop"] != 0
    assert 0 < kept.sum() < np.count_nonzero(np.maximum(batch, 0))
    again = client.forward(graph_id, {"x": x}, ["drop"], training=True, seed=9)["drop"]
    np.testing.assert_array_equal(again, training["drop"])
    other = client.forward(graph_id, {"x": x}, ["drop"], training=True, seed=10)["drop"]
    assert not np.array_equal(other, training["drop"])

    feeds = {"x": x, "y": BATCHES[3]["y"]}
    _, inference_grads = client.gradients(graph_id, feeds, "loss", ["w1"])
    _, training_grads = client.gradients(graph_id, feeds, "loss", ["w1"], training=True, seed=9)
    assert not np.allclose(inference_grads["w1"], training_grads["w1"])
    after, step_after = stored(server, graph_id)
    assert step_after == step
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_same_definition_same_batches_same_seed_train_bit_for_bit_equal(
    client: cr.Client, server: ServerProcess
) -> None:
    definition = model(ratio=0.5)
    graphs = [client.create_graph(definition).graph_id for _ in range(3)]
    for graph_id, seed in zip(graphs, [7, 7, 8], strict=True):
        train(client, graph_id, seed=seed)
    first, second, other_seed = (stored(server, graph_id)[0] for graph_id in graphs)
    for name in first:
        assert first[name].tobytes() == second[name].tobytes(), name
    assert any(first[name].tobytes() != other_seed[name].tobytes() for name in first)  # dropout took part
    assert not np.array_equal(first["mean"], np.zeros(HIDDEN))


def test_train_never_trains_state(client: cr.Client) -> None:
    graph_id = client.create_graph(model()).graph_id
    with pytest.raises(cr.ChainruleError) as raised:
        train_stream = client.train(graph_id, BATCHES[:1], loss="loss", optimizer=cr.Sgd(0.1), parameters=["mean"])
        list(train_stream)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'mean' is a state node" in raised.value.message


def test_state_is_committed_with_the_step_and_survives_a_restart(fresh_server: ServerProcess) -> None:
    with cr.Client(fresh_server.address) as client:
        graph_id = client.create_graph(model(ratio=0.5)).graph_id
        stream = client.train(graph_id, BATCHES[:3], loss="loss", optimizer=cr.Sgd(0.1), checkpoint_every=2, seed=3)
        assert [step.step for step in stream] == [1, 2, 3]
    trained, step = stored(fresh_server, graph_id)
    assert step == 3 and not np.array_equal(trained["var"], np.ones(HIDDEN))
    fresh_server.kill()
    restarted = ServerProcess(fresh_server.db).start()
    try:
        values, step = stored(restarted, graph_id)
        assert step == 3
        for name, value in trained.items():
            assert values[name].tobytes() == value.tobytes(), name
        with cr.Client(restarted.address) as client:
            assert client.get_graph(graph_id).state == ("mean", "var")
    finally:
        restarted.kill()
