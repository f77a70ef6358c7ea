"""Crash safety: SIGKILL at random moments of free-flowing training, and writes the disk refuses.

The kill test runs one graph through many rounds of: start the server on the same database,
stream batches as fast as gRPC takes them (not in lockstep), SIGKILL the server after a random
delay, check the database file read-only, restart, and check what was recovered. The strongest
guarantee there is for a free-flowing stream is checked:

* `PRAGMA integrity_check` is ok and every graph whose CreateGraph was answered is still listed;
* the recovered step is one the server could have committed: the previous round's step plus a
  multiple of checkpoint_every (the stream never ended, so no end-of-stream commit), no more
  than the batches sent;
* the recovered parameters are bit for bit those of that step. The client may not have
  received every committed step's response (the kill drops what was in flight), so the test
  also runs the engine in-process on the same batches: every streamed update must equal the
  in-process one bit for bit, which makes the in-process run a faithful stand-in for the
  responses that never arrived; and when the client did receive them all, the recovered
  parameters must also equal the initial parameters plus the streamed updates.
  The optimizer state (momentum) is recovered too: the next round's updates depend on it.

Refused writes in a server process: chmod does not stop root, and nothing may be mounted, so
the server's RLIMIT_FSIZE is lowered to 0 with prlimit(2) (allowed on one's own child, root or
not; CPython ignores SIGXFSZ). Every write then fails with EFBIG, which SQLite reports as a disk
I/O error, as on a failing disk. A full disk proper (SQLITE_FULL, "database or disk is full") is
tested in-process with SQLite's max_page_count, which makes SQLite refuse any write that needs
one more page, as it does when the disk has none left.
"""

from __future__ import annotations

import json
import random
import resource
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainrule import tensors
from chainrule.server import optim
from chainrule.server.engine import Engine, StepResult
from chainrule.server.errors import Unavailable
from chainrule.server.store import SqliteStore
from chainrule.v1 import graph_pb2
from chainrule.v1 import graph_service_pb2 as pb
from tests.gradcheck import constant, input_node, make_graph, node, parameter
from tests.server_process import ServerProcess
from tests.test_service import expect_error, feeds, lecture_graph, mlp_graph
from tests.test_training import assert_same_bits, config, decoded, parameters, replay, sgd

ROUNDS = 12
SEED = 20240607
LEARNING_RATE, MOMENTUM = 0.05, 0.9
BATCH_XS = [np.random.default_rng(index).normal(size=(8, 3)) for index in range(7)]


def batch_x(index: int) -> np.ndarray:
    """The round's index-th batch: a cycle of distinct batches, so a step applied twice or skipped shows."""
    return BATCH_XS[index % len(BATCH_XS)]


def open_read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def check_database(db: Path, graph_id: str) -> tuple[int, dict[str, np.ndarray]]:
    """Integrity, then the graph's committed step and parameters, straight from the file."""
    connection = open_read_only(db)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
        (step,) = connection.execute("SELECT step FROM graphs WHERE graph_id = ?", (graph_id,)).fetchone()
        rows = connection.execute("SELECT name, dtype, shape, data FROM parameters WHERE graph_id = ?", (graph_id,))
        stored = {
            name: np.frombuffer(data, dtype=np.dtype(dtype)).reshape(json.loads(shape))
            for name, dtype, shape, data in rows
        }
    finally:
        connection.close()
    return step, stored


def listed_graphs(stub) -> list[str]:  # type: ignore[no-untyped-def]
    ids: list[str] = []
    token = ""
    while True:
        page = stub.ListGraphs(pb.ListGraphsRequest(page_size=1000, page_token=token))
        ids += [info.graph_id for info in page.graphs]
        token = page.next_page_token
        if not token:
            return ids


