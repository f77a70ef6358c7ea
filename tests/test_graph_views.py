"""Answers larger than a default client can receive: graph views, CreateGraph's request_id, StreamParameters.

gRPC clients refuse messages over 4 MiB unless told otherwise. Every test here talks to a real
server process, and the ones about size use a raw stub on a channel with gRPC's defaults, or
the clients and the CLI as they come, against graphs and tensors built to exceed that limit.

The request_id tests that go through a server run on both backends too (a SQLite file, then
PostgreSQL): the store is what finds a retried request's graph. The expiry of request ids and two
inserts racing with one are the store's own, tested here on a SQLite file and in test_store on both.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import chainrule.client as cr
from chainrule import tensors
from chainrule.client.errors import from_rpc_error
from chainrule.server.store import SqliteStore
from chainrule.server.store.base import REQUEST_ID_SECONDS, CreateRequest, RequestIdTaken
from chainrule.v1 import graph_pb2, graph_service_pb2_grpc
from chainrule.v1 import graph_service_pb2 as pb
from tests.server_process import ServerProcess

DEFAULT_RECEIVE_LIMIT = 4 * 1024 * 1024
"""gRPC's default receive limit, which every stub in this file keeps unless it says otherwise."""
NAME_LENGTH = 250
"""Node names just under --max-name-length's default (256), so each weighs 253 bytes in an order."""
WEIGHT = np.arange(1500 * 1500, dtype=np.float64).reshape(1500, 1500) / 7.0
"""One 1500x1500 float64 weight: 18 MB, and every element different, so a misplaced chunk shows."""
ALICE, BOB = "alice-token-for-views", "bob-token-for-views"


def wide_graph(name: str, negations: int) -> graph_pb2.Graph:
    """An input and `negations` nodes negating it, named so that the topological order weighs
    about 253 bytes per node while the graph stays cheap to compile."""
    nodes = [graph_pb2.Node(name="x", op="input")]
    nodes += [
        graph_pb2.Node(name=f"{name}-{index:06d}-".ljust(NAME_LENGTH, "n"), op="neg", inputs=["x"])
        for index in range(negations)
    ]
    return graph_pb2.Graph(name=name, nodes=nodes)


def order_bytes(graph: graph_pb2.Graph) -> int:
    """What the graph's topological_order weighs in a GraphInfo: a tag, a 2-byte length and the name per node."""
    return sum(3 + len(node.name.encode()) for node in graph.nodes)


def lecture() -> graph_pb2.Graph:
    graph = cr.GraphBuilder("lecture")
    x, y, z = graph.input("x"), graph.input("y"), graph.input("z")
    ((x + y).named("q") * z).named("f")
    return graph.to_proto()


def dense_model() -> graph_pb2.Graph:
    graph = cr.GraphBuilder("dense")
    x = graph.input("x", shape=[-1, 1500])
    w = graph.parameter("w", WEIGHT)
    cr.sum(x @ w, name="loss")
    return graph.to_proto()


