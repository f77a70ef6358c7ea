"""The Train stream and the parameter RPCs end to end, against a real server process on each backend
(a SQLite file, then PostgreSQL)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from chainrule import tensors
from chainrule.v1 import graph_pb2, tensor_pb2
from chainrule.v1 import graph_service_pb2 as pb
from tests.server_process import ServerProcess
from tests.test_service import expect_error, feeds, mlp_graph, node

pytestmark = pytest.mark.both_backends

RNG = np.random.default_rng(7)
X = RNG.normal(size=(8, 3))


def sgd(learning_rate: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> pb.Optimizer:
    return pb.Optimizer(
        sgd=pb.Sgd(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    )


def config(graph_id: str, optimizer: pb.Optimizer, **options: object) -> pb.TrainRequest:
    return pb.TrainRequest(
        config=pb.TrainConfig(graph_id=graph_id, loss="loss", optimizer=optimizer, **options)  # type: ignore[arg-type]
    )


def batches(count: int, x: np.ndarray = X) -> list[pb.TrainRequest]:
    return [pb.TrainRequest(batch=pb.Batch(feeds=feeds(x=x))) for _ in range(count)]


def decoded(named: list[tensor_pb2.NamedTensor]) -> dict[str, np.ndarray]:
    return {item.name: tensors.decode(item.tensor) for item in named}


def parameters(stub, graph_id: str) -> tuple[dict[str, np.ndarray], int]:  # type: ignore[no-untyped-def]
    response = stub.GetParameters(pb.GetParametersRequest(graph_id=graph_id))
    return decoded(list(response.parameters)), response.step


@pytest.fixture(scope="module")
def stub(server: ServerProcess):  # type: ignore[no-untyped-def]
    return server.stub()


def new_graph(stub) -> str:  # type: ignore[no-untyped-def]
    return stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id


def test_sgd_update_is_minus_learning_rate_times_backward_gradient(stub) -> None:  # type: ignore[no-untyped-def]
    graph_id = new_graph(stub)
    backward = {
        r.name: tensors.decode(r.gradient)
        for r in stub.Backward(pb.BackwardRequest(graph_id=graph_id, feeds=feeds(x=X), loss="loss"))
    }
    requests = [config(graph_id, sgd(0.1), stream_gradients=True, stream_updates=True), *batches(1)]
    (response,) = list(stub.Train(iter(requests)))
    assert response.step == 1
    gradients, updates = decoded(list(response.gradients)), decoded(list(response.updates))
    assert sorted(gradients) == sorted(updates) == ["b1", "w1", "w2"]
    for name, gradient in gradients.items():
        np.testing.assert_array_equal(gradient, backward[name])
        np.testing.assert_array_equal(updates[name], -0.1 * gradient)


@pytest.mark.parametrize("stream_updates", [False, True])
def test_a_scalar_parameter_trains(stub, stream_updates: bool) -> None:  # type: ignore[no-untyped-def]
    """loss = sum((x * w)^2) over x = [1, 1, 1] has gradient 6w; w = 0.5 steps to 0.5 - 0.1 * 3."""
    graph = graph_pb2.Graph(
        nodes=[
            node("x", "input", dtype="float64", shape=[3]),
            node("w", "parameter", value=np.array(0.5)),
            node("xw", "mul", "x", "w"),
            node("squares", "mul", "xw", "xw"),
            node("loss", "sum", "squares"),
        ]
    )
    graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=graph)).graph.graph_id
    requests = [config(graph_id, sgd(0.1), stream_updates=stream_updates), *batches(2, np.ones(3))]
    responses = list(stub.Train(iter(requests)))
    assert [response.step for response in responses] == [1, 2]
    values, step = parameters(stub, graph_id)
    assert step == 2 and values["w"].shape == ()
    np.testing.assert_allclose(values["w"], (0.5 - 0.1 * 3.0) * (1 - 0.6), rtol=1e-12)


def test_parameters_after_a_stream_are_initial_plus_streamed_updates_bit_for_bit(stub) -> None:  # type: ignore[no-untyped-def]
    graph_id = new_graph(stub)
    initial, step = parameters(stub, graph_id)
    assert step == 0
    requests = [config(graph_id, sgd(0.05, momentum=0.9), stream_updates=True), *batches(20)]
    responses = list(stub.Train(iter(requests)))
    assert [r.step for r in responses] == list(range(1, 21))
    expected = dict(initial)
    for response in responses:
        for name, update in decoded(list(response.updates)).items():
            expected[name] = expected[name] + update
    final, step = parameters(stub, graph_id)
    assert step == 20
    for name in expected:
        assert final[name].tobytes() == expected[name].tobytes()
    forward = stub.Forward(pb.ForwardRequest(graph_id=graph_id, feeds=feeds(x=X), fetches=["loss"]))
    assert float(tensors.decode(forward.outputs[0].tensor)) < responses[0].loss


def reference_updates(optimizer: str, gradients: list[np.ndarray], params: list[np.ndarray]) -> list[np.ndarray]:
    """PyTorch's update rules, written out by hand for one parameter over several steps."""
    lr, momentum, decay = 0.1, 0.9, 0.01
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    buffer = m = v = None
    out = []
    for t, (g, p) in enumerate(zip(gradients, params, strict=True), start=1):
        if optimizer == "momentum":
            buffer = g if buffer is None else momentum * buffer + g
            out.append(-lr * buffer)
        elif optimizer == "nesterov":
            buffer = g if buffer is None else momentum * buffer + g
            out.append(-lr * (g + momentum * buffer))
        elif optimizer == "weight_decay":
            out.append(-lr * (g + decay * p))
        else:
            g = g + decay * p
            m = (1 - beta1) * g if m is None else beta1 * m + (1 - beta1) * g
            v = (1 - beta2) * g * g if v is None else beta2 * v + (1 - beta2) * g * g
            m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
            out.append(-lr * m_hat / (np.sqrt(v_hat) + eps))
    return out


