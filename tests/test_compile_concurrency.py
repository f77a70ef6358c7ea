"""Compiling one graph never holds up calls on other graphs, and stops when nobody waits for it.

A big graph is compiled when it is first used after a restart (or an eviction). To observe a
compilation in progress without depending on how long it takes, the store under the engine is
the real SQLite store whose `definition` read of the big graph waits until the test releases
it: from the moment that read starts until the release, the big graph's compilation is in
progress, and everything the test checks in between happened while it was.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from chainrule.server import optim
from chainrule.server.engine import Engine
from chainrule.server.errors import Cancelled, NotFound
from chainrule.server.graph import build_graph
from chainrule.server.plan import Plan, StopFlag
from chainrule.server.store import SqliteStore
from chainrule.v1 import graph_service_pb2 as pb
from tests.gradcheck import input_node, make_graph, node
from tests.server_process import ServerProcess
from tests.test_service import feeds, mlp_graph
from tests.test_training import batches, config, sgd

BIG_NODES = 20_000
SERVER_BIG_NODES = 120_000
"""Enough for a compilation of a few seconds on any machine, against milliseconds for the small calls."""
JOIN_SECONDS = 60.0
"""Only a bound on a hung test: every wait below ends as soon as the event it waits for happens."""
X = np.linspace(-1, 1, 12).reshape(4, 3)
CHAIN_FEEDS = {"x": np.asarray(0.5)}


class PausingStore(SqliteStore):
    """SQLite, with the read of one graph's definition held until `release` is set."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.paused_graph = ""
        self.reading = threading.Event()
        self.release = threading.Event()
        self.definition_reads: Counter[str] = Counter()

    def definition(self, graph_id: str) -> bytes | None:
        self.definition_reads[graph_id] += 1
        if graph_id == self.paused_graph:
            self.reading.set()
            self.release.wait(JOIN_SECONDS)
        return super().definition(graph_id)


class Outcome:
    """A call on a thread of its own: its result or its error, and when it ended relative to others."""

    def __init__(self, call: Callable[[], object], events: list[str], name: str) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(call, events, name), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], object], events: list[str], name: str) -> None:
        try:
            self.result = call()
        except BaseException as error:
            self.error = error
        events.append(name)

    def join(self) -> None:
        self.thread.join(JOIN_SECONDS)
        assert not self.thread.is_alive(), "the call hung"


def three_nodes():  # type: ignore[no-untyped-def]
    return make_graph([input_node("x", "float64", []), node("e", "exp", "x"), node("n", "neg", "e")], "three")


def chain(length: int):  # type: ignore[no-untyped-def]
    """x -> tanh -> tanh ... -> loss: `length` nodes in all."""
    names = ["x", *[f"t{index}" for index in range(1, length - 1)], "loss"]
    graph = make_graph([input_node("x", "float64", [])], "chain")
    for previous, name in zip(names, names[1:], strict=False):
        graph.nodes.add(name=name, op="tanh", inputs=[previous])
    return graph


@pytest.fixture
def restarted(tmp_path: Path) -> tuple[PausingStore, Engine, str, str]:
    """A big chain and the MLP created by one engine, and a fresh engine on the same store: a restart."""
    store = PausingStore(str(tmp_path / "chainrule.db"))
    first = Engine(store)
    big = first.create_graph(chain(BIG_NODES)).graph_id
    small = first.create_graph(mlp_graph()).graph_id
    return store, Engine(store), big, small


def test_small_calls_on_other_graphs_finish_while_a_big_graph_compiles(
    restarted: tuple[PausingStore, Engine, str, str],
) -> None:
    store, engine, big, trained = restarted
    engine.live(trained)
    store.paused_graph = big
    events: list[str] = []
    forward = Outcome(lambda: engine.forward(big, CHAIN_FEEDS, ["loss"]), events, "big forward")
    try:
        assert store.reading.wait(JOIN_SECONDS), "the big graph's compilation did not start"
        created = Outcome(lambda: engine.create_graph(three_nodes()), events, "3-node create")
        created.join()

        def one_step() -> int:
            session = engine.start_training(trained, "loss", optim.Sgd(0.1), checkpoint_every=1)
            try:
                return session.step({"x": X}).step
            finally:
                session.finish()

        stepped = Outcome(one_step, events, "1-step train")
        stepped.join()
        assert events == ["3-node create", "1-step train"], "the small calls waited for the big compilation"
        assert created.error is None and stepped.error is None and stepped.result == 1
    finally:
        store.release.set()
    forward.join()
    assert forward.error is None
    assert events[-1] == "big forward"