def chainrule(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chainrule.server.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


def count_graphs(stub: graph_service_pb2_grpc.GraphServiceStub) -> int:
    return len(stub.ListGraphs(pb.ListGraphsRequest(page_size=1000)).graphs)


def error_of(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()  # type: ignore[operator]
    return raised.value


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> graph_service_pb2_grpc.GraphServiceStub:
    return server.stub()


@pytest.fixture(scope="module")
def heavy_graphs(stub: graph_service_pb2_grpc.GraphServiceStub) -> list[str]:
    """Three graphs whose orders together exceed 4 MiB, though each one's does not."""
    graphs = [wide_graph(f"heavy{index}", 6000) for index in range(3)]
    assert all(order_bytes(graph) < DEFAULT_RECEIVE_LIMIT for graph in graphs)
    assert sum(map(order_bytes, graphs)) > DEFAULT_RECEIVE_LIMIT
    return [stub.CreateGraph(pb.CreateGraphRequest(graph=graph)).graph.graph_id for graph in graphs]


@pytest.fixture(scope="module")
def dense_id(server: ServerProcess) -> str:
    with cr.Client(server.address) as client:
        return client.create_graph(dense_model()).graph_id


# ---------------------------------------------------------------- views
def test_list_graphs_answers_a_default_client_when_the_orders_exceed_its_limit(
    server: ServerProcess, stub: graph_service_pb2_grpc.GraphServiceStub, heavy_graphs: list[str]
) -> None:
    listed = {info.graph_id: info for info in stub.ListGraphs(pb.ListGraphsRequest()).graphs}
    for graph_id in heavy_graphs:
        info = listed[graph_id]
        assert (info.node_count, list(info.inputs), list(info.parameters)) == (6001, ["x"], [])
        assert info.name.startswith("heavy") and info.HasField("create_time")
        assert list(info.topological_order) == [], "BASIC leaves the order out"
    full = stub.ListGraphs(pb.ListGraphsRequest(page_size=1, view=graph_pb2.GRAPH_VIEW_FULL)).graphs
    assert len(full) == 1 and len(full[0].topological_order) == full[0].node_count
    limited = [("grpc.max_receive_message_length", DEFAULT_RECEIVE_LIMIT)]
    with cr.Client(server.address, channel_options=limited) as client:
        infos = {info.graph_id: info for info in client.list_graphs(page_size=1000)}
    assert set(heavy_graphs) <= set(infos) and infos[heavy_graphs[0]].topological_order == ()


def test_chainrule_graphs_lists_graphs_whose_orders_exceed_4_mib(
    server: ServerProcess, heavy_graphs: list[str]
) -> None:
    for limit in ([], ["--max-message-mb", "4"]):
        result = chainrule("graphs", "--address", server.address, *limit)
        assert result.returncode == 0, result.stderr
        rows = {row.split()[0]: row.split() for row in result.stdout.splitlines()[1:]}
        for graph_id in heavy_graphs:
            assert rows[graph_id][2:4] == ["6001", "0"]


def test_create_graph_of_a_big_graph_answers_within_a_default_clients_limit(
    server: ServerProcess, stub: graph_service_pb2_grpc.GraphServiceStub
) -> None:
    graph = wide_graph("big", 17_000)
    assert order_bytes(graph) > DEFAULT_RECEIVE_LIMIT
    info = stub.CreateGraph(pb.CreateGraphRequest(graph=graph)).graph
    assert (info.name, info.node_count, list(info.inputs), list(info.topological_order)) == ("big", 17_001, ["x"], [])
    basic = stub.GetGraph(pb.GetGraphRequest(graph_id=info.graph_id, view=graph_pb2.GRAPH_VIEW_BASIC)).graph
    assert basic == info
    with cr.Client(server.address) as client:  # FULL is GetGraph's default, through the client's raised limit
        order = client.get_graph(info.graph_id).topological_order
    assert order[0] == "x" and sorted(order[1:]) == sorted(node.name for node in graph.nodes[1:])


def test_create_graph_can_answer_in_full(stub: graph_service_pb2_grpc.GraphServiceStub) -> None:
    info = stub.CreateGraph(pb.CreateGraphRequest(graph=lecture(), view=graph_pb2.GRAPH_VIEW_FULL)).graph
    order = list(info.topological_order)
    assert order.index("q") < order.index("f") and len(order) == 5
    assert stub.GetGraph(pb.GetGraphRequest(graph_id=info.graph_id)).graph == info


def test_get_graph_can_leave_out_the_values_stream_parameters_gives(
    stub: graph_service_pb2_grpc.GraphServiceStub,
) -> None:
    nodes = [
        graph_pb2.Node(name="running", op="state", value=tensors.encode(np.zeros(3))),
        graph_pb2.Node(name="w", op="parameter", value=tensors.encode(np.ones(3))),
        graph_pb2.Node(name="c", op="constant", value=tensors.encode(np.full(3, 2.0))),
        graph_pb2.Node(name="y", op="add", inputs=["running", "w"]),
        graph_pb2.Node(name="z", op="mul", inputs=["y", "c"]),
    ]
    graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=graph_pb2.Graph(nodes=nodes))).graph.graph_id
    request = pb.GetGraphRequest(graph_id=graph_id, include_definition=True, omit_parameter_values=True)
    definition = stub.GetGraph(request).definition
    assert {node.name for node in definition.nodes if node.HasField("value")} == {"c"}
    assert [node.name for node in definition.nodes] == [node.name for node in nodes]
    (streamed,) = stub.StreamParameters(pb.StreamParametersRequest(graph_id=graph_id))
    assert sorted(named.name for named in streamed.parameters) == ["running", "w"]