OPTIMIZERS = {
    "momentum": sgd(0.1, momentum=0.9),
    "nesterov": sgd(0.1, momentum=0.9, nesterov=True),
    "weight_decay": sgd(0.1, weight_decay=0.01),
    "adam": pb.Optimizer(adam=pb.Adam(learning_rate=0.1, weight_decay=0.01)),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_optimizers_follow_pytorch_formulas_over_several_steps(stub, kind: str) -> None:  # type: ignore[no-untyped-def]
    graph_id = new_graph(stub)
    initial, _ = parameters(stub, graph_id)
    xs = [RNG.normal(size=(8, 3)) for _ in range(5)]
    requests = [config(graph_id, OPTIMIZERS[kind], stream_gradients=True, stream_updates=True)]
    requests += [pb.TrainRequest(batch=pb.Batch(feeds=feeds(x=x))) for x in xs]
    responses = list(stub.Train(iter(requests)))
    for name in initial:
        gradients = [decoded(list(r.gradients))[name] for r in responses]
        updates = [decoded(list(r.updates))[name] for r in responses]
        params = [initial[name]]
        for update in updates[:-1]:
            params.append(params[-1] + update)
        for got, want in zip(updates, reference_updates(kind, gradients, params), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-15)


def seed_network() -> graph_pb2.Graph:
    """The lecture's 2-layer sigmoid network with -J (binary cross-entropy) as the loss."""
    rng = np.random.default_rng(3)
    return graph_pb2.Graph(
        name="seed",
        nodes=[
            node("x", "input", dtype="float64", shape=[-1, 2]),
            node("y_star", "input", dtype="float64", shape=[-1, 1]),
            node("alpha", "parameter", value=rng.normal(size=(2, 4))),
            node("beta", "parameter", value=rng.normal(size=(4, 1))),
            node("a", "matmul", "x", "alpha"),
            node("z", "sigmoid", "a"),
            node("b", "matmul", "z", "beta"),
            node("loss", "sigmoid_cross_entropy", "b", "y_star"),
        ],
    )


def test_loss_decreases_on_the_seed_network(stub) -> None:  # type: ignore[no-untyped-def]
    graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=seed_network())).graph.graph_id
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2))
    y = (x[:, :1] + 2 * x[:, 1:] > 0).astype(np.float64)
    requests = [config(graph_id, pb.Optimizer(adam=pb.Adam(learning_rate=0.05)))]
    requests += [pb.TrainRequest(batch=pb.Batch(feeds=feeds(x=x, y_star=y))) for _ in range(300)]
    losses = [r.loss for r in stub.Train(iter(requests))]
    assert len(losses) == 300
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert all(later <= earlier + 1e-3 for earlier, later in zip(losses[:-50:50], losses[50::50], strict=True))