class Simulation:
    """The engine itself, in-process on a throwaway store: computes bit for bit what the server computes.

    Keeps the parameters and optimizer state after every step, so a round can start again from
    whichever step the server recovered.
    """

    def __init__(self) -> None:
        self.engine = Engine(SqliteStore(":memory:"))
        self.graph_id = self.engine.create_graph(mlp_graph()).graph_id
        live = self.engine.live(self.graph_id)
        self.states = {0: (live.parameters, live.optimizer_state)}

    def run(self, start: int, count: int, checkpoint_every: int) -> list[StepResult]:
        live = self.engine.live(self.graph_id)
        live.parameters, live.optimizer_state = self.states[start]
        live.step = live.committed_step = start
        session = self.engine.start_training(
            self.graph_id, "loss", optim.Sgd(LEARNING_RATE, MOMENTUM), checkpoint_every=checkpoint_every
        )
        results = []
        for index in range(count):
            results.append(session.step({"x": batch_x(index)}))
            self.states[live.step] = (live.parameters, live.optimizer_state)
        return results

    def parameters(self, step: int) -> dict[str, np.ndarray]:
        return dict(self.states[step][0])


@dataclass
class FreeStream:
    """A Train stream fed as fast as gRPC accepts batches, its responses collected by another thread."""

    stub: object
    graph_id: str
    checkpoint_every: int
    sent: int = 0
    responses: list[pb.TrainResponse] = field(default_factory=list)
    error: grpc.RpcError | None = None

    def __post_init__(self) -> None:
        self.first_response = threading.Event()
        self.call = self.stub.Train(self._requests())  # type: ignore[attr-defined]
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _requests(self):  # type: ignore[no-untyped-def]
        yield training_config(self.graph_id, self.checkpoint_every)
        index = 0
        while True:
            self.sent = index + 1  # counted before gRPC takes it: an upper bound on what the server saw
            yield pb.TrainRequest(batch=pb.Batch(feeds=feeds(x=batch_x(index))))
            index += 1

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.append(response)
                self.first_response.set()
        except grpc.RpcError as error:
            self.error = error
        self.first_response.set()


@dataclass
class GraphCreator:
    """Creates small graphs while training runs; remembers those whose creation was answered OK."""

    stub: object
    acknowledged: list[str] = field(default_factory=list)
    attempted: int = 0

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.attempted += 1
            try:
                info = self.stub.CreateGraph(pb.CreateGraphRequest(graph=lecture_graph()), timeout=10)  # type: ignore[attr-defined]
            except grpc.RpcError:
                return
            self.acknowledged.append(info.graph.graph_id)


