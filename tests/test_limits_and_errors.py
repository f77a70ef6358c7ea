"""Errors stay within what a default gRPC client receives, and every name a request carries is bounded.

An error's message and google.rpc details travel in trailers, which a default client refuses
beyond 8 KiB (it then reports RESOURCE_EXHAUSTED instead of the real error). Each call here is
made from a default client with the largest inputs the limits allow: names at
--max-name-length in 4-byte UTF-8 characters, and names far over it.

On both backends (a SQLite file, then PostgreSQL): the graphs created here store names at the limit
in PostgreSQL's text and JSONB columns too, and what PostgreSQL's text refuses where SQLite's takes
it (a NUL character) must be refused before it reaches either.
"""

from __future__ import annotations

import base64
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import chainrule.client as cr
from chainrule import tensors
from chainrule.v1 import graph_pb2, graph_service_pb2_grpc, tensor_pb2
from chainrule.v1 import graph_service_pb2 as pb
from tests.server_process import ServerProcess
from tests.test_service import lecture_graph, mlp_graph, node
from tests.test_training import batches, config, sgd

pytestmark = pytest.mark.both_backends

GRPC_TRAILER_LIMIT = 8 * 1024
"""gRPC's default limit on received metadata; beyond it a client sees RESOURCE_EXHAUSTED."""
EMOJI = "\U0001f600"
AT_LIMIT = EMOJI * 256
"""A name of --max-name-length (256 by default) characters, each 4 bytes in UTF-8."""
OVER_LIMIT = EMOJI * 3000
ASCII_OVER_LIMIT = "f" * 3000


def percent_encoded_length(text: str) -> int:
    """The length of grpc-message on the wire: bytes outside printable ASCII, and '%', become %XX."""
    return sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in text.encode())


def trailer_bytes(error: grpc.RpcError) -> int:
    """The error's trailers as gRPC counts them against its limit (32 bytes per entry plus name and value),
    counting grpc-message percent-encoded and binary values base64-encoded, as they cross the wire."""
    entries = [
        ("grpc-status", str(error.code().value[0])),
        ("grpc-message", "x" * percent_encoded_length(error.details())),
    ]
    for key, value in error.trailing_metadata() or ():
        entries.append((key, base64.b64encode(value).decode() if key.endswith("-bin") else value))
    return sum(len(key) + len(value) + 32 for key, value in entries)


def error_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value  # type: ignore[return-value]


def details_of(error: grpc.RpcError) -> tuple[str | None, list[str]]:
    """The ErrorInfo reason and the BadRequest fields of the error's google.rpc.Status."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"{error.code()}: no status details"
    reason, fields = None, []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [violation.field for violation in bad.field_violations]
    return reason, fields


def assert_error(error: grpc.RpcError, code: grpc.StatusCode, reason: str, field: str | None = None) -> None:
    assert error.code() == code, f"{error.code()}: {error.details()[:300]}"
    assert details_of(error)[0] == reason, error.details()[:300]
    if field is not None:
        assert field in details_of(error)[1], (details_of(error)[1], error.details()[:300])
    assert trailer_bytes(error) < GRPC_TRAILER_LIMIT


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> graph_service_pb2_grpc.GraphServiceStub:
    """A stub on a channel with gRPC's defaults: 8 KiB of metadata, 4 MiB messages."""
    return graph_service_pb2_grpc.GraphServiceStub(grpc.insecure_channel(server.address))


@pytest.fixture(scope="module")
def graph_id(stub: graph_service_pb2_grpc.GraphServiceStub) -> str:
    return stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id


def distinct_names(count: int) -> list[str]:
    """`count` names of 256 four-byte characters, distinct in their first character."""
    return [chr(0x10000 + index) + EMOJI * 255 for index in range(count)]


# ---------------------------------------------------------------- trailers within 8 KiB
def test_a_cycle_of_400_long_names_gets_its_real_error_naming_a_few_of_them(stub) -> None:  # type: ignore[no-untyped-def]
    names = distinct_names(400)
    nodes = [node("x", "input"), node(names[0], "add", "x", names[-1])]
    nodes += [node(name, "neg", previous) for previous, name in zip(names, names[1:], strict=False)]
    error = error_of(lambda: stub.CreateGraph(pb.CreateGraphRequest(graph=graph_pb2.Graph(nodes=nodes))))
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "CYCLE")
    assert "400 nodes" in error.details() and "more" in error.details(), error.details()


