"""On a store several servers share, a server checks its cached copy of a graph against the stored
version once per call (README, Scaling out): that read is the price of any call on PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import chainrule.client as cr
from chainrule.server.app import RunningServer, ServerOptions
from tests.postgres import PostgresServer
from tests.test_jobs import data, logistic_graph


class VersionReads:
    """Counts the real store's version reads of one graph."""

    def __init__(self, server: RunningServer) -> None:
        self.count = 0
        self._lock = threading.Lock()
        read = server.store.graph_version

        def counted(graph_id: str, tenant: str) -> int | None:
            with self._lock:
                self.count += 1
            return read(graph_id, tenant)

        server.store.graph_version = counted  # type: ignore[method-assign]

    def during(self, call: Callable[[], object]) -> int:
        before = self.count
        call()
        return self.count - before


@pytest.fixture
def server(postgres: PostgresServer) -> Iterator[RunningServer]:
    running = RunningServer(ServerOptions(db=str(postgres.database()), port=0))
    running.start()
    yield running
    running.stop()


def test_forward_and_backward_read_the_graphs_version_once(server: RunningServer) -> None:
    reads = VersionReads(server)
    x, y = data(8)
    feeds = {"x": x, "y": y}
    with cr.Client(server.address, timeout=30) as client:
        graph_id = client.create_graph(logistic_graph()).graph_id
        client.forward(graph_id, feeds, ["loss"])  # compiles it: now it is live
        assert reads.during(lambda: client.forward(graph_id, feeds, ["loss"])) == 1
        assert reads.during(lambda: dict(client.backward(graph_id, feeds, "loss"))) == 1
        loss = client.forward(graph_id, feeds, ["loss"])["loss"]
    assert np.isfinite(loss)
