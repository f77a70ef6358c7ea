"""Idle streams end, one tenant cannot lock out the others, and health checks answer under heavy load."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from chainrule.v1 import graph_service_pb2 as pb
from tests.server_process import ServerProcess
from tests.test_service import mlp_graph
from tests.test_training import batches, config, sgd

ROOT = Path(__file__).resolve().parent.parent
HEALTH_DEADLINE = 30.0
"""Generous, so that a loaded machine cannot fail a health check on time: these tests assert that health
checks are answered SERVING; how fast is measured and reported by the load test (tests/load)."""


def reason_of(error: grpc.RpcError) -> str | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return None


class OpenStream:
    """A Train stream whose requests the test sends one by one; it sends nothing until told."""

    def __init__(self, stub, metadata: tuple = ()) -> None:  # type: ignore[no-untyped-def]
        self.outbox: queue.Queue[pb.TrainRequest | None] = queue.Queue()
        self.responses = stub.Train(iter(self.outbox.get, None), metadata=metadata, timeout=120)

    def send(self, request: pb.TrainRequest) -> None:
        self.outbox.put(request)

    def close(self) -> None:
        self.outbox.put(None)


def started(stub, graph_id: str, metadata: tuple = ()) -> OpenStream:  # type: ignore[no-untyped-def]
    """A stream that took one step and then went quiet."""
    stream = OpenStream(stub, metadata)
    stream.send(config(graph_id, sgd(0.1), checkpoint_every=1000))
    stream.send(batches(1)[0])
    assert next(stream.responses).step >= 1
    return stream


# ---------------------------------------------------------------- idle streams
def test_idle_train_streams_end_with_deadline_exceeded_their_steps_committed(tmp_path: Path) -> None:
    args = ["--stream-idle-seconds", "1", "--workers", "4", "--max-concurrent-rpcs", "2"]
    args += ["--max-concurrent-rpcs-per-tenant", "2"]
    server = ServerProcess(tmp_path / "db", args).start()
    try:
        stub = server.stub()
        graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
        quiet_after_steps = OpenStream(stub)
        quiet_after_steps.send(config(graph_id, sgd(0.1), checkpoint_every=1000))
        for request in batches(2):
            quiet_after_steps.send(request)
        assert [next(quiet_after_steps.responses).step for _ in range(2)] == [1, 2]
        silent = OpenStream(stub)  # not even a config
        for stream, fragment in ((quiet_after_steps, "step 2"), (silent, "no step was taken")):
            with pytest.raises(grpc.RpcError) as raised:
                next(stream.responses)
            error = raised.value
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()  # type: ignore[attr-defined]
            assert reason_of(error) == "STREAM_IDLE"  # type: ignore[arg-type]
            assert "--stream-idle-seconds" in error.details() and fragment in error.details()  # type: ignore[attr-defined]
            stream.close()
        # Both slots of --max-concurrent-rpcs are free again.
        assert stub.ListGraphs(pb.ListGraphsRequest(), timeout=10).graphs
        busy = started(stub, graph_id)
        busy.close()
        assert list(busy.responses) == []
    finally:
        server.kill()
    restarted = ServerProcess(tmp_path / "db").start()
    try:
        assert restarted.stub().GetParameters(pb.GetParametersRequest(graph_id=graph_id)).step == 3
    finally:
        restarted.kill()


# ---------------------------------------------------------------- tenants
TOKENS = {"alice": "alice-token-1", "bob": "bob-token-2", "carol": "carol-token-3"}


def bearer(tenant: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {TOKENS[tenant]}"),)


@pytest.fixture
def tenants_server(tmp_path: Path) -> Iterator[ServerProcess]:
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{token} {tenant}\n" for tenant, token in TOKENS.items()))
    args = ["--auth-tokens", str(tokens), "--workers", "8", "--max-concurrent-rpcs", "4"]
    process = ServerProcess(tmp_path / "chainrule.db", args).start()
    yield process
    process.kill()


def refusal(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error = raised.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()  # type: ignore[attr-defined]
    assert reason_of(error) == "TOO_MANY_CALLS"  # type: ignore[arg-type]
    return error  # type: ignore[return-value]


def test_one_tenant_cannot_take_every_slot(tenants_server: ServerProcess) -> None:
    """--max-concurrent-rpcs 4 gives each tenant 2 by default: alice's third call is refused while bob's
    go through; with alice and bob at 2 each the server is full, and carol is told so."""
    stub = tenants_server.stub()
    graphs = {
        tenant: stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph()), metadata=bearer(tenant)).graph.graph_id
        for tenant in ("alice", "bob")
    }
    alices = [started(stub, graphs["alice"], bearer("alice")) for _ in range(2)]
    error = refusal(lambda: stub.ListGraphs(pb.ListGraphsRequest(), metadata=bearer("alice"), timeout=10))
    assert "--max-concurrent-rpcs-per-tenant" in error.details()  # type: ignore[attr-defined]
    assert len(stub.ListGraphs(pb.ListGraphsRequest(), metadata=bearer("bob"), timeout=10).graphs) == 1
    bobs = [started(stub, graphs["bob"], bearer("bob")) for _ in range(2)]
    error = refusal(lambda: stub.ListGraphs(pb.ListGraphsRequest(), metadata=bearer("carol"), timeout=10))
    assert "--max-concurrent-rpcs)" in error.details()  # type: ignore[attr-defined]
    alices[0].close()
    assert list(alices[0].responses) == []
    assert stub.ListGraphs(pb.ListGraphsRequest(), metadata=bearer("carol"), timeout=10).graphs == []
    for stream in (alices[1], *bobs):
        stream.close()
        assert list(stream.responses) == []


def test_an_open_server_is_one_tenant_held_to_half_the_calls_by_default(tmp_path: Path) -> None:
    """Without --auth-tokens every caller is the one tenant "", held like any tenant to half of
    --max-concurrent-rpcs unless --max-concurrent-rpcs-per-tenant says otherwise."""
    server = ServerProcess(tmp_path / "db", ["--workers", "8", "--max-concurrent-rpcs", "4"]).start()
    try:
        stub = server.stub()
        graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
        streams = [started(stub, graph_id) for _ in range(2)]
        error = refusal(lambda: stub.ListGraphs(pb.ListGraphsRequest(), timeout=10))
        details = error.details()  # type: ignore[attr-defined]
        assert "2 calls and streams open, its limit (--max-concurrent-rpcs-per-tenant)" in details
        for stream in streams:
            stream.close()
            assert list(stream.responses) == []
    finally:
        server.kill()


def test_the_per_tenant_limit_is_a_flag(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "db", ["--max-concurrent-rpcs-per-tenant", "1"]).start()
    try:
        stub = server.stub()
        graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
        stream = started(stub, graph_id)
        error = refusal(lambda: stub.ListGraphs(pb.ListGraphsRequest(), timeout=10))
        assert "1 calls and streams" in error.details()  # type: ignore[attr-defined]
        stream.close()
        assert list(stream.responses) == []
    finally:
        server.kill()


# ---------------------------------------------------------------- health under load
def test_calls_refused_for_capacity_never_crowd_out_health_checks(tmp_path: Path) -> None:
    """With --max-concurrent-rpcs filled, callers retrying at once keep refused calls passing through
    the spare threads; gRPC's own concurrency limit once refused health checks among them."""
    args = ["--workers", "4", "--max-concurrent-rpcs", "2", "--max-concurrent-rpcs-per-tenant", "2"]
    server = ServerProcess(tmp_path / "db", args).start()
    stop = threading.Event()
    try:
        stub = server.stub()
        graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
        streams = [started(stub, graph_id) for _ in range(2)]
        refused: list[grpc.StatusCode] = []

        def retry_at_once() -> None:
            while not stop.is_set():
                try:
                    stub.ListGraphs(pb.ListGraphsRequest(), timeout=10)
                except grpc.RpcError as error:
                    refused.append(error.code())  # type: ignore[attr-defined]

        callers = [threading.Thread(target=retry_at_once, daemon=True) for _ in range(8)]
        for caller in callers:
            caller.start()
        health = health_pb2_grpc.HealthStub(server.channel())
        answers = [health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_DEADLINE).status for _ in range(40)]
        assert set(answers) == {health_pb2.HealthCheckResponse.SERVING}
        stop.set()
        for caller in callers:
            caller.join(timeout=30)
        assert refused and set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        for stream in streams:
            stream.close()
            assert list(stream.responses) == []
    finally:
        stop.set()
        server.kill()


def test_health_checks_answer_serving_under_heavy_forward_load(tmp_path: Path) -> None:
    """Seventy clients sending heavy Forward calls to a server with the default limits (thirty admitted,
    the rest refused and retried): every health check, sent every 50 ms, must be answered SERVING. Their
    latencies, and how many took longer than the compose check's 5 s, are printed (pytest -s), not
    asserted on: each check gets HEALTH_DEADLINE."""
    report_path = tmp_path / "heavy.json"
    command = [sys.executable, "-m", "tests.load.run_load", "--mode", "heavy-forward", "--seconds", "6"]
    command += ["--clients", "70", "--health-deadline", f"{HEALTH_DEADLINE:g}", "--json", str(report_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(result.stdout, result.stderr[-4000:], sep="\n")
    report = json.loads(report_path.read_text())
    assert report["errors"] == 0, report["error_samples"]
    assert report["methods"]["Forward"]["count"] > 0
    health = report["health"]
    assert health["count"] > 0 and health["not_serving"] == 0, health["failure_samples"]
    assert result.returncode == 0, result.stdout