def graph_with(**changes: object) -> graph_pb2.Graph:
    graph = lecture_graph()
    for key, value in changes.items():
        if key == "graph_name":
            graph.name = value  # type: ignore[assignment]
        elif key == "node_name":
            graph.nodes[0].name = value  # type: ignore[assignment]
        elif key == "input_name":
            graph.nodes[0].inputs[0] = value  # type: ignore[index]
        elif key == "op":
            graph.nodes[0].op = value  # type: ignore[assignment]
        elif key == "attr":
            graph.nodes[0].attrs[value].i = 1  # type: ignore[index]
    return graph


@pytest.mark.parametrize("name", [OVER_LIMIT, ASCII_OVER_LIMIT], ids=["emoji", "ascii"])
def test_graph_definitions_with_names_over_the_limit_get_their_real_error(stub, name: str) -> None:  # type: ignore[no-untyped-def]
    cases = {
        "graph_name": ("NAME_TOO_LONG", "graph.name"),
        "node_name": ("NAME_TOO_LONG", None),
        "input_name": ("NAME_TOO_LONG", None),
        "op": ("UNKNOWN_OP", None),
        "attr": ("BAD_ATTR", None),
    }
    for change, (reason, field) in cases.items():
        graph = graph_with(**{change: name})
        error = error_of(lambda graph=graph: stub.CreateGraph(pb.CreateGraphRequest(graph=graph)))
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, reason, field)
        assert name not in error.details(), change


def requests_naming(name: str, graph_id: str) -> dict[str, tuple[Callable[..., object], object, str]]:
    """One request per place a request carries a name: (stub method, request, the field named)."""
    x = tensors.encode(np.ones((2, 3)))
    return {
        "GetGraph graph_id": ("GetGraph", pb.GetGraphRequest(graph_id=name), "graph_id"),
        "DeleteGraph graph_id": ("DeleteGraph", pb.DeleteGraphRequest(graph_id=name), "graph_id"),
        "ListGraphs page_token": ("ListGraphs", pb.ListGraphsRequest(page_token=name), "page_token"),
        "Forward graph_id": ("Forward", pb.ForwardRequest(graph_id=name, fetches=["out"]), "graph_id"),
        "Forward fetch": ("Forward", pb.ForwardRequest(graph_id=graph_id, fetches=["out", name]), "fetches[1]"),
        "Forward feed": (
            "Forward",
            pb.ForwardRequest(graph_id=graph_id, feeds={"x": x, name: x}, fetches=["out"]),
            "feeds",
        ),  # fmt: skip
        "Backward loss": ("Backward", pb.BackwardRequest(graph_id=graph_id, feeds={"x": x}, loss=name), "loss"),
        "Backward wrt": (
            "Backward",
            pb.BackwardRequest(graph_id=graph_id, feeds={"x": x}, loss="loss", wrt=[name]),
            "wrt[0]",
        ),  # fmt: skip
        "GetParameters names": ("GetParameters", pb.GetParametersRequest(graph_id=graph_id, names=[name]), "names[0]"),
        "SetParameters name": (
            "SetParameters",
            pb.SetParametersRequest(graph_id=graph_id, parameters=[tensor_pb2.NamedTensor(name=name, tensor=x)]),
            "parameters[0].name",
        ),
    }


def call(stub, method: str, request: object) -> object:  # type: ignore[no-untyped-def]
    result = getattr(stub, method)(request, timeout=30)
    return list(result) if method == "Backward" else result


@pytest.mark.parametrize("name", [OVER_LIMIT, ASCII_OVER_LIMIT], ids=["emoji", "ascii"])
def test_every_name_a_request_carries_is_bounded_naming_the_field(stub, graph_id: str, name: str) -> None:  # type: ignore[no-untyped-def]
    for what, (method, request, field) in requests_naming(name, graph_id).items():
        error = error_of(lambda method=method, request=request: call(stub, method, request))
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "NAME_TOO_LONG", field)
        assert field.split("[")[0] in error.details() and "--max-name-length" in error.details(), what
        assert "3,000 characters" in error.details() and name not in error.details(), what


