"""Client logic that needs no server: fit's batching, stream handling and the grpc.RpcError conversion.

The stub is replaced by fakes that answer in-process, so nothing here opens a connection.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

import chainrule.client as cr
from chainrule import tensors
from chainrule.client.errors import from_rpc_error
from chainrule.client.training import array_batches, plan_batches
from chainrule.v1 import graph_pb2
from chainrule.v1 import graph_service_pb2 as pb


# ---------------------------------------------------------------- fakes
class FakeRpcError(grpc.RpcError, grpc.Call):
    """What a channel raises: an RpcError that is also the failed Call."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, Any]] = ()) -> None:
        self._code, self._details, self._trailing = code, details, tuple(trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class FakeCall:
    """A response stream: yields `responses`, then raises `error` if given (or CANCELLED once cancelled)."""

    def __init__(self, responses: Iterable[Any], error: grpc.RpcError | None = None) -> None:
        self.responses = list(responses)
        self.error = error
        self.cancelled = False

    def __iter__(self) -> Iterator[Any]:
        for response in self.responses:
            if self.cancelled:
                raise FakeRpcError(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")
            yield response
        if self.error is not None:
            raise self.error

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeStub:
    """Records every request; Train consumes the request stream eagerly and answers each batch."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any, dict[str, Any]]] = []
        self.errors: dict[str, grpc.RpcError] = {}
        self.responses: dict[str, Any] = {}
        self.train_error: grpc.RpcError | None = None

    def _record(self, method: str, request: Any, options: dict[str, Any]) -> Any:
        self.requests.append((method, request, options))
        if method in self.errors:
            raise self.errors[method]
        response = self.responses.get(method)
        return response(request) if callable(response) else response

    def __getattr__(self, method: str) -> Any:
        return lambda request, **options: self._record(method, request, options)

    def Backward(self, request: pb.BackwardRequest, **options: Any) -> FakeCall:
        self.requests.append(("Backward", request, options))
        return self.responses["Backward"]  # type: ignore[no-any-return]

    def Train(self, requests: Iterator[pb.TrainRequest], **options: Any) -> FakeCall:
        received = list(requests)
        self.requests.append(("Train", received, options))
        batches = [request.batch for request in received[1:]]
        responses = [pb.TrainResponse(step=index + 1, loss=1.0 / (index + 1)) for index in range(len(batches))]
        return FakeCall(responses, self.train_error)


@pytest.fixture
def stub() -> FakeStub:
    return FakeStub()


@pytest.fixture
def client(stub: FakeStub) -> Iterator[cr.Client]:
    with cr.Client("127.0.0.1:1", timeout=5.0) as client:  # never dialled: calls go to the fake
        client._stub = stub  # type: ignore[assignment]
        yield client


def sent_batches(stub: FakeStub) -> list[dict[str, np.ndarray]]:
    ((_, received, _),) = [entry for entry in stub.requests if entry[0] == "Train"]
    return [{name: tensors.decode(t, name) for name, t in request.batch.feeds.items()} for request in received[1:]]


def rich_status(code: grpc.StatusCode, message: str, *details: Any) -> tuple[str, bytes]:
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)
    return ("grpc-status-details-bin", status.SerializeToString())


# ---------------------------------------------------------------- batching
def test_unshuffled_arrays_are_cut_in_order_with_a_short_last_batch() -> None:
    data = {"x": np.arange(10.0).reshape(10, 1), "y": np.arange(10)}
    batches, total = plan_batches(data, batch_size=4, epochs=2, shuffle=False, seed=0)
    batches = list(batches)
    assert total == len(batches) == 6
    assert [len(batch["y"]) for batch in batches] == [4, 4, 2, 4, 4, 2]
    assert np.concatenate([batch["y"] for batch in batches]).tolist() == list(range(10)) * 2
    np.testing.assert_array_equal(batches[1]["x"][:, 0], batches[1]["y"])


def test_shuffled_epochs_are_permutations_that_differ_but_repeat_with_the_seed() -> None:
    data = {"x": np.arange(20.0) * 10, "y": np.arange(20)}
    first = list(plan_batches(data, batch_size=6, epochs=3, shuffle=True, seed=7)[0])
    again = list(plan_batches(data, batch_size=6, epochs=3, shuffle=True, seed=7)[0])
    other = list(plan_batches(data, batch_size=6, epochs=3, shuffle=True, seed=8)[0])
    epochs = [np.concatenate([batch["y"] for batch in first[i * 4 : (i + 1) * 4]]) for i in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(20))
    assert epochs[0].tolist() != epochs[1].tolist() != list(range(20))
    for batch in first:
        np.testing.assert_array_equal(batch["x"], batch["y"] * 10)  # rows stay aligned across arrays
    assert all(np.array_equal(a["y"], b["y"]) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a["y"], b["y"]) for a, b in zip(first, other, strict=True))


def test_array_batches_follow_numpys_generator_exactly() -> None:
    data = {"y": np.arange(5)}
    batches = list(array_batches(data, 5, 2, np.random.default_rng(3)))
    expected = np.random.default_rng(3)
    assert [batch["y"].tolist() for batch in batches] == [expected.permutation(5).tolist() for _ in range(2)]


def test_no_batch_size_means_the_whole_data_set_per_step() -> None:
    batches, total = plan_batches({"x": np.ones((7, 2))}, batch_size=None, epochs=3, shuffle=False, seed=0)
    assert total == 3
    assert [batch["x"].shape for batch in batches] == [(7, 2)] * 3


def test_ready_batches_repeat_per_epoch_and_one_shot_iterators_refuse_several_epochs() -> None:
    ready = [{"x": np.ones(2)}, {"x": np.zeros(2)}]
    batches, total = plan_batches(ready, batch_size=None, epochs=2, shuffle=True, seed=0)
    assert total == 4 and list(batches) == ready * 2
    batches, total = plan_batches(iter(ready), batch_size=None, epochs=1, shuffle=True, seed=0)
    assert total is None and list(batches) == ready
    with pytest.raises(ValueError, match="iterated again"):
        plan_batches(iter(ready), batch_size=None, epochs=2, shuffle=True, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches(ready, batch_size=2, epochs=1, shuffle=True, seed=0)


@pytest.mark.parametrize(
    ("data", "batch_size", "epochs", "message"),
    [
        ({"x": np.ones(3), "y": np.ones(4)}, 2, 1, "same length"),
        ({"x": np.float64(1.0)}, 1, 1, "first"),
        ({"x": np.ones((0, 2))}, 1, 1, "empty"),
        ({}, 1, 1, "no arrays"),
        ({"x": np.ones(3)}, 0, 1, "batch_size"),
        ({"x": np.ones(3)}, 1, 0, "epochs"),
    ],
)
def test_bad_array_data_is_refused_before_anything_is_sent(
    data: dict[str, Any], batch_size: int, epochs: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_batches(data, batch_size=batch_size, epochs=epochs, shuffle=True, seed=0)


# ---------------------------------------------------------------- fit and train
def test_fit_streams_one_config_then_every_batch_and_records_the_history(client: cr.Client, stub: FakeStub) -> None:
    data = {"x": np.arange(10.0).reshape(5, 2), "y": np.arange(5.0)}
    history = client.fit(
        "g1",
        data,
        loss="loss",
        optimizer=cr.Adam(0.1),
        batch_size=2,
        epochs=2,
        shuffle=False,
        progress=False,
        parameters=["w"],
        checkpoint_every=3,
    )
    ((_, received, options),) = stub.requests
    config = received[0].config
    assert (config.graph_id, config.loss, list(config.parameters), config.checkpoint_every) == ("g1", "loss", ["w"], 3)
    assert config.optimizer.WhichOneof("kind") == "adam" and config.optimizer.adam.learning_rate == 0.1
    assert options.get("timeout") is None, "a training stream must not inherit the per-call deadline"
    assert [len(batch["y"]) for batch in sent_batches(stub)] == [2, 2, 1, 2, 2, 1]
    assert len(history) == 6 and history.steps == [1, 2, 3, 4, 5, 6]
    assert history.losses == pytest.approx([1 / n for n in range(1, 7)])
    assert history.last == cr.TrainStep(step=6, loss=pytest.approx(1 / 6), gradients={}, updates={})


def test_fit_shuffles_with_the_seed(client: cr.Client, stub: FakeStub) -> None:
    client.fit("g1", {"y": np.arange(8)}, loss="loss", optimizer=cr.Sgd(0.1), batch_size=8, seed=5, progress=False)
    assert sent_batches(stub)[0]["y"].tolist() == np.random.default_rng(5).permutation(8).tolist()


def test_train_keeps_feed_dtypes_and_sends_python_floats_as_float64(client: cr.Client, stub: FakeStub) -> None:
    steps = list(client.train("g1", [{"x": np.ones(2, np.float32), "y": 1.5}], loss="l", optimizer=cr.Sgd(0.5)))
    assert [step.step for step in steps] == [1]
    (batch,) = sent_batches(stub)
    assert batch["x"].dtype == np.float32 and batch["y"].dtype == np.float64 and batch["y"].shape == ()


def test_a_failing_batch_iterable_ends_the_stream_after_the_batches_already_sent(
    client: cr.Client, stub: FakeStub
) -> None:
    def batches() -> Iterator[dict[str, float]]:
        yield {"x": 1.0}
        yield {"x": 2.0}
        raise RuntimeError("loader broke")

    stream = client.train("g1", batches(), loss="l", optimizer=cr.Sgd(0.1))
    assert [step.step for step in [next(stream), next(stream)]] == [1, 2]
    with pytest.raises(RuntimeError, match="loader broke"):
        next(stream)
    with pytest.raises(StopIteration):
        next(stream)


def test_a_feed_that_cannot_be_encoded_is_raised_on_the_callers_thread(client: cr.Client, stub: FakeStub) -> None:
    stream = client.train("g1", [{"x": 1.0}, {"x": np.array(["text"])}], loss="l", optimizer=cr.Sgd(0.1))
    with pytest.raises(tensors.TensorError, match="x"):
        list(stream)


def test_cancel_ends_a_stream_quietly_but_a_server_cancel_is_an_error(client: cr.Client, stub: FakeStub) -> None:
    stream = client.train("g1", [{"x": 1.0}] * 5, loss="l", optimizer=cr.Sgd(0.1))
    seen = []
    for step in stream:
        seen.append(step.step)
        stream.cancel()
    assert seen == [1]

    stub.train_error = FakeRpcError(grpc.StatusCode.CANCELLED, "server shutting down")
    with pytest.raises(cr.ChainruleError) as raised:
        list(client.train("g1", [{"x": 1.0}], loss="l", optimizer=cr.Sgd(0.1)))
    assert raised.value.code == grpc.StatusCode.CANCELLED


def test_an_error_mid_training_is_a_chainrule_error_after_the_steps_before_it(
    client: cr.Client, stub: FakeStub
) -> None:
    stub.train_error = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "batch 2: loss is nan")
    steps: list[int] = []
    with pytest.raises(cr.ChainruleError, match="batch 2: loss is nan") as raised:
        for step in client.train("g1", [{"x": 1.0}] * 2, loss="l", optimizer=cr.Sgd(0.1)):
            steps.append(step.step)
    assert steps == [1, 2]
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_optimizers_convert_to_the_wire_messages() -> None:
    sgd = cr.Sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4).to_proto()
    assert sgd.WhichOneof("kind") == "sgd"
    assert (sgd.sgd.learning_rate, sgd.sgd.momentum, sgd.sgd.nesterov, sgd.sgd.weight_decay) == (0.1, 0.9, True, 1e-4)
    adam = cr.Adam().to_proto().adam
    assert (adam.learning_rate, adam.beta1, adam.beta2, adam.epsilon, adam.weight_decay) == (1e-3, 0.9, 0.999, 1e-8, 0)
    with pytest.raises(ValueError, match="beta1"):
        cr.Adam(beta1=0.0)


# ---------------------------------------------------------------- unary calls and backward
def test_forward_sends_feeds_and_returns_outputs_in_fetch_order(client: cr.Client, stub: FakeStub) -> None:
    stub.responses["Forward"] = pb.ForwardResponse(
        outputs=tensors.encode_named({"b": np.array(2, np.float32), "a": np.ones((2, 2))})
    )
    outputs = client.forward("g1", {"x": 3.0, "n": np.array([1, 2], np.int32)}, ["b", "a"])
    assert list(outputs) == ["b", "a"] and outputs["b"].dtype == np.float32
    ((_, request, options),) = stub.requests
    assert list(request.fetches) == ["b", "a"] and options == {"timeout": 5.0}
    assert tensors.decode(request.feeds["x"]).dtype == np.float64
    assert tensors.decode(request.feeds["n"]).dtype == np.int32


def test_a_lone_string_is_one_name(client: cr.Client, stub: FakeStub) -> None:
    stub.responses["Forward"] = pb.ForwardResponse()
    client.forward("g1", {}, "loss")
    assert list(stub.requests[0][1].fetches) == ["loss"]


def test_list_graphs_follows_every_page(client: cr.Client, stub: FakeStub) -> None:
    pages = {
        "": pb.ListGraphsResponse(graphs=[graph_pb2.GraphInfo(graph_id="a")], next_page_token="t1"),
        "t1": pb.ListGraphsResponse(graphs=[graph_pb2.GraphInfo(graph_id="b")], next_page_token="t2"),
        "t2": pb.ListGraphsResponse(graphs=[graph_pb2.GraphInfo(graph_id="c")]),
    }
    stub.responses["ListGraphs"] = lambda request: pages[request.page_token]
    assert [info.graph_id for info in client.list_graphs(page_size=1)] == ["a", "b", "c"]


def test_graph_info_mirrors_the_message(client: cr.Client, stub: FakeStub) -> None:
    message = graph_pb2.GraphInfo(graph_id="g", name="n", topological_order=["x", "y"], inputs=["x"], step=4)
    stub.responses["GetGraph"] = pb.GetGraphResponse(graph=message)
    info = client.get_graph("g")
    assert info == cr.GraphInfo("g", "n", ("x", "y"), ("x",), (), 4, 0, None)
    message.create_time.FromSeconds(86400)
    stub.responses["CreateGraph"] = pb.CreateGraphResponse(graph=message)
    assert client.create_graph(graph_pb2.Graph()).create_time == datetime(1970, 1, 2, tzinfo=UTC)


def test_create_graph_accepts_a_builder(client: cr.Client, stub: FakeStub) -> None:
    stub.responses["CreateGraph"] = pb.CreateGraphResponse(graph=graph_pb2.GraphInfo(graph_id="g"))
    g = cr.GraphBuilder("m")
    g.input("x")
    client.create_graph(g)
    assert stub.requests[0][1].graph == g.to_proto()


def test_parameters_round_trip_the_step(client: cr.Client, stub: FakeStub) -> None:
    stub.responses["StreamParameters"] = lambda request: FakeCall(
        [pb.StreamParametersResponse(parameters=tensors.encode_named({"w": np.ones(2)}), step=9)]
    )
    values, step = client.get_parameters_with_step("g", ["w"])
    assert step == 9 and list(values) == ["w"]
    assert list(client.get_parameters("g")) == ["w"]
    stub.responses["SetParameters"] = pb.SetParametersResponse(step=9)
    assert client.set_parameters("g", {"w": [0.5, 0.5]}) == 9
    assert tensors.decode(stub.requests[-1][1].parameters[0].tensor).tolist() == [0.5, 0.5]


def test_backward_streams_gradients_and_sets_the_loss_with_the_first(client: cr.Client, stub: FakeStub) -> None:
    stub.responses["Backward"] = FakeCall(
        [
            pb.BackwardResponse(name="w", gradient=tensors.encode(np.ones(2)), loss=tensors.encode(0.25)),
            pb.BackwardResponse(name="b", gradient=tensors.encode(3.0)),
        ]
    )
    stream = client.backward("g", {"x": 1.0}, "loss", wrt=["w", "b"], loss_grad=1.0)
    assert stream.loss is None
    name, gradient = next(stream)
    assert name == "w" and gradient.tolist() == [1.0, 1.0] and stream.loss == 0.25
    assert list(stream) == [("b", 3.0)]
    request = stub.requests[0][1]
    assert list(request.wrt) == ["w", "b"] and request.HasField("loss_grad")


def test_gradients_collects_the_stream(client: cr.Client, stub: FakeStub) -> None:
    stub.responses["Backward"] = FakeCall(
        [pb.BackwardResponse(name="w", gradient=tensors.encode(2.0), loss=tensors.encode(1.0))]
    )
    loss, gradients = client.gradients("g", {}, "loss")
    assert loss == 1.0 and gradients == {"w": 2.0}
    assert not stub.requests[0][1].HasField("loss_grad")


def test_an_error_mid_backward_is_raised_after_the_gradients_before_it(client: cr.Client, stub: FakeStub) -> None:
    stub.responses["Backward"] = FakeCall(
        [pb.BackwardResponse(name="w", gradient=tensors.encode(2.0), loss=tensors.encode(1.0))],
        FakeRpcError(grpc.StatusCode.CANCELLED, "the request was cancelled"),
    )
    stream = client.backward("g", {}, "loss")
    assert next(stream)[0] == "w"
    with pytest.raises(cr.ChainruleError, match="CANCELLED: the request was cancelled"):
        next(stream)


# ---------------------------------------------------------------- error conversion
def test_unary_errors_become_chainrule_errors_without_grpc_context(client: cr.Client, stub: FakeStub) -> None:
    stub.errors["GetGraph"] = FakeRpcError(grpc.StatusCode.NOT_FOUND, "graph 'nope' not found")
    with pytest.raises(cr.ChainruleError) as raised:
        client.get_graph("nope")
    error = raised.value
    assert (error.code, error.message, str(error)) == (
        grpc.StatusCode.NOT_FOUND,
        "graph 'nope' not found",
        "NOT_FOUND: graph 'nope' not found",
    )
    assert error.reason is None and error.violations == [] and error.metadata == {}
    assert error.__suppress_context__


def test_every_unary_call_converts_errors(client: cr.Client, stub: FakeStub) -> None:
    calls = {
        "CreateGraph": lambda: client.create_graph(graph_pb2.Graph()),
        "ListGraphs": lambda: client.list_graphs(),
        "DeleteGraph": lambda: client.delete_graph("g"),
        "Forward": lambda: client.forward("g", {}, ["y"]),
        "StreamParameters": lambda: client.get_parameters("g"),
        "SetParameters": lambda: client.set_parameters("g", {}),
    }
    for method, call in calls.items():
        stub.errors[method] = FakeRpcError(grpc.StatusCode.UNAVAILABLE, f"{method} down")
        with pytest.raises(cr.ChainruleError, match=f"UNAVAILABLE: {method} down"):
            call()


def test_rich_error_details_fill_reason_metadata_and_violations() -> None:
    message = "node 'q' (add): shapes [2] and [3] cannot broadcast"
    info = error_details_pb2.ErrorInfo(reason="SHAPE_MISMATCH", domain="chainrule", metadata={"subject": "q"})
    bad_request = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field="graph.nodes[q]", description=message)]
    )
    error = from_rpc_error(
        FakeRpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            message,
            [("other", "x"), rich_status(grpc.StatusCode.INVALID_ARGUMENT, message, info, bad_request)],
        )
    )
    assert str(error) == f"INVALID_ARGUMENT: {message}"
    assert error.reason == "SHAPE_MISMATCH" and error.metadata == {"subject": "q"}
    assert error.violations == [cr.Violation("graph.nodes[q]", message)]


def test_rich_details_that_contradict_the_status_are_ignored() -> None:
    info = error_details_pb2.ErrorInfo(reason="OTHER")
    error = from_rpc_error(
        FakeRpcError(grpc.StatusCode.NOT_FOUND, "gone", [rich_status(grpc.StatusCode.INTERNAL, "gone", info)])
    )
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, None)


def test_a_stream_that_ends_inside_a_chunked_gradient_is_an_error() -> None:
    from chainrule import tensors
    from chainrule.client.streams import GradientStream
    from chainrule.v1 import graph_service_pb2 as pb

    first = next(tensors.chunks(np.arange(300.0), "w", chunk_bytes=1024))
    response = pb.BackwardResponse(name="w", loss=tensors.encode(np.float64(1.0)))
    first.write_to(response.gradient)
    stream = GradientStream(FakeCall([response]), "loss")  # type: ignore[arg-type]
    with pytest.raises(tensors.TensorError, match="middle of a chunked tensor"):
        list(stream)
