"""PostgreSQL stopped while a server is busy, then started again, under the same server process; and
PostgreSQL frozen (its processes SIGSTOPped: its sockets stay up and nothing answers, as when its
host hangs), then let go on (SIGCONT).

While it is out, calls that need the store answer UNAVAILABLE with a message naming PostgreSQL
(each call carries the issue's deadline of 10 s, and each answer of a Train stream is awaited as
long: an answer after it would be DEADLINE_EXCEEDED, or fail the wait, so the status proves the
answer came first), and nothing is half-written: every graph row has all its parameters, and the
trained graph holds exactly a committed checkpoint. Once PostgreSQL is back, the same server
answers again (retried until a deadline of 10 s) with nothing committed lost. The cluster is the
test's own, since it is stopped.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from chainrule.server.store import location
from chainrule.server.store.base import tensor_from_row
from chainrule.v1 import graph_service_pb2 as pb
from tests.postgres import PostgresServer
from tests.server_process import ServerProcess
from tests.test_crash_safety import listed_graphs
from tests.test_service import mlp_graph
from tests.test_training import assert_same_bits, batches, config, parameters, replay, sgd

CALL_SECONDS = 10
"""The deadline of each call made while PostgreSQL is down, and of each answer of the stream: the issue's bound."""
STREAM_SECONDS = 60
"""The deadline of the whole training stream, which runs before, during and after the stop."""
RECOVERY_SECONDS = 10
"""How long the same server may take to answer again once PostgreSQL is back: the issue's bound."""
OUTAGES = {
    "stopped": (lambda cluster: cluster.stop("fast"), lambda cluster: cluster.start()),
    "frozen": (PostgresServer.freeze, PostgresServer.thaw),
}


@pytest.fixture
def cluster() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.close()


def stored_graphs(cluster: PostgresServer, url: str) -> dict[str, tuple[int, dict[str, np.ndarray]]]:
    """Every stored graph's step and parameters, read from PostgreSQL directly."""
    with cluster.connect(url.rsplit("/", 1)[1]) as connection:
        steps = dict(connection.execute("SELECT graph_id, step FROM graphs").fetchall())
        found: dict[str, dict[str, np.ndarray]] = {graph_id: {} for graph_id in steps}
        for graph_id, name, dtype, shape, data in connection.execute(
            "SELECT graph_id, name, dtype, shape, data FROM parameters"
        ):
            found[graph_id][name] = tensor_from_row(dtype, shape, bytes(data))
    return {graph_id: (steps[graph_id], found[graph_id]) for graph_id in steps}


class GraphCreator:
    """Creates graphs (with parameters, so that a half-written one would show) until a call fails."""

    def __init__(self, stub) -> None:  # type: ignore[no-untyped-def]
        self.stub = stub
        self.acknowledged: list[str] = []
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                created = self.stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph()), timeout=CALL_SECONDS)
            except grpc.RpcError as error:
                self.error = error
                return
            self.acknowledged.append(created.graph.graph_id)


class Answers:
    """A stream's answers, each awaited for at most CALL_SECONDS (the stream's own deadline spans it all)."""

    def __init__(self, stream) -> None:  # type: ignore[no-untyped-def]
        self.queue: queue.Queue[pb.TrainResponse | grpc.RpcError] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:  # type: ignore[no-untyped-def]
        try:
            for response in stream:
                self.queue.put(response)
        except grpc.RpcError as error:
            self.queue.put(error)

    def next(self) -> pb.TrainResponse:
        try:
            answer = self.queue.get(timeout=CALL_SECONDS)
        except queue.Empty:
            pytest.fail(f"the stream gave no answer within {CALL_SECONDS} s")
        if isinstance(answer, grpc.RpcError):
            raise answer
        return answer