def test_concurrent_first_calls_of_one_graph_share_one_compilation(
    restarted: tuple[PausingStore, Engine, str, str],
) -> None:
    store, engine, big, _ = restarted
    store.paused_graph = big
    events: list[str] = []
    first = Outcome(lambda: engine.forward(big, CHAIN_FEEDS, ["loss"]), events, "first")
    try:
        assert store.reading.wait(JOIN_SECONDS)
        second = Outcome(lambda: engine.backward(big, CHAIN_FEEDS, "loss", ["x"]), events, "second")
        assert engine.compiling == [big]
    finally:
        store.release.set()
    first.join()
    second.join()
    assert first.error is None and second.error is None
    assert store.definition_reads[big] == 1, "each caller compiled the graph on its own"
    assert engine.compiling == []


def test_a_caller_that_gives_up_returns_at_once_and_the_compilation_nobody_waits_for_stops(
    restarted: tuple[PausingStore, Engine, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    store, engine, big, _ = restarted
    store.paused_graph = big
    events: list[str] = []
    deadline = StopFlag()
    forward = Outcome(lambda: engine.forward(big, CHAIN_FEEDS, ["loss"], stop=deadline), events, "forward")
    try:
        assert store.reading.wait(JOIN_SECONDS)
        deadline.stopped = True  # what the service does when the call's deadline passes or its client cancels
        forward.join()
        assert isinstance(forward.error, Cancelled), forward.error
        assert "compiling graph" in forward.error.message
        assert engine.compiling == [big], "the caller returned while the compilation was still in progress"
    finally:
        with caplog.at_level(logging.INFO, logger="chainrule.server"):
            store.release.set()
            wait_until(lambda: not engine.compiling)
    assert engine.live_graph_count == 0, "the compilation ran to the end although nobody waited for it"
    assert any(f"stopped compiling graph '{big}'" in record.getMessage() for record in caplog.records)
    # The next call compiles the graph afresh and gets its answer.
    store.paused_graph = ""
    [loss] = engine.forward(big, CHAIN_FEEDS, ["loss"])
    assert np.isfinite(loss)


def test_a_compilation_goes_on_while_any_caller_still_waits(
    restarted: tuple[PausingStore, Engine, str, str],
) -> None:
    store, engine, big, _ = restarted
    store.paused_graph = big
    events: list[str] = []
    impatient = StopFlag()
    gives_up = Outcome(lambda: engine.forward(big, CHAIN_FEEDS, ["loss"], stop=impatient), events, "gives up")
    try:
        assert store.reading.wait(JOIN_SECONDS)
        waits = Outcome(lambda: engine.forward(big, CHAIN_FEEDS, ["loss"]), events, "waits")
        wait_until(lambda: engine.waiting_for(big) == 2)
        impatient.stopped = True
        gives_up.join()
        assert isinstance(gives_up.error, Cancelled)
    finally:
        store.release.set()
    waits.join()
    assert waits.error is None and engine.live_graph_count == 1


def test_deleting_a_graph_while_it_compiles_answers_not_found(
    restarted: tuple[PausingStore, Engine, str, str],
) -> None:
    store, engine, big, _ = restarted
    store.paused_graph = big
    events: list[str] = []
    forward = Outcome(lambda: engine.forward(big, CHAIN_FEEDS, ["loss"]), events, "forward")
    try:
        assert store.reading.wait(JOIN_SECONDS)
        engine.delete_graph(big)
    finally:
        store.release.set()
    forward.join()
    assert isinstance(forward.error, NotFound)
    assert engine.live_graph_count == 0 and engine.compiling == []


class StopsAfter(StopFlag):
    """A stop flag that a build sees raised from its `checks`-th look on: as if its call ended midway."""

    def __init__(self, checks: int) -> None:
        self.looks = 0
        self.checks = checks

    @property  # type: ignore[override]
    def stopped(self) -> bool:
        self.looks += 1
        return self.looks >= self.checks


def test_a_create_graph_whose_call_ends_stops_building_and_stores_nothing(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "chainrule.db"))
    engine = Engine(store)
    stop = StopsAfter(checks=3)
    with pytest.raises(Cancelled):
        engine.create_graph(chain(BIG_NODES), stop=stop)
    assert stop.looks == stop.checks, "the build went on after its call had ended"
    assert engine.list_graphs(0, "")[0] == [] and engine.live_graph_count == 0
    store.close()


def test_through_a_server_with_one_compute_slot_small_calls_finish_while_a_big_graph_compiles(
    tmp_path: Path,
) -> None:
    """`--max-concurrent-compute 1`: the first Forward of a big graph compiles it without holding the
    slot, so a CreateGraph and a 1-step Train on another graph go through while it compiles. The order
    is read from the server's log: both calls end before the compilation does."""
    db = tmp_path / "chainrule.db"
    store = SqliteStore(str(db))
    creator = Engine(store)
    big = creator.create_graph(chain(SERVER_BIG_NODES)).graph_id
    trained = creator.create_graph(mlp_graph()).graph_id
    store.close()
    server = ServerProcess(db, ["--max-concurrent-compute", "1"]).start()
    try:
        stub = server.stub()
        forward = stub.Forward.future(
            pb.ForwardRequest(graph_id=big, feeds=feeds(x=0.5), fetches=["loss"]), timeout=JOIN_SECONDS
        )
        server.wait_for_line(f"compiling graph '{big}'")
        stub.CreateGraph(pb.CreateGraphRequest(graph=three_nodes()), timeout=JOIN_SECONDS)
        requests = [config(trained, sgd(0.1), checkpoint_every=1), *batches(1)]
        assert [response.step for response in stub.Train(iter(requests), timeout=JOIN_SECONDS)] == [1]
        server.wait_for_line(f"compiled graph '{big}'")
        forward.cancel()
        log = "".join(server.log)
        compiled = log.index(f"compiled graph '{big}'")
        assert log.index("CreateGraph OK") < compiled, "the CreateGraph waited for the big compilation"
        assert log.index("Train OK") < compiled, "the 1-step Train waited for the big compilation"
    finally:
        server.kill()


# ---------------------------------------------------------------- planning a pass and checking its memory
def chain_plan() -> Plan:
    return Plan(build_graph(chain(BIG_NODES)), max_request_bytes=1 << 30)


def test_a_cancelled_first_call_stops_planning_and_caches_nothing() -> None:
    plan = chain_plan()
    stop = StopFlag()
    stop.stopped = True
    for call in (
        lambda: plan.forward(CHAIN_FEEDS, {}, ["loss"], stop),
        lambda: plan.backward(CHAIN_FEEDS, {}, "loss", ["x"], stop=stop),
    ):
        with pytest.raises(Cancelled) as raised:
            call()
        assert "planning" in raised.value.message
    wait_until(lambda: not plan.building)
    assert plan.cache_bytes == 0, "a schedule nobody waited for was built and cached"
    [loss] = plan.forward(CHAIN_FEEDS, {}, ["loss"])
    assert np.isfinite(loss) and plan.cache_bytes > 0


def test_a_cancelled_call_stops_checking_its_memory_estimate() -> None:
    nodes = [input_node("x", "float64", [-1]), *[node(f"e{i}", "exp", f"e{i - 1}" if i else "x") for i in range(2000)]]
    plan = Plan(build_graph(make_graph(nodes)), max_request_bytes=1 << 30)
    plan.forward({"x": np.zeros(3)}, {}, ["e1999"])
    checked = plan.cache_bytes
    stop = StopFlag()
    stop.stopped = True
    with pytest.raises(Cancelled) as raised:
        plan.forward({"x": np.zeros(5)}, {}, ["e1999"], stop)  # a new batch size: a new estimate
    assert "estimating" in raised.value.message
    assert plan.cache_bytes == checked, "the estimate of a cancelled call was recorded as checked"


def wait_until(condition: Callable[[], bool]) -> None:
    done = threading.Event()
    for _ in range(int(JOIN_SECONDS / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("the condition never held")