def test_a_view_the_server_does_not_know_is_refused(stub: graph_service_pb2_grpc.GraphServiceStub) -> None:
    calls = {
        "ListGraphs": lambda: stub.ListGraphs(pb.ListGraphsRequest(view=7)),  # type: ignore[arg-type]
        "GetGraph": lambda: stub.GetGraph(pb.GetGraphRequest(graph_id="any", view=7)),  # type: ignore[arg-type]
        "CreateGraph": lambda: stub.CreateGraph(pb.CreateGraphRequest(graph=lecture(), view=7)),  # type: ignore[arg-type]
    }
    for method, call in calls.items():
        error = from_rpc_error(error_of(call))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, method
        assert "view" in error.message and [v.field for v in error.violations] == ["view"], method


# ---------------------------------------------------------------- request_id
@pytest.mark.both_backends
def test_a_retry_with_the_same_request_id_returns_the_first_graph(
    stub: graph_service_pb2_grpc.GraphServiceStub,
) -> None:
    before = count_graphs(stub)
    request = pb.CreateGraphRequest(graph=lecture(), request_id="3f2a9c1e-create-lecture")
    first = stub.CreateGraph(request).graph
    again = stub.CreateGraph(request).graph
    assert again == first
    assert count_graphs(stub) == before + 1
    other = stub.CreateGraph(pb.CreateGraphRequest(graph=lecture(), request_id="another-request")).graph
    assert other.graph_id != first.graph_id and count_graphs(stub) == before + 2
    assert stub.CreateGraph(pb.CreateGraphRequest(graph=lecture())).graph.graph_id not in (
        first.graph_id,
        other.graph_id,
    )


@pytest.mark.both_backends
def test_a_request_id_reused_for_another_graph_is_refused(stub: graph_service_pb2_grpc.GraphServiceStub) -> None:
    first = stub.CreateGraph(pb.CreateGraphRequest(graph=lecture(), request_id="reused-id")).graph
    before = count_graphs(stub)
    changed = lecture()
    changed.name = "lecture, renamed"
    error = from_rpc_error(
        error_of(lambda: stub.CreateGraph(pb.CreateGraphRequest(graph=changed, request_id="reused-id")))
    )
    assert error.code == grpc.StatusCode.ALREADY_EXISTS and error.reason == "REQUEST_ID_REUSED"
    assert "reused-id" in error.message and first.graph_id in error.message
    assert error.metadata == {"subject": "request_id"}
    assert count_graphs(stub) == before


@pytest.mark.parametrize(
    ("request_id", "fragment"),
    [("𝔵" * 257, "257 characters"), ("line\nbreak", "control character"), ("nul\x00", "control character")],
)
def test_bad_request_ids_are_refused_naming_the_field(
    stub: graph_service_pb2_grpc.GraphServiceStub, request_id: str, fragment: str
) -> None:
    before = count_graphs(stub)
    error = from_rpc_error(
        error_of(lambda: stub.CreateGraph(pb.CreateGraphRequest(graph=lecture(), request_id=request_id)))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.message
    assert [violation.field for violation in error.violations] == ["request_id"]
    assert count_graphs(stub) == before


@pytest.mark.both_backends
def test_a_request_id_at_the_length_limit_is_accepted(stub: graph_service_pb2_grpc.GraphServiceStub) -> None:
    request = pb.CreateGraphRequest(graph=lecture(), request_id="𝔵" * 256)
    assert stub.CreateGraph(request).graph.graph_id == stub.CreateGraph(request).graph.graph_id


@pytest.mark.both_backends
def test_deleting_the_graph_frees_its_request_id(stub: graph_service_pb2_grpc.GraphServiceStub) -> None:
    request = pb.CreateGraphRequest(graph=lecture(), request_id="freed-by-delete")
    first = stub.CreateGraph(request).graph.graph_id
    stub.DeleteGraph(pb.DeleteGraphRequest(graph_id=first))
    second = stub.CreateGraph(request).graph.graph_id
    assert second != first and stub.CreateGraph(request).graph.graph_id == second


@pytest.fixture
def tenants_server(new_db: Callable[[], str], tmp_path: Path) -> Iterator[ServerProcess]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALICE} alice\n{BOB} bob\n")
    process = ServerProcess(new_db(), ["--auth-tokens", str(tokens)]).start()
    yield process
    process.kill()


@pytest.mark.both_backends
def test_request_ids_belong_to_a_tenant_and_survive_a_restart(tenants_server: ServerProcess) -> None:
    def create(address: str, token: str) -> str:
        with cr.Client(address, token=token) as client:
            return client.create_graph(lecture(), request_id="shared-request-id").graph_id

    alices, bobs = create(tenants_server.address, ALICE), create(tenants_server.address, BOB)
    assert alices != bobs
    tenants_server.kill()
    restarted = ServerProcess(tenants_server.db, tenants_server.extra_args).start()
    try:
        assert create(restarted.address, ALICE) == alices and create(restarted.address, BOB) == bobs
        for token, graph_id in ((ALICE, alices), (BOB, bobs)):
            with cr.Client(restarted.address, token=token) as client:
                assert [info.graph_id for info in client.list_graphs()] == [graph_id]
    finally:
        restarted.kill()