def expect_unavailable(call, *fragments: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error = raised.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()  # type: ignore[attr-defined]
    details: str = error.details()  # type: ignore[attr-defined]
    for fragment in fragments:
        assert fragment in details, details
    return details


def out_of_reach(
    stub: Any,
    stream: Answers,
    outbox: queue.Queue[pb.TrainRequest | None],
    creator: GraphCreator,
    graph_id: str,
    where: str,
) -> list[pb.TrainResponse]:
    """What the server answers while PostgreSQL is out: the stream's one more step (step 5 needs no store)."""
    creator.thread.join(CALL_SECONDS * 3)
    assert creator.error is not None and creator.error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"PostgreSQL at {where}" in creator.error.details()
    expect_unavailable(
        lambda: stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph()), timeout=CALL_SECONDS),
        "the graph store could not store graph",
        f"PostgreSQL at {where}",
        "nothing was written",
    )
    expect_unavailable(
        lambda: stub.GetGraph(pb.GetGraphRequest(graph_id=graph_id), timeout=CALL_SECONDS), f"PostgreSQL at {where}"
    )
    expect_unavailable(lambda: stub.ListGraphs(pb.ListGraphsRequest(), timeout=CALL_SECONDS), f"PostgreSQL at {where}")
    # Step 6's checkpoint is refused, and the stream says what is kept.
    outbox.put(batches(1)[0])
    step_5 = stream.next()
    outbox.put(batches(1)[0])
    details = expect_unavailable(stream.next, "could not save a checkpoint", f"PostgreSQL at {where}")
    assert "the stored graph is at step 4" in details or "back at step 4" in details, details
    return [step_5]


@pytest.mark.parametrize("outage", OUTAGES)
def test_postgresql_out_under_load_answers_unavailable_and_the_same_server_recovers(
    cluster: PostgresServer, outage: str
) -> None:
    begin, end = OUTAGES[outage]
    url = cluster.database()
    where = location.shown(url)
    server = ServerProcess(url).start()
    try:
        stub = server.stub()
        graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
        initial, _ = parameters(stub, graph_id)
        outbox: queue.Queue[pb.TrainRequest | None] = queue.Queue()
        outbox.put(config(graph_id, sgd(0.05, momentum=0.5), stream_updates=True, checkpoint_every=2))
        stream = Answers(stub.Train(iter(outbox.get, None), timeout=STREAM_SECONDS))
        responses = []
        for _ in range(4):  # steps 2 and 4 are committed
            outbox.put(batches(1)[0])
            responses.append(stream.next())
        creator = GraphCreator(stub)  # creates graphs until a call fails
        time.sleep(0.3)

        begin(cluster)  # stopped: every session of the server is ended mid-whatever; frozen: they all hang
        try:
            responses += out_of_reach(stub, stream, outbox, creator, graph_id, where)
        finally:
            end(cluster)
        deadline = time.monotonic() + RECOVERY_SECONDS
        while True:  # the same server, once PostgreSQL answers again
            try:
                created = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph()), timeout=CALL_SECONDS)
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                assert time.monotonic() < deadline, f"no recovery within {RECOVERY_SECONDS} s: {error.details()}"
                time.sleep(0.2)

        # Nothing committed is lost, nothing is half-written.
        stored = stored_graphs(cluster, url)
        acknowledged = [graph_id, *creator.acknowledged, created.graph.graph_id]
        assert set(acknowledged) <= set(stored)
        assert set(listed_graphs(stub)) == set(stored)
        for other_id, (step, values) in stored.items():
            if other_id != graph_id:  # created whole, or not at all
                assert step == 0, other_id
                assert_same_bits(values, initial)
        step, values = stored[graph_id]
        assert step == 4
        assert_same_bits(values, replay(initial, responses, 4))

        # And training goes on, committing again.
        more = list(stub.Train(iter([config(graph_id, sgd(0.05, momentum=0.5)), *batches(2)]), timeout=60))
        served, served_step = parameters(stub, graph_id)
        assert served_step == more[-1].step
        step, values = stored_graphs(cluster, url)[graph_id]
        assert step == served_step
        assert_same_bits(values, served)
        log = "".join(server.log)
        assert all(secret not in log for secret in location.secrets(url))
        assert f"PostgreSQL at {where}" in log, "the outage is logged"
    finally:
        server.kill()
