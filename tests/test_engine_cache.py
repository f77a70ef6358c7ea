"""The engine keeps at most --max-live-graphs graphs compiled, never one a stream is training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chainrule.server import optim
from chainrule.server.engine import Engine
from chainrule.server.errors import NotFound
from chainrule.server.store import SqliteStore
from tests.test_service import mlp_graph

X = np.linspace(-1, 1, 12).reshape(4, 3)


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
