"""Running the server: limits, deadlines, reflection, metrics, logs, graceful shutdown, the compose file."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import chainrule.client as cr
from chainrule.server.cli import build_parser
from chainrule.v1 import graph_service_pb2 as pb
from tests.server_process import ServerProcess
from tests.test_service import mlp_graph
from tests.test_training import batches, config, sgd

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: object, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---------------------------------------------------------------- limits
def test_a_graph_needing_a_trillion_elements_is_refused_before_anything_is_allocated(server: ServerProcess) -> None:
    graph = cr.GraphBuilder("huge")
    a = graph.input("a", shape=[1_000_000, 1])
    b = graph.input("b", shape=[1, 1_000_000])
    (a * b).named("outer")
    with cr.Client(server.address) as client, pytest.raises(cr.ChainruleError) as raised:
        client.create_graph(graph)
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "node 'outer'" in raised.value.message and "1,000,000,000,000 elements" in raised.value.message


def test_a_request_over_the_memory_limit_is_refused_naming_the_node(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "db", ["--max-request-memory-mb", "64"]).start()
    try:
        graph = cr.GraphBuilder("outer product")
        a, b = graph.input("a", shape=[-1, 1]), graph.input("b", shape=[1, -1])
        cr.sum(a * b, name="total")
        with cr.Client(server.address) as client:
            graph_id = client.create_graph(graph).graph_id
            small = client.forward(graph_id, {"a": np.ones((100, 1)), "b": np.ones((1, 100))}, ["total"])
            assert float(small["total"]) == 10_000.0
            with pytest.raises(cr.ChainruleError) as raised:
                client.forward(graph_id, {"a": np.ones((4000, 1)), "b": np.ones((1, 4000))}, ["total"])
            assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "node 'mul_1'" in raised.value.message and "67,108,864" in raised.value.message
            assert raised.value.reason == "REQUEST_TOO_LARGE"
            assert client.list_graphs()[0].graph_id == graph_id
    finally:
        server.kill()


def test_node_count_and_name_length_limits_are_flags(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "db", ["--max-nodes", "3", "--max-name-length", "8"]).start()
    try:
        with cr.Client(server.address) as client:
            graph = cr.GraphBuilder()
            x = graph.input("x")
            (x + x + x + x).named("y")
            with pytest.raises(cr.ChainruleError) as raised:
                client.create_graph(graph)
            assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 3" in raised.value.message
            long_name = cr.GraphBuilder()
            long_name.input("a_rather_long_name")
            with pytest.raises(cr.ChainruleError) as raised:
                client.create_graph(long_name)
            assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "limit of 8" in raised.value.message
    finally:
        server.kill()


def test_a_saturated_server_refuses_calls_at_once_and_still_answers_health_checks(tmp_path: Path) -> None:
    args = ["--workers", "4", "--max-concurrent-rpcs", "2", "--max-concurrent-rpcs-per-tenant", "2"]
    server = ServerProcess(tmp_path / "db", args).start()
    try:
        stub = server.stub()
        outboxes: list[queue.Queue[pb.TrainRequest | None]] = []
        streams = []
        for _ in range(2):  # two open Train streams fill the limit
            graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
            outbox: queue.Queue[pb.TrainRequest | None] = queue.Queue()
            outbox.put(config(graph_id, sgd(0.1)))
            outbox.put(batches(1)[0])
            stream = stub.Train(iter(outbox.get, None))
            assert next(stream).step == 1
            outboxes.append(outbox)
            streams.append(stream)

        with pytest.raises(grpc.RpcError) as raised:
            stub.ListGraphs(pb.ListGraphsRequest(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "its limit (--max-concurrent-rpcs)" in raised.value.details()  # type: ignore[attr-defined]
        health = health_pb2_grpc.HealthStub(server.channel()).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        outboxes[0].put(None)
        assert list(streams[0]) == []
        assert len(stub.ListGraphs(pb.ListGraphsRequest(), timeout=10).graphs) == 2
        outboxes[1].put(None)
        assert list(streams[1]) == []
    finally:
        server.kill()


def test_serve_help_documents_every_limit() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chainrule.server.cli", "serve", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--max-nodes", "--max-name-length", "--max-attrs", "--max-tensor-elements",
                 "--max-request-memory-mb", "--max-message-mb", "--max-concurrent-rpcs"):  # fmt: skip
        assert flag in result.stdout


# ---------------------------------------------------------------- deadlines
def test_an_expired_deadline_stops_a_long_backward_between_steps(server: ServerProcess) -> None:
    graph = cr.GraphBuilder("long chain")
    node = graph.input("x")
    for _ in range(150_000):
        node = cr.tanh(node)
    node.named("end")
    with cr.Client(server.address) as client:
        graph_id = client.create_graph(graph).graph_id
    stub = server.stub()
    request = pb.BackwardRequest(graph_id=graph_id, loss="end", wrt=["x"])
    request.feeds["x"].CopyFrom(cr.encode(np.array(0.5)))
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Backward(request, timeout=0.5, metadata=[("x-request-id", "deadline-test")]))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]

    def stopped_line() -> str | None:
        return next((line for line in server.log if "[deadline-test]" in line and "Backward" in line), None)

    wait_for(stopped_line, "the server to log the stopped Backward")
    if "cancelled while planning the pass" in (stopped_line() or ""):  # the first call plans, and stops there too
        return
    match = re.search(r"cancelled after (\d+) of (\d+) (forward|reverse) steps", stopped_line() or "")
    assert match, stopped_line()
    done, total, _ = match.groups()
    assert int(done) < int(total)


# ---------------------------------------------------------------- reflection, metrics, logs
def list_services(address: str) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(address))
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return [service.name for response in responses for service in response.list_services_response.service]


def test_reflection_lists_the_services_and_can_be_turned_off(server: ServerProcess, tmp_path: Path) -> None:
    assert {"chainrule.v1.GraphService", "grpc.health.v1.Health"} <= set(list_services(server.address))
    closed = ServerProcess(tmp_path / "db", ["--no-reflection"]).start()
    try:
        with pytest.raises(grpc.RpcError) as raised:
            list_services(closed.address)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    finally:
        closed.kill()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_metrics_and_json_logs_with_request_ids(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(tmp_path / "db", ["--metrics-port", str(port)], global_args=["--log-format", "json"]).start()
    try:
        stub = server.stub()
        created, call = stub.CreateGraph.with_call(
            pb.CreateGraphRequest(graph=mlp_graph()), metadata=[("x-request-id", "create-42")]
        )
        assert ("x-request-id", "create-42") in call.initial_metadata()
        with pytest.raises(grpc.RpcError):
            stub.GetGraph(pb.GetGraphRequest(graph_id="missing"))
        list(stub.Train(iter([config(created.graph.graph_id, sgd(0.1)), *batches(3)])))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'chainrule_rpcs_total{code="OK",method="CreateGraph"} 1.0' in text
        assert 'chainrule_rpcs_total{code="NOT_FOUND",method="GetGraph"} 1.0' in text
        assert 'chainrule_rpc_seconds_count{method="Train"} 1.0' in text
        assert "chainrule_training_steps_total 3.0" in text
        assert "chainrule_graphs 1.0" in text
        assert re.search(r'chainrule_received_bytes_total\{method="CreateGraph"\} [1-9]', text)

        def create_entry() -> dict | None:
            for line in list(server.log):
                if line.startswith("{") and '"create-42"' in line:
                    return json.loads(line)
            return None

        wait_for(create_entry, "the JSON log line of CreateGraph")
        entry = create_entry()
        assert (
            entry is not None and entry["request_id"] == "create-42" and entry["message"].startswith("CreateGraph OK")
        )
    finally:
        server.kill()


# ---------------------------------------------------------------- graceful shutdown
def test_sigterm_drains_a_train_stream_after_its_current_step_and_commits(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "db").start()
    stub = server.stub()
    graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
    outbox: queue.Queue[pb.TrainRequest | None] = queue.Queue()
    outbox.put(config(graph_id, sgd(0.1), checkpoint_every=1000))

    def requests() -> Iterator[pb.TrainRequest]:
        while (request := outbox.get()) is not None:
            yield request

    stream = stub.Train(requests())
    for _ in range(2):
        outbox.put(batches(1)[0])
        assert next(stream).step in (1, 2)
    statuses: queue.Queue[int] = queue.Queue()
    watch = health_pb2_grpc.HealthStub(server.channel()).Watch(health_pb2.HealthCheckRequest(service=""))

    def follow_health() -> None:
        try:
            for response in watch:
                statuses.put(response.status)
        except grpc.RpcError:
            pass  # the server ends the watch when it stops

    threading.Thread(target=follow_health, daemon=True).start()
    assert statuses.get(timeout=10) == health_pb2.HealthCheckResponse.SERVING
    server.signal(signal.SIGTERM)
    assert statuses.get(timeout=10) == health_pb2.HealthCheckResponse.NOT_SERVING
    outbox.put(batches(1)[0])
    assert next(stream).step == 3
    with pytest.raises(grpc.RpcError) as raised:
        next(stream)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "steps up to 3 are committed" in raised.value.details()  # type: ignore[attr-defined]
    assert server.process is not None and server.process.wait(timeout=30) == 0
    restarted = ServerProcess(tmp_path / "db").start()
    try:
        assert restarted.stub().GetParameters(pb.GetParametersRequest(graph_id=graph_id)).step == 3
    finally:
        restarted.kill()


# ---------------------------------------------------------------- packaging for operators
def test_compose_file_and_dockerfile_are_consistent() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    command = json.loads(re.search(r"command: (\[.*\])", compose).group(1))  # type: ignore[union-attr]
    assert command[:2] == ["chainrule", "serve"]
    args = build_parser().parse_args(command[1:])
    volume = re.search(r"- chainrule-data:(\S+)", compose).group(1)  # type: ignore[union-attr]
    assert Path(args.db).parent == Path(volume)
    assert re.search(r"^volumes:\n  chainrule-data:", compose, re.MULTILINE)
    health = json.loads(re.search(r"test: (\[.*\])", compose).group(1))  # type: ignore[union-attr]
    assert health[0] == "CMD" and health[1] == "chainrule"
    build_parser().parse_args(health[2:])
    dockerfile_command = json.loads(re.search(r"^CMD (\[.*\])", dockerfile, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert dockerfile_command == command
    installed = re.search(r"RUN pip install .*?(\S+) &&", dockerfile)
    assert installed and installed.group(1) == "."
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / copied).exists(), copied
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(dependency.startswith("grpcio-health-checking") for dependency in dependencies)


def test_a_feed_over_the_element_limit_is_refused_before_it_is_used(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "db", ["--max-tensor-elements", "1000"]).start()
    try:
        graph = cr.GraphBuilder()
        cr.sum(graph.input("x"), name="total")
        with cr.Client(server.address) as client:
            graph_id = client.create_graph(graph).graph_id
            assert float(client.forward(graph_id, {"x": np.ones(1000)}, ["total"])["total"]) == 1000.0
            with pytest.raises(cr.ChainruleError) as raised:
                client.forward(graph_id, {"x": np.ones(1001)}, ["total"])
            assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "tensor 'x' has 1,001 elements" in raised.value.message
    finally:
        server.kill()