def test_sigkill_at_random_moments_of_free_flowing_training_recovers_a_committed_checkpoint(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    db = tmp_path / "chainrule.db"
    server = ServerProcess(db).start()
    simulation = Simulation()
    try:
        stub = server.stub()
        graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
        acknowledged = [graph_id]
        base, base_step = parameters(stub, graph_id)
        assert base_step == 0
        assert_same_bits(base, simulation.parameters(0))
        beyond_received = 0
        for round_index in range(ROUNDS):
            every = rng.choice([2, 3])
            stream = FreeStream(stub, graph_id, every)
            creator = GraphCreator(stub)
            assert stream.first_response.wait(60), "no training response within 60 s"
            time.sleep(rng.uniform(0.0, 0.3))
            server.kill()
            stream.reader.join(60)
            creator.stop.set()
            creator.thread.join(60)
            assert stream.error is not None, "the stream outlived the server"
            received = stream.responses
            acknowledged += creator.acknowledged

            db_step, db_parameters = check_database(db, graph_id)
            server = ServerProcess(db).start()
            stub = server.stub()
            listed = listed_graphs(stub)
            assert set(acknowledged) <= set(listed), f"round {round_index}: an acknowledged graph was lost"
            unacknowledged = len(listed) - len(acknowledged)
            assert 0 <= unacknowledged <= round_index + 1, "more graphs than CreateGraph calls that may have landed"
            recovered, step = parameters(stub, graph_id)

            # One committed checkpoint, no later than what was sent.
            assert step == db_step
            assert_same_bits(recovered, db_parameters)
            assert [r.step for r in received] == list(range(base_step + 1, base_step + len(received) + 1))
            assert base_step <= step <= base_step + stream.sent
            assert (step - base_step) % every == 0, f"step {step} is not a checkpoint of a stream from {base_step}"

            # Bit for bit: streamed updates against the in-process engine, recovered parameters against both.
            simulated = simulation.run(base_step, max(len(received), step - base_step), every)
            for response, result in zip(received, simulated, strict=False):
                assert response.step == result.step
                assert_same_bits(decoded(list(response.updates)), result.updates)
            assert_same_bits(recovered, simulation.parameters(step))
            if step - base_step <= len(received):
                assert_same_bits(recovered, replay(base, received, step - base_step))
            else:
                beyond_received += 1
            base, base_step = recovered, step

        # The recovered optimizer state is the committed one: one more lockstep step agrees with the simulation.
        (response,) = list(stub.Train(iter([training_config(graph_id), batch(0)])))
        (result,) = simulation.run(base_step, 1, 3)
        assert response.step == base_step + 1
        assert_same_bits(decoded(list(response.updates)), result.updates)
        assert base_step > 0
        print(f"{ROUNDS} kills; final step {base_step}; {beyond_received} recovered a step the client never saw")
    finally:
        server.kill()


def training_config(graph_id: str, checkpoint_every: int = 3) -> pb.TrainRequest:
    return config(
        graph_id, sgd(LEARNING_RATE, momentum=MOMENTUM), stream_updates=True, checkpoint_every=checkpoint_every
    )


def batch(index: int) -> pb.TrainRequest:
    return pb.TrainRequest(batch=pb.Batch(feeds=feeds(x=batch_x(index))))


# ---------------------------------------------------------------- writes the disk refuses
REFUSED = ("graph store", "disk")
"""What an answer to a refused write says: which part failed, and SQLite's reason ("disk I/O error")."""


def refuse_writes(server: ServerProcess, refuse: bool) -> None:
    """RLIMIT_FSIZE 0: every write(2) to a regular file fails with EFBIG, for root too."""
    assert server.process is not None
    limit = 0 if refuse else resource.RLIM_INFINITY
    resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def test_refused_writes_answer_unavailable_keep_the_checkpoint_and_keep_serving_reads(tmp_path: Path) -> None:
    db = tmp_path / "chainrule.db"
    server = ServerProcess(db).start()
    try:
        stub = server.stub()
        graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
        other_id = stub.CreateGraph(pb.CreateGraphRequest(graph=lecture_graph())).graph.graph_id
        initial, _ = parameters(stub, graph_id)
        first = list(stub.Train(iter([training_config(graph_id), *[batch(i) for i in range(4)]])))
        committed = replay(initial, first, 4)
        assert_parameters(stub, graph_id, committed, 4)
        x = feeds(x=batch_x(0))
        before_forward = stub.Forward(pb.ForwardRequest(graph_id=graph_id, feeds=x, fetches=["loss", "out"]))

        refuse_writes(server, True)
        unavailable = grpc.StatusCode.UNAVAILABLE
        expect_error(
            unavailable, lambda: stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())), *REFUSED, "could not"
        )
        big = mlp_graph()
        big.nodes.add(name="big", op="parameter").value.CopyFrom(tensors.encode(np.ones(1 << 20)))
        expect_error(unavailable, lambda: stub.CreateGraph(pb.CreateGraphRequest(graph=big)), *REFUSED)
        assert listed_graphs(stub) == [graph_id, other_id]
        zeros = {name: np.zeros_like(value) for name, value in committed.items()}
        expect_error(
            unavailable,
            lambda: stub.SetParameters(
                pb.SetParametersRequest(graph_id=graph_id, parameters=tensors.encode_named(zeros))
            ),
            *REFUSED,
            "checkpoint",
        )
        assert_parameters(stub, graph_id, committed, 4)

        # A step whose checkpoint cannot be written is not applied: nothing streamed, nothing changed.
        every_step = training_config(graph_id, checkpoint_every=1)
        received: list[pb.TrainResponse] = []
        expect_error(unavailable, lambda: received.extend(stub.Train(iter([every_step, batch(4)]))), *REFUSED)
        assert received == []
        assert_parameters(stub, graph_id, committed, 4)

        # Steps between checkpoints run; the stream's end cannot be committed, so they are rolled back
        # in memory too (what clients read is what is stored), and the error says which step is committed.
        rarely = training_config(graph_id, checkpoint_every=100)
        expect_error(
            unavailable,
            lambda: received.extend(stub.Train(iter([rarely, *[batch(i) for i in range(3)]]))),
            *REFUSED,
            "steps 5 to 7 are not kept",
            "back at step 4, its last committed checkpoint",
        )
        assert [r.step for r in received] == [5, 6, 7]
        assert_parameters(stub, graph_id, committed, 4)

        # A delete that cannot be written changes nothing either.
        expect_error(unavailable, lambda: stub.DeleteGraph(pb.DeleteGraphRequest(graph_id=other_id)), *REFUSED)
        expect_error(unavailable, lambda: stub.DeleteGraph(pb.DeleteGraphRequest(graph_id=graph_id)), *REFUSED)
        assert listed_graphs(stub) == [graph_id, other_id]
        assert_parameters(stub, graph_id, committed, 4)

        # Reads keep being served.
        info = stub.GetGraph(pb.GetGraphRequest(graph_id=graph_id, include_definition=True))
        assert info.definition == mlp_graph() and info.graph.step == 4
        assert stub.GetGraph(pb.GetGraphRequest(graph_id=other_id)).graph.step == 0
        lecture = stub.Forward(pb.ForwardRequest(graph_id=other_id, feeds=feeds(x=1.0, y=2.0, z=3.0), fetches=["f"]))
        assert float(tensors.decode(lecture.outputs[0].tensor)) == 9.0
        forward = stub.Forward(pb.ForwardRequest(graph_id=graph_id, feeds=x, fetches=["loss", "out"]))
        assert forward.outputs == before_forward.outputs, "the committed parameters of step 4"
        gradients = list(stub.Backward(pb.BackwardRequest(graph_id=graph_id, feeds=x, loss="loss")))
        assert sorted(g.name for g in gradients) == ["b1", "w1", "w2"]
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )

        # On disk: the last checkpoint, intact.
        step, stored = check_database(db, graph_id)
        assert step == 4
        assert_same_bits(stored, committed)

        # Once the disk takes writes again, so does the server, without a restart.
        refuse_writes(server, False)
        more = list(stub.Train(iter([training_config(graph_id), batch(7), batch(8)])))
        assert [r.step for r in more] == [5, 6]
        final = replay(committed, more, 2)
        assert_parameters(stub, graph_id, final, 6)
        third = stub.CreateGraph(pb.CreateGraphRequest(graph=lecture_graph())).graph.graph_id

        # And a crash then recovers exactly that.
        server.kill()
        step, stored = check_database(db, graph_id)
        assert step == 6
        assert_same_bits(stored, final)
        server = ServerProcess(db).start()
        stub = server.stub()
        assert listed_graphs(stub) == [graph_id, other_id, third]
        assert_parameters(stub, graph_id, final, 6)
    finally:
        server.kill()


