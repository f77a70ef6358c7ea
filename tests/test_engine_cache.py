"""The engine keeps at most --max-live-graphs graphs, within --max-live-memory-mb, compiled; never
evicts one a stream is training."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from chainrule.server import optim
from chainrule.server.engine import Engine
from chainrule.server.errors import NotFound
from chainrule.server.graph import build_graph
from chainrule.server.plan import Plan
from chainrule.server.store import SqliteStore
from chainrule.v1 import graph_pb2
from tests.gradcheck import input_node, make_graph, node, parameter
from tests.test_service import mlp_graph

X = np.linspace(-1, 1, 12).reshape(4, 3)
T = TypeVar("T")


def test_idle_graphs_beyond_the_limit_are_recompiled_with_their_committed_state(tmp_path: Path) -> None:
    engine = Engine(SqliteStore(str(tmp_path / "db")), max_live_graphs=2)
    first = engine.create_graph(mlp_graph()).graph_id
    session = engine.start_training(first, "loss", optim.Sgd(0.1), checkpoint_every=1000)
    for _ in range(3):
        session.step({"x": X})
    others = [engine.create_graph(mlp_graph()).graph_id for _ in range(3)]
    assert engine.live_graph_count == 2
    assert engine.live(first) is session.live, "the graph being trained stays compiled"
    trained, step = engine.get_parameters(first, [])
    session.finish()
    for _ in range(2):
        others.append(engine.create_graph(mlp_graph()).graph_id)
    assert engine.live_graph_count == 2
    recompiled, recompiled_step = engine.get_parameters(first, [])
    assert engine.live(first) is not session.live, "the idle graph was evicted and compiled again"
    assert recompiled_step == step == 3
    for name, value in trained.items():
        assert recompiled[name].tobytes() == value.tobytes()
    assert engine.live_graph_count == 2
    np.testing.assert_array_equal(
        engine.forward(others[0], {"x": X}, ["out"])[0], engine.forward(others[1], {"x": X}, ["out"])[0]
    )


def test_a_finished_session_is_unpinned_once_even_when_finished_twice(tmp_path: Path) -> None:
    engine = Engine(SqliteStore(str(tmp_path / "db")), max_live_graphs=1)
    graph_id = engine.create_graph(mlp_graph()).graph_id
    session = engine.start_training(graph_id, "loss", optim.Sgd(0.1))
    assert engine.live(graph_id).sessions == 1
    session.finish()
    session.finish()
    assert engine.live(graph_id).sessions == 0


def test_deleting_a_graph_drops_its_compiled_plan(tmp_path: Path) -> None:
    engine = Engine(SqliteStore(str(tmp_path / "db")))
    kept, deleted = (engine.create_graph(mlp_graph()).graph_id for _ in range(2))
    for graph_id in (kept, deleted):
        engine.forward(graph_id, {"x": X}, ["out"])
    assert engine.live_graph_count == 2
    engine.delete_graph(deleted)
    assert engine.live_graph_count == 1
    with pytest.raises(NotFound):
        engine.forward(deleted, {"x": X}, ["out"])
    assert engine.live_graph_count == 1


# ---------------------------------------------------------------- a memory budget (--max-live-memory-mb)
WEIGHTS = 100_000
"""Elements of each `weighted` graph's parameter: 800 KB, which dwarfs the rest of such a small graph."""


def weighted(seed: int) -> graph_pb2.Graph:
    weights = np.random.default_rng(seed).normal(size=WEIGHTS)
    nodes = [input_node("x", "float64", [-1, WEIGHTS]), parameter("w", weights), node("xw", "mul", "x", "w")]
    return make_graph([*nodes, node("loss", "mean", "xw")], f"weighted-{seed}")


def test_live_graphs_are_bounded_by_bytes_least_recently_used_first_never_one_being_trained(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "db"))
    one = Engine(store).live(Engine(store).create_graph(weighted(0)).graph_id).bytes
    engine = Engine(store, max_live_bytes=int(2.5 * one))
    trained, idle = (engine.create_graph(weighted(seed)).graph_id for seed in (1, 2))
    session = engine.start_training(trained, "loss", optim.Sgd(0.1))
    third = engine.create_graph(weighted(3)).graph_id
    assert live_ids(engine) == {trained, third}, "the least recently used idle graph goes first"
    assert engine.live_bytes <= engine.max_live_bytes
    fourth = engine.create_graph(weighted(4)).graph_id
    assert live_ids(engine) == {trained, fourth}, "the graph being trained stays, although least recently used"
    session.finish()
    engine.forward(idle, {"x": np.ones((1, WEIGHTS))}, ["loss"])
    assert live_ids(engine) == {fourth, idle}
    assert engine.live_bytes <= engine.max_live_bytes


def test_cached_schedules_and_checked_feed_shapes_count_toward_the_budget(tmp_path: Path) -> None:
    engine = Engine(SqliteStore(str(tmp_path / "db")))
    big, small = (engine.create_graph(graph).graph_id for graph in (tanh_chain(20_000), mlp_graph()))
    compiled = engine.live(big).bytes
    engine.forward(big, {"x": np.asarray(0.5)}, ["loss"])
    planned = engine.live(big).bytes
    assert planned > compiled * 1.2, "a schedule of the whole graph is counted"
    engine.forward(small, {"x": X}, ["out"])
    shapes = engine.live(small).plan.cache_bytes
    engine.forward(small, {"x": X[:2]}, ["out"])
    assert engine.live(small).plan.cache_bytes > shapes, "a newly checked feed shape is counted"
    # A budget that held both before the big graph's schedules: now its next pass pushes the small one out.
    engine.max_live_bytes = engine.live_bytes + 1
    engine.backward(big, {"x": np.asarray(0.5)}, "loss", ["x"])
    assert live_ids(engine) == {big}


def test_the_estimates_are_close_to_what_compiling_and_planning_allocate() -> None:
    """What the budget counts must be within a factor of 1.5 of what tracemalloc sees allocated."""
    plan: Plan | None = None

    def compile_chain() -> Plan:
        return Plan(build_graph(tanh_chain(20_000)))  # the DiGraph is dropped, its columns kept by the plan

    def plan_backward() -> None:
        assert plan is not None
        plan.backward({"x": np.asarray(0.5)}, {}, "loss", ["x"])

    compiled, plan = _traced(compile_chain)
    planned, _ = _traced(plan_backward)
    assert 1 / 1.5 <= plan.base_bytes / compiled <= 1.5, (plan.base_bytes, compiled)
    assert 1 / 1.5 <= plan.cache_bytes / planned <= 1.5, (plan.cache_bytes, planned)


def _traced(make: Callable[[], T]) -> tuple[int, T]:
    """The bytes still allocated once `make` returned (its temporaries freed), and what it returned."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = make()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, kept
    finally:
        tracemalloc.stop()


def live_ids(engine: Engine) -> set[str]:
    return set(engine._live)


def tanh_chain(length: int) -> graph_pb2.Graph:
    names = ["x", *[f"t{index}" for index in range(1, length - 1)], "loss"]
    nodes = [input_node("x", "float64", [])]
    nodes += [node(name, "tanh", previous) for previous, name in zip(names, names[1:], strict=False)]
    return make_graph(nodes, "chain")