def test_a_bad_batch_ends_the_stream_and_keeps_the_last_good_step(stub) -> None:  # type: ignore[no-untyped-def]
    graph_id = new_graph(stub)
    wrong = pb.TrainRequest(batch=pb.Batch(feeds=feeds(x=np.ones((8, 5)))))
    requests = [config(graph_id, sgd(0.1), stream_updates=True), *batches(3), wrong, *batches(2)]
    received: list[pb.TrainResponse] = []

    def run() -> None:
        for response in stub.Train(iter(requests)):
            received.append(response)

    expect_error(grpc.StatusCode.INVALID_ARGUMENT, run, "batch 3", "feed 'x'", "[8, 5]")
    assert [r.step for r in received] == [1, 2, 3]
    after_three, step = parameters(stub, graph_id)
    assert step == 3
    missing = pb.TrainRequest(batch=pb.Batch())
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.Train(iter([config(graph_id, sgd(0.1)), *batches(1), missing])),
        "batch 1",
        "input 'x'",
    )
    nan_batch = pb.TrainRequest(batch=pb.Batch(feeds=feeds(x=np.full((8, 3), np.nan))))
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: stub.Train(iter([config(graph_id, sgd(0.1), stop_on_non_finite_loss=True), nan_batch])),
        "batch 0",
        "nan",
    )
    final, step = parameters(stub, graph_id)
    assert step == 4
    assert all(np.isfinite(value).all() for value in final.values())


def test_stream_protocol_errors(stub) -> None:  # type: ignore[no-untyped-def]
    graph_id = new_graph(stub)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    expect_error(invalid, lambda: stub.Train(iter(batches(1))), "first TrainRequest must carry a config")
    expect_error(invalid, lambda: stub.Train(iter([])), "first TrainRequest must carry a config")
    two_configs = [config(graph_id, sgd(0.1)), *batches(1), config(graph_id, sgd(0.1))]
    expect_error(invalid, lambda: stub.Train(iter(two_configs)), "batch 1", "only be the first")
    expect_error(grpc.StatusCode.NOT_FOUND, lambda: stub.Train(iter([config("nope", sgd(0.1))])), "nope")
    expect_error(invalid, lambda: stub.Train(iter([config(graph_id, pb.Optimizer())])), "optimizer")
    expect_error(invalid, lambda: stub.Train(iter([config(graph_id, sgd(-1.0))])), "learning_rate")
    expect_error(
        invalid,
        lambda: stub.Train(
            iter([pb.TrainRequest(config=pb.TrainConfig(graph_id=graph_id, loss="ghost", optimizer=sgd(1)))])
        ),
        "loss 'ghost'",
    )
    unknown_parameter = config(graph_id, sgd(0.1), parameters=["x"])
    expect_error(invalid, lambda: stub.Train(iter([unknown_parameter])), "parameter 'x'", "not a parameter")


def test_set_parameters_checks_shape_and_dtype_and_forward_uses_them(stub) -> None:  # type: ignore[no-untyped-def]
    graph_id = new_graph(stub)
    current, _ = parameters(stub, graph_id)
    zeros = {name: np.zeros_like(value) for name, value in current.items()}
    response = stub.SetParameters(pb.SetParametersRequest(graph_id=graph_id, parameters=tensors.encode_named(zeros)))
    assert response.step == 0
    out = stub.Forward(pb.ForwardRequest(graph_id=graph_id, feeds=feeds(x=X), fetches=["out"])).outputs[0]
    np.testing.assert_array_equal(tensors.decode(out.tensor), np.zeros((8, 1)))
    only_w2 = stub.GetParameters(pb.GetParametersRequest(graph_id=graph_id, names=["w2"]))
    assert [p.name for p in only_w2.parameters] == ["w2"]
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    def set_(name: str, value: np.ndarray) -> object:
        return lambda: stub.SetParameters(
            pb.SetParametersRequest(graph_id=graph_id, parameters=tensors.encode_named({name: value}))
        )

    expect_error(invalid, set_("w2", np.zeros((4, 2))), "parameter 'w2'", "[4, 1]", "[4, 2]")
    expect_error(invalid, set_("w2", np.zeros((4, 1), dtype=np.float32)), "parameter 'w2'", "float32")
    expect_error(invalid, set_("x", np.zeros(3)), "parameter 'x'")
    expect_error(
        invalid, lambda: stub.GetParameters(pb.GetParametersRequest(graph_id=graph_id, names=["ghost"])), "'ghost'"
    )