def assert_parameters(stub, graph_id: str, expected: dict[str, np.ndarray], step: int) -> None:  # type: ignore[no-untyped-def]
    got, got_step = parameters(stub, graph_id)
    assert got_step == step
    assert_same_bits(got, expected)


# ---------------------------------------------------------------- the database file deleted under the server
def test_writes_fail_once_the_database_file_is_deleted_and_health_turns_not_serving(tmp_path: Path) -> None:
    """SQLite keeps writing to a deleted file it has open, and all of it is gone at the next start:
    the server must refuse those writes instead of answering OK."""
    db = tmp_path / "chainrule.db"
    server = ServerProcess(db).start()
    try:
        stub = server.stub()
        graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
        health = health_pb2_grpc.HealthStub(server.channel())
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
        for suffix in ("", "-wal", "-shm"):  # the database, its WAL and shared-memory index
            tmp_path.joinpath(f"chainrule.db{suffix}").unlink(missing_ok=True)

        unavailable = grpc.StatusCode.UNAVAILABLE
        gone = (str(db), "deleted or replaced")
        expect_error(unavailable, lambda: stub.CreateGraph(pb.CreateGraphRequest(graph=lecture_graph())), *gone)
        received: list[pb.TrainResponse] = []
        expect_error(
            unavailable,
            lambda: received.extend(stub.Train(iter([training_config(graph_id, checkpoint_every=1), batch(0)]))),
            *gone,
        )
        assert received == []
        expect_error(unavailable, lambda: stub.DeleteGraph(pb.DeleteGraphRequest(graph_id=graph_id)), *gone)
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == not_serving
        service = "chainrule.v1.GraphService"
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == not_serving
        assert any("deleted or replaced" in line for line in server.log), "the server log says why"
    finally:
        server.kill()

    # A new database in its place is a fresh start, not the old one with some writes missing.
    server = ServerProcess(db).start()
    try:
        assert listed_graphs(server.stub()) == []
    finally:
        server.kill()