def test_request_ids_expire_after_a_day(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "chainrule.db"))
    request = CreateRequest("day-old", "fingerprint")
    first = store.insert_graph("g1", "", "one", b"", {"node_count": 0}, {}, request)
    assert store.find_request("", "day-old") is not None
    with sqlite3.connect(tmp_path / "chainrule.db") as db:  # let a day and a second pass
        db.execute("UPDATE create_requests SET created_at = created_at - ?", (REQUEST_ID_SECONDS + 1,))
    assert store.find_request("", "day-old") is None
    second = store.insert_graph("g2", "", "two", b"", {"node_count": 0}, {}, request)
    assert (first.graph_id, second.graph_id) == ("g1", "g2")
    with sqlite3.connect(tmp_path / "chainrule.db") as db:
        assert db.execute("SELECT graph_id FROM create_requests").fetchall() == [("g2",)]
    store.close()


def test_a_request_id_taken_while_the_graph_was_compiled_stores_nothing(tmp_path: Path) -> None:
    """Two calls with one request_id can both miss it before either stores its graph: the second insert
    must find the first's and store nothing."""
    store = SqliteStore(str(tmp_path / "chainrule.db"))
    store.insert_graph("g1", "alice", "one", b"", {"node_count": 0}, {}, CreateRequest("race", "same"))
    with pytest.raises(RequestIdTaken) as raised:
        store.insert_graph("g2", "alice", "one", b"", {"node_count": 0}, {}, CreateRequest("race", "same"))
    assert (raised.value.graph.graph_id, raised.value.fingerprint) == ("g1", "same")
    assert store.get_graph("g2", "alice") is None and store.count_graphs() == 1
    store.insert_graph("g3", "bob", "one", b"", {"node_count": 0}, {}, CreateRequest("race", "same"))
    assert store.count_graphs() == 2
    store.close()