def test_names_at_the_limit_get_their_real_errors_within_the_trailer_limit(stub, graph_id: str) -> None:  # type: ignore[no-untyped-def]
    expected = {
        "GetGraph graph_id": (grpc.StatusCode.NOT_FOUND, "GRAPH_NOT_FOUND"),
        "DeleteGraph graph_id": (grpc.StatusCode.NOT_FOUND, "GRAPH_NOT_FOUND"),
        "ListGraphs page_token": (grpc.StatusCode.INVALID_ARGUMENT, "BAD_PAGE_TOKEN"),
        "Forward graph_id": (grpc.StatusCode.NOT_FOUND, "GRAPH_NOT_FOUND"),
        "Forward fetch": (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_NODE"),
        "Forward feed": (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_FEED"),
        "Backward loss": (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_NODE"),
        "Backward wrt": (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_NODE"),
        "GetParameters names": (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_PARAMETER"),
        "SetParameters name": (grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_PARAMETER"),
    }
    for what, (method, request, _) in requests_naming(AT_LIMIT, graph_id).items():
        error = error_of(lambda method=method, request=request: call(stub, method, request))
        assert_error(error, *expected[what])


def train_until_error(stub, requests: list[pb.TrainRequest]) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    return error_of(lambda: list(stub.Train(iter(requests), timeout=30)))


def test_train_names_are_bounded_too(stub, graph_id: str) -> None:  # type: ignore[no-untyped-def]
    optimizer = pb.Optimizer(sgd=pb.Sgd(learning_rate=0.1))
    configs = {
        "config.graph_id": pb.TrainConfig(graph_id=OVER_LIMIT, loss="loss", optimizer=optimizer),
        "config.loss": pb.TrainConfig(graph_id=graph_id, loss=OVER_LIMIT, optimizer=optimizer),
        "config.parameters[0]": pb.TrainConfig(
            graph_id=graph_id, loss="loss", optimizer=optimizer, parameters=[OVER_LIMIT]
        ),  # fmt: skip
    }
    for field, train_config in configs.items():
        error = train_until_error(stub, [pb.TrainRequest(config=train_config)])
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "NAME_TOO_LONG", field)
    batch = batches(1)[0]
    batch.batch.feeds[OVER_LIMIT].CopyFrom(tensors.encode(np.ones(1)))
    error = train_until_error(stub, [config(graph_id, sgd(0.1)), batch])
    assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "NAME_TOO_LONG", "batch.feeds")
    for field, train_config in {
        "config.loss": pb.TrainConfig(graph_id=graph_id, loss=AT_LIMIT, optimizer=optimizer),
        "config.parameters": pb.TrainConfig(graph_id=graph_id, loss="loss", optimizer=optimizer, parameters=[AT_LIMIT]),
    }.items():
        error = train_until_error(stub, [pb.TrainRequest(config=train_config)])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and trailer_bytes(error) < GRPC_TRAILER_LIMIT, field


def test_the_limit_is_the_flag(new_db: Callable[[], str]) -> None:
    server = ServerProcess(new_db(), ["--max-name-length", "8"]).start()
    try:
        stub = server.stub()
        graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=lecture_graph())).graph.graph_id
        assert len(graph_id) > 8, "graph ids the server issued are accepted whatever the limit"
        error = error_of(lambda: stub.Forward(pb.ForwardRequest(graph_id=graph_id, fetches=["ninechars"])))
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "NAME_TOO_LONG", "fetches[0]")
        assert "limit of 8" in error.details()
        answer = stub.Forward(pb.ForwardRequest(graph_id=graph_id, fetches=["q"], feeds=lecture_feeds()))
        assert len(answer.outputs) == 1
    finally:
        server.kill()


def lecture_feeds() -> dict:
    return {name: tensors.encode(np.asarray(1.0)) for name in "xyz"}


# ---------------------------------------------------------------- request ids
def test_a_request_id_over_256_characters_is_cut_to_256_and_the_call_goes_on(server: ServerProcess, stub) -> None:  # type: ignore[no-untyped-def]
    long_id = "r" * 255 + "s" + "t" * 3744
    response, call_ = stub.ListGraphs.with_call(pb.ListGraphsRequest(), metadata=[("x-request-id", long_id)])
    assert response is not None
    echoed = dict(call_.initial_metadata())["x-request-id"]
    assert echoed == long_id[:256]

    def logged() -> bool:
        return any(long_id[:256] in line for line in server.log)

    deadline = time.monotonic() + 10
    while not logged():
        assert time.monotonic() < deadline, "no log line carries the request id"
        time.sleep(0.05)
    assert not any("st" in line and long_id[:257] in line for line in server.log)


# ---------------------------------------------------------------- control characters
CONTROL_NAMES = ["a\x00b", "line\nbreak", "escape\x1b[31m", "del\x7f", "c1\x85control"]


@pytest.mark.parametrize("name", CONTROL_NAMES, ids=["nul", "newline", "escape", "del", "c1"])
def test_names_with_control_characters_are_refused_everywhere(stub, graph_id: str, name: str) -> None:  # type: ignore[no-untyped-def]
    for change, field in (("graph_name", "graph.name"), ("node_name", None)):
        graph = graph_with(**{change: name})
        error = error_of(lambda graph=graph: stub.CreateGraph(pb.CreateGraphRequest(graph=graph)))
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "BAD_NAME", field)
        assert "control character" in error.details() and name not in error.details()
    for what, (method, request, field) in requests_naming(name, graph_id).items():
        error = error_of(lambda method=method, request=request: call(stub, method, request))
        assert_error(error, grpc.StatusCode.INVALID_ARGUMENT, "BAD_NAME", field)
        assert "control character" in error.details(), what