class LockstepStream:
    """Sends one batch, waits for its response, and so on: the test knows exactly which steps ran."""

    def __init__(self, stub, graph_id: str, **options: object) -> None:  # type: ignore[no-untyped-def]
        self.outbox: queue.Queue[pb.TrainRequest | None] = queue.Queue()
        self.outbox.put(config(graph_id, sgd(0.05, momentum=0.5), stream_updates=True, **options))
        self.call = stub.Train(self._requests())
        self.responses: list[pb.TrainResponse] = []

    def _requests(self) -> Iterator[pb.TrainRequest]:
        while (request := self.outbox.get()) is not None:
            yield request

    def step(self) -> pb.TrainResponse:
        self.outbox.put(batches(1)[0])
        response = next(self.call)
        self.responses.append(response)
        return response

    def close(self) -> list[pb.TrainResponse]:
        self.outbox.put(None)
        self.responses.extend(self.call)
        return self.responses


def replay(initial: dict[str, np.ndarray], responses: list[pb.TrainResponse], upto: int) -> dict[str, np.ndarray]:
    params = dict(initial)
    for response in responses[:upto]:
        for name, update in decoded(list(response.updates)).items():
            params[name] = params[name] + update
    return params


def assert_same_bits(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name


def test_finished_stream_survives_sigkill_exactly(fresh_server: ServerProcess) -> None:
    stub = fresh_server.stub()
    graph_id = new_graph(stub)
    initial, _ = parameters(stub, graph_id)
    responses = list(stub.Train(iter([config(graph_id, sgd(0.05), stream_updates=True), *batches(7)])))
    fresh_server.kill()
    restarted = ServerProcess(fresh_server.db).start()
    try:
        recovered, step = parameters(restarted.stub(), graph_id)
        assert step == 7
        assert_same_bits(recovered, replay(initial, responses, 7))
    finally:
        restarted.kill()


def test_sigkill_mid_stream_recovers_one_committed_checkpoint(fresh_server: ServerProcess) -> None:
    stub = fresh_server.stub()
    graph_id = new_graph(stub)
    initial, _ = parameters(stub, graph_id)
    stream = LockstepStream(stub, graph_id, checkpoint_every=3)
    for _ in range(8):
        stream.step()
    fresh_server.kill()
    restarted = ServerProcess(fresh_server.db).start()
    try:
        again = restarted.stub()
        recovered, step = parameters(again, graph_id)
        assert step == 6
        assert_same_bits(recovered, replay(initial, stream.responses, step))
        follow_up = list(again.Train(iter([config(graph_id, sgd(0.05)), *batches(1)])))
        assert follow_up[0].step == 7
    finally:
        restarted.kill()


def test_a_cancelled_stream_keeps_and_commits_its_completed_steps(fresh_server: ServerProcess) -> None:
    stub = fresh_server.stub()
    graph_id = new_graph(stub)
    initial, _ = parameters(stub, graph_id)
    stream = LockstepStream(stub, graph_id, checkpoint_every=1000)
    for _ in range(4):
        stream.step()
    stream.call.cancel()
    # The server logs a call's end after its stream has committed; kill only once that is done.
    for _ in range(600):
        if any(" Train CANCELLED " in line for line in fresh_server.log):
            break
        threading.Event().wait(0.05)
    assert any(" Train CANCELLED " in line for line in fresh_server.log), "".join(fresh_server.log)
    assert parameters(stub, graph_id)[1] == 4
    fresh_server.kill()
    restarted = ServerProcess(fresh_server.db).start()
    try:
        recovered, step = parameters(restarted.stub(), graph_id)
        assert step == 4
        assert_same_bits(recovered, replay(initial, stream.responses, 4))
    finally:
        restarted.kill()


def test_concurrent_streams_on_one_graph_apply_whole_steps(stub) -> None:  # type: ignore[no-untyped-def]
    graph_id = new_graph(stub)
    other_id = new_graph(stub)
    initial, _ = parameters(stub, graph_id)
    results: dict[str, list[pb.TrainResponse]] = {}

    def train(key: str, target: str) -> None:
        requests = [config(target, sgd(0.01), stream_updates=True), *batches(30)]
        results[key] = list(stub.Train(iter(requests)))

    threads = [
        threading.Thread(target=train, args=("a", graph_id)),
        threading.Thread(target=train, args=("b", graph_id)),
        threading.Thread(target=train, args=("other", other_id)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged = sorted(results["a"] + results["b"], key=lambda r: r.step)
    assert [r.step for r in merged] == list(range(1, 61))
    final, step = parameters(stub, graph_id)
    assert step == 60
    assert_same_bits(final, replay(initial, merged, 60))
    assert [r.step for r in results["other"]] == list(range(1, 31))
