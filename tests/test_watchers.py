"""WatchJob streams have a budget of their own (--max-watchers, --max-watchers-per-tenant) and threads
of their own: more watchers than --max-concurrent-rpcs each get every event, while calls and health
checks go on being answered; the watcher beyond a limit is refused, naming the flag.

Watchers of the same job on the same server share each step's encoding; that every one of them still
gets every step once, in order, with the job's own values, is what these tests and test_jobs.py's
watcher tests check.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import chainrule.client as cr
from tests.server_process import ServerProcess
from tests.test_jobs import WAIT_SECONDS, data, logistic_graph, wait_for

WATCHERS = 12
CALLS = 4


class Watcher:
    """A WatchJob stream read to its end on a thread of its own, keeping every event."""

    def __init__(self, job: cr.Job) -> None:
        self.events: list[cr.JobEvent] = []
        self.error: cr.ChainruleError | None = None
        self.watch = job.watch()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.watch:
                self.events.append(event)
        except cr.ChainruleError as error:
            self.error = error

    def join(self) -> list[cr.JobEvent]:
        self.thread.join(WAIT_SECONDS)
        assert not self.thread.is_alive(), "a watch did not end"
        assert self.error is None, self.error
        return self.events


def endless_job(client: cr.Client, graph_id: str, dataset_id: str) -> cr.Job:
    return client.create_job(
        graph_id,
        dataset_id,
        loss="loss",
        optimizer=cr.Sgd(0.01),
        feeds={"x": "x", "y": "y"},
        batch_size=16,
        max_steps=10**9,
        checkpoint_every=50,
    )


def refused_watch(job: cr.Job) -> cr.ChainruleError:
    with pytest.raises(cr.ChainruleError) as raised, job.watch() as watch:
        next(watch)
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value
    assert raised.value.reason == "TOO_MANY_WATCHERS", raised.value
    return raised.value


@pytest.fixture
def crowded(tmp_path: Path) -> Iterator[ServerProcess]:
    """Room for 4 calls on 6 threads, and for 12 watchers."""
    args = ["--workers", "6", "--max-concurrent-rpcs", str(CALLS), "--max-concurrent-rpcs-per-tenant", str(CALLS)]
    args += ["--max-watchers", str(WATCHERS), "--max-watchers-per-tenant", str(WATCHERS)]
    process = ServerProcess(tmp_path / "chainrule.db", args).start()
    yield process
    process.kill()


def test_more_watchers_than_calls_get_every_event_while_calls_and_health_checks_answer(
    crowded: ServerProcess,
) -> None:
    with cr.Client(crowded.address, timeout=WAIT_SECONDS) as client:
        x, y = data(256)
        graph_id = client.create_graph(logistic_graph()).graph_id
        dataset = client.upload_dataset("watched", {"x": x, "y": y}, progress=False)
        job = endless_job(client, graph_id, dataset.dataset_id)
        watchers = [Watcher(job) for _ in range(WATCHERS)]
        wait_for(lambda: all(any(e.state is None for e in w.events) for w in watchers), "every watcher's first step")

        # Three times --max-concurrent-rpcs are watching: calls and health checks are still answered.
        assert job.info().state == "running"
        outputs = client.forward(graph_id, {"x": x[:4]}, ["logits"])
        assert np.shape(outputs["logits"]) == (4, 1)
        health = health_pb2_grpc.HealthStub(crowded.channel())
        check = health.Check(health_pb2.HealthCheckRequest(service="chainrule.v1.JobService"), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert len(client.list_jobs()) == 1
        # One more watcher is one too many.
        error = refused_watch(job)
        assert f"{WATCHERS} WatchJob streams, its limit (--max-watchers)" in error.message

        job.cancel()
        events = [watcher.join() for watcher in watchers]
        info = job.info()
        assert info.state == "cancelled" and info.step > 0
        history = job.history()
        assert history.steps == list(range(1, info.step + 1))
        for watched in events:
            steps = [event for event in watched if event.state is None]
            assert [event.step for event in steps] == history.steps
            assert [event.loss for event in steps] == history.losses
            states = [event.state for event in watched if event.state is not None]
            assert states[0] in ("queued", "running") and states[-1] == "cancelled" and watched[-1].state == "cancelled"
            assert states == sorted(set(states), key=states.index), states  # no state twice
        # The watchers' slots are free again.
        assert list(job.watch())[-1].state == "cancelled"


TOKENS = {"alice": "alice-token-1", "bob": "bob-token-2"}


def test_one_tenant_cannot_take_every_watcher_slot(tmp_path: Path) -> None:
    """--max-watchers 4 gives each tenant 2 by default: alice's third watcher is refused while bob's
    are admitted; watching is not a call, so neither takes a slot of --max-concurrent-rpcs 1."""
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{token} {tenant}\n" for tenant, token in TOKENS.items()))
    args = ["--auth-tokens", str(tokens), "--workers", "2", "--max-concurrent-rpcs", "1", "--max-watchers", "4"]
    server = ServerProcess(tmp_path / "chainrule.db", args).start()
    try:
        clients = {name: cr.Client(server.address, token=token, timeout=WAIT_SECONDS) for name, token in TOKENS.items()}
        x, y = data(64)
        jobs: dict[str, cr.Job] = {}
        for tenant, client in clients.items():
            graph_id = client.create_graph(logistic_graph()).graph_id
            dataset = client.upload_dataset("watched", {"x": x, "y": y}, progress=False)
            jobs[tenant] = endless_job(client, graph_id, dataset.dataset_id)
        alices = [Watcher(jobs["alice"]) for _ in range(2)]
        wait_for(lambda: all(w.events for w in alices), "alice's watchers' first events")
        error = refused_watch(jobs["alice"])
        assert "2 WatchJob streams open, its limit (--max-watchers-per-tenant)" in error.message
        bobs = [Watcher(jobs["bob"]) for _ in range(2)]
        wait_for(lambda: all(w.events for w in bobs), "bob's watchers' first events")
        assert clients["bob"].get_job(jobs["bob"].job_id).info().state in ("queued", "running")
        jobs["bob"].cancel()  # queued behind alice's on the one job worker: cancelled at once
        jobs["alice"].cancel()
        for watcher in alices + bobs:
            assert watcher.join()[-1].state == "cancelled"
        for client in clients.values():
            client.close()
    finally:
        server.kill()