# ---------------------------------------------------------------- smaller error fixes
def test_train_on_a_non_scalar_loss_names_no_option_train_lacks(stub) -> None:  # type: ignore[no-untyped-def]
    graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
    requests = [config(graph_id, sgd(0.1)), *batches(1)]
    requests[0].config.loss = "out"
    error = train_until_error(stub, requests)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "loss_grad" not in error.details() and "scalar" in error.details(), error.details()
    assert "sum" in error.details() and "mean" in error.details(), error.details()
    request = pb.BackwardRequest(graph_id=graph_id, feeds=requests[1].batch.feeds, loss="out")
    backward = error_of(lambda: list(stub.Backward(request)))
    assert "loss_grad" in backward.details(), "Backward has the option, and says so"


def test_a_wrt_fed_python_ints_says_how_to_fix_it(server: ServerProcess) -> None:
    graph = cr.GraphBuilder("square")
    x = graph.input("x")
    (x * x).named("y")
    with cr.Client(server.address) as client:
        graph_id = client.create_graph(graph).graph_id
        with pytest.raises(cr.ChainruleError) as raised:
            client.gradients(graph_id, {"x": 3}, loss="y", wrt=["x"])
    message = raised.value.message
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and raised.value.reason == "NOT_DIFFERENTIABLE"
    assert "int64" in message and "feed floats" in message and "dtype" in message, message


TOKEN = "alice-secret-token-1"


@pytest.fixture
def secured(new_db: Callable[[], str], tmp_path: Path) -> Iterator[ServerProcess]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} alice\n")
    process = ServerProcess(new_db(), ["--auth-tokens", str(tokens)]).start()
    yield process
    process.kill()


def test_the_bearer_scheme_is_case_insensitive(secured: ServerProcess) -> None:
    stub = secured.stub()
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        answer = stub.ListGraphs(pb.ListGraphsRequest(), metadata=[("authorization", f"{scheme} {TOKEN}")], timeout=10)
        assert list(answer.graphs) == [], scheme
        outbox: queue.Queue[pb.TrainRequest | None] = queue.Queue()
        outbox.put(None)
        stream = stub.Train(iter(outbox.get, None), metadata=[("authorization", f"{scheme} {TOKEN}")], timeout=10)
        error = error_of(lambda stream=stream: list(stream))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, scheme  # past authentication: no config
    for wrong in (f"Basic {TOKEN}", f"Bearer{TOKEN}", TOKEN):
        error = error_of(
            lambda wrong=wrong: stub.ListGraphs(pb.ListGraphsRequest(), metadata=[("authorization", wrong)])
        )
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, wrong