# ---------------------------------------------------------------- StreamParameters
def test_stream_parameters_chunks_a_1500x1500_float64_parameter(
    stub: graph_service_pb2_grpc.GraphServiceStub, dense_id: str
) -> None:
    responses = list(stub.StreamParameters(pb.StreamParametersRequest(graph_id=dense_id)))
    assert len(responses) == -(-WEIGHT.nbytes // tensors.CHUNK_BYTES)
    assert all(response.ByteSize() < DEFAULT_RECEIVE_LIMIT and response.step == 0 for response in responses)
    assembler = tensors.Assembler()
    received = [assembler.add(named.name, named.tensor) for response in responses for named in response.parameters]
    assert all(value is None for value in received[:-1]) and not assembler.pending
    np.testing.assert_array_equal(received[-1], WEIGHT)


def test_stream_parameters_sends_the_step_and_the_named_parameters(
    stub: graph_service_pb2_grpc.GraphServiceStub,
) -> None:
    graph = cr.GraphBuilder("small")
    a, b = graph.parameter("a", np.ones(3)), graph.parameter("b", 2.0)
    (a * b).named("y")
    graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=graph.to_proto())).graph.graph_id
    (only,) = stub.StreamParameters(pb.StreamParametersRequest(graph_id=graph_id, names=["b", "a"]))
    assert [named.name for named in only.parameters] == ["b", "a"] and only.step == 0
    (none,) = stub.StreamParameters(pb.StreamParametersRequest(graph_id=lecture_id(stub)))
    assert list(none.parameters) == [] and none.step == 0
    error = from_rpc_error(
        error_of(lambda: list(stub.StreamParameters(pb.StreamParametersRequest(graph_id=graph_id, names=["y"]))))
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "UNKNOWN_PARAMETER"
    missing = from_rpc_error(error_of(lambda: list(stub.StreamParameters(pb.StreamParametersRequest(graph_id="gone")))))
    assert missing.code == grpc.StatusCode.NOT_FOUND


def test_stream_parameters_without_names_sends_state_nodes_too_as_its_proto_says(
    stub: graph_service_pb2_grpc.GraphServiceStub,
) -> None:
    nodes = [
        graph_pb2.Node(name="w", op="parameter", value=tensors.encode(np.ones(2))),
        graph_pb2.Node(name="running", op="state", value=tensors.encode(np.zeros(2))),
        graph_pb2.Node(name="y", op="add", inputs=["w", "running"]),
    ]
    graph_id = stub.CreateGraph(
        pb.CreateGraphRequest(graph=graph_pb2.Graph(name="stateful", nodes=nodes))
    ).graph.graph_id
    (every,) = stub.StreamParameters(pb.StreamParametersRequest(graph_id=graph_id))
    assert sorted(named.name for named in every.parameters) == ["running", "w"]
    proto = (Path(__file__).resolve().parent.parent / "proto" / "chainrule" / "v1" / "graph_service.proto").read_text()
    request = proto[proto.index("message StreamParametersRequest") :].split("}", 1)[0]
    assert "empty means every parameter and state node" in request, request


def lecture_id(stub: graph_service_pb2_grpc.GraphServiceStub) -> str:
    return stub.CreateGraph(pb.CreateGraphRequest(graph=lecture())).graph.graph_id


def test_the_python_client_reassembles_streamed_parameters(server: ServerProcess, dense_id: str) -> None:
    limited = [("grpc.max_receive_message_length", DEFAULT_RECEIVE_LIMIT)]
    with cr.Client(server.address, channel_options=limited) as client:
        values, step = client.get_parameters_with_step(dense_id)
        assert step == 0 and list(values) == ["w"]
        np.testing.assert_array_equal(values["w"], WEIGHT)
        np.testing.assert_array_equal(client.get_parameters(dense_id, "w")["w"], WEIGHT)


def test_the_python_client_receives_up_to_the_servers_message_limit(server: ServerProcess, dense_id: str) -> None:
    with cr.Client(server.address) as client:
        definition = client.get_graph(dense_id, include_definition=True).definition
        assert definition is not None
        (weight,) = [node for node in definition.nodes if node.name == "w"]
        np.testing.assert_array_equal(tensors.decode(weight.value), WEIGHT)
        (output,) = client.forward(dense_id, {"x": np.ones((1, 1500))}, ["w"]).values()
        np.testing.assert_array_equal(output, WEIGHT)
    with cr.Client(server.address, max_message_mb=4) as client, pytest.raises(cr.ChainruleError) as raised:
        client.forward(dense_id, {}, ["w"])
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_raising_the_client_limit_for_a_server_with_a_larger_one_is_documented() -> None:
    """The clients' 512 MiB is fixed: every place a user reads about it says to match a larger server limit."""
    root = Path(__file__).resolve().parent.parent
    client_help = " ".join(chainrule("graphs", "--help").stdout.split())
    places = {
        "Client docstring": " ".join((cr.Client.__doc__ or "").split()),
        "README.md": " ".join((root / "README.md").read_text().split()),
        "docs/clients.md": " ".join((root / "docs" / "clients.md").read_text().split()),
        "client/node/README.md": " ".join((root / "client" / "node" / "README.md").read_text().split()),
        "chainrule graphs --help": client_help,
    }
    for place, text in places.items():
        assert "larger --max-message-mb" in text or "larger `--max-message-mb`" in text, place


def test_chainrule_show_prints_a_model_with_a_1500x1500_weight(server: ServerProcess, dense_id: str) -> None:
    result = chainrule("show", dense_id, "--address", server.address)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[1][:4] == ["step", "0,", "4", "nodes,"]
    parameters = lines[lines.index(["parameters:"]) + 1 :]
    norm = f"{np.linalg.norm(WEIGHT):.4g}"
    assert parameters == [["w", "float64", "[1500,", "1500]", "shape", "[1500,", "1500],", "L2", "norm", norm]]


def test_chainrule_render_draws_a_model_with_a_1500x1500_weight(
    server: ServerProcess, dense_id: str, tmp_path: Path
) -> None:
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.ones((1, 1500)))
    output = tmp_path / "dense.dot"
    result = chainrule(
        "render", dense_id, "--feeds", feeds, "--loss", "loss", "-o", output, "--address", server.address
    )
    assert result.returncode == 0, result.stderr
    dot = output.read_text(encoding="utf-8")
    weight_norm = f"{np.linalg.norm(WEIGHT):.4g}"
    gradient_norm = f"{np.linalg.norm(np.ones((1500, 1500))):.4g}"  # d(sum(x @ w))/dw = x^T 1 = ones
    assert f"shape [1500, 1500], L2 norm {weight_norm}" in dot
    assert f"∂loss/∂w: shape [1500, 1500], L2 norm {gradient_norm}" in dot