def test_a_database_file_replaced_under_the_server_is_detected_too(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "chainrule.db"))
    lost: list[str] = []
    store.on_lost = lost.append
    engine = Engine(store)
    engine.create_graph(mlp_graph())
    (tmp_path / "chainrule.db").rename(tmp_path / "moved.db")
    (tmp_path / "chainrule.db").write_bytes(b"")
    with pytest.raises(Unavailable) as raised:
        engine.create_graph(mlp_graph())
    assert raised.value.reason == "STORE_LOST"
    assert len(lost) == 1 and "replaced" in lost[0]


# ---------------------------------------------------------------- a full disk
def test_a_checkpoint_the_full_disk_refuses_rolls_the_graph_back_to_what_is_stored(tmp_path: Path) -> None:
    """SQLITE_FULL for real: SQLite's max_page_count caps the database at its current size, and SQLite
    then refuses a write that needs another page exactly as it refuses one on a full disk ("database
    or disk is full"). Unlike a small filesystem, this needs no mount and no root, so CI runs it."""
    db = tmp_path / "chainrule.db"
    store = SqliteStore(str(db))
    engine = Engine(store)
    graph_id = engine.create_graph(wide_graph()).graph_id
    initial, _ = engine.get_parameters(graph_id, [])
    session = engine.start_training(graph_id, "loss", optim.Adam(0.01), checkpoint_every=100)
    for _ in range(3):
        session.step({"x": WIDE_X})
    assert engine.get_parameters(graph_id, [])[1] == 3
    full = _cap_at_current_size(store)
    with pytest.raises(Unavailable) as raised:
        session.finish()  # the end of the stream commits Adam's new moments: more pages than the disk has
    assert "database or disk is full" in raised.value.message
    assert "steps 1 to 3 are not kept" in raised.value.message
    assert "back at step 0, its last committed checkpoint" in raised.value.message
    parameters, step = engine.get_parameters(graph_id, [])
    assert step == 0, "what clients read is what is stored"
    assert_same_bits(parameters, initial)
    assert engine.live(graph_id).optimizer_state == {}
    # A restart reads the same from the file.
    assert Engine(SqliteStore(str(db))).get_parameters(graph_id, [])[1] == 0

    # With room again, training goes on from the committed step.
    _cap(store, full * 100)
    session = engine.start_training(graph_id, "loss", optim.Adam(0.01), checkpoint_every=100)
    assert session.step({"x": WIDE_X}).step == 1
    session.finish()
    assert Engine(SqliteStore(str(db))).get_parameters(graph_id, [])[1] == 1


WIDE = 50_000
WIDE_X = np.linspace(-1, 1, 2 * WIDE).reshape(2, WIDE)


def wide_graph() -> graph_pb2.Graph:
    """loss = mean((x w - 1)^2) with a parameter of 400 KB, whose Adam moments need new pages."""
    nodes = [input_node("x", "float64", [-1, WIDE]), parameter("w", np.zeros(WIDE)), node("xw", "mul", "x", "w")]
    nodes += [
        constant("one", 1.0),
        node("d", "sub", "xw", "one"),
        node("sq", "square", "d"),
        node("loss", "mean", "sq"),
    ]
    return make_graph(nodes, "wide")


def _cap_at_current_size(store: SqliteStore) -> int:
    with store._lock:
        (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    _cap(store, pages)
    return int(pages)


def _cap(store: SqliteStore, pages: int) -> None:
    """PRAGMA max_page_count holds for one connection: set it on the store's own."""
    with store._lock:
        store._db.execute(f"PRAGMA max_page_count = {pages}")
