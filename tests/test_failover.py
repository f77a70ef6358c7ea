"""Jobs on several servers sharing one PostgreSQL database: the server running a job is killed
(SIGKILL), several rounds; another takes the job over once its lease lapses and resumes it from
its last commit, so it ends with the parameters and the history of an uninterrupted run, bit for
bit, `worker` naming each server that ran it and `resumes` counting the takeovers. A watcher that
follows the job from server to server gets every step once, in order. Cancel and watch work from
a server that does not run the job.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

import chainrule.client as cr
from chainrule.v1 import job_service_pb2 as jpb
from tests.postgres import PostgresServer
from tests.server_process import ServerProcess
from tests.test_cluster import raw_job, start_servers
from tests.test_jobs import assert_same_bits, wait_for
from tests.test_jobs_crash import network

SEED = 20261201
ROUNDS = 3
TOTAL_STEPS = 1500
CHECKPOINT_EVERY = 23


def start_job(client: cr.Client, graph_id: str, dataset_id: str, max_steps: int = TOTAL_STEPS) -> cr.Job:
    """Everything a step depends on: Adam's state, dropout, a shuffled order, a schedule, evaluations."""
    return client.create_job(
        graph_id,
        dataset_id,
        loss="loss",
        optimizer=cr.Adam(0.01),
        feeds={"x": "x", "y": "y"},
        batch_size=16,
        max_steps=max_steps,
        seed=SEED,
        shuffle=True,
        checkpoint_every=CHECKPOINT_EVERY,
        evaluation=cr.Evaluation(["accuracy", "loss"], every_steps=250, batch_size=64),
        schedule=cr.Cosine(period_steps=1200, min_learning_rate=0.001, warmup_steps=50),
    )


def training_data() -> dict[str, np.ndarray]:
    x = np.random.default_rng(1).normal(size=(200, 6))
    return {"x": x, "y": (np.sin(x[:, :1] * 2) + x[:, 1:2] > 0).astype(np.float64)}


class Servers:
    """The live servers of a test, which the test kills and replaces while others read the list."""

    def __init__(self, processes: list[ServerProcess]) -> None:
        self.processes = processes
        self.lock = threading.Lock()

    def alive(self) -> list[ServerProcess]:
        with self.lock:
            return list(self.processes)

    def running(self, job_id: str) -> ServerProcess:
        """The server whose worker runs the job now."""
        found: list[ServerProcess] = []

        def look() -> bool:
            servers = self.alive()
            worker = raw_job(servers[0], job_id).worker
            found[:] = [server for server in servers if server.address == worker]
            return bool(found)

        wait_for(look, f"a live server to run job {job_id}")
        return found[0]

    def replace(self, killed: ServerProcess, url: str) -> None:
        (fresh,) = start_servers(url, 1)
        with self.lock:
            self.processes = [fresh if server is killed else server for server in self.processes]

    def kill_all(self) -> None:
        for server in self.alive():
            server.kill()


class Follower(threading.Thread):
    """Watches a job to its end through whichever server is alive, watching again from the next step
    when its server goes away, as a client that outlives servers does."""

    def __init__(self, servers: Servers, job_id: str) -> None:
        super().__init__(daemon=True)
        self.servers = servers
        self.job_id = job_id
        self.steps: list[int] = []
        self.states: list[str] = []
        self.losses: list[float] = []
        self.start()

    def run(self) -> None:
        turn = 0
        while not self.states or self.states[-1] in ("queued", "running"):
            server = self.servers.alive()[turn % 2]
            turn += 1
            try:
                with cr.Client(server.address, timeout=60) as client:
                    for event in client.get_job(self.job_id).watch(from_step=len(self.steps) + 1):
                        if event.state is None:
                            self.steps.append(event.step)
                            self.losses.append(event.loss)
                        else:
                            self.states.append(event.state)
            except cr.ChainruleError:
                time.sleep(0.1)  # that server went away: watch again on another


def kill_the_runner(servers: Servers, job_id: str, step: int, delay: float, url: str) -> int:
    """SIGKILL the server running the job once it reaches `step` (and `delay` seconds more: mid-step,
    mid-commit or mid-evaluation), start a fresh one in its place, and wait for a server to take the
    job over and go on; the step it has reached then."""
    victim = servers.running(job_id)
    wait_for(lambda: raw_job(victim, job_id).step >= step, f"job step {step}")
    time.sleep(delay)
    resumes = raw_job(victim, job_id).resumes
    victim.kill()
    survivor = next(server for server in servers.alive() if server is not victim)
    left = raw_job(survivor, job_id)
    assert left.state == jpb.JOB_STATE_RUNNING, "the job ended before the kill"
    servers.replace(victim, url)

    def taken_over() -> bool:
        now = raw_job(survivor, job_id)
        return now.resumes == resumes + 1 and now.step > left.step

    wait_for(taken_over, "another server to take the job over and go on")
    moved = raw_job(survivor, job_id)
    assert moved.worker != victim.address and moved.worker in {server.address for server in servers.alive()}
    return moved.step


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.database()


def test_a_job_whose_server_is_killed_is_taken_over_and_ends_as_if_never_interrupted(url: str) -> None:
    rng = random.Random(SEED)
    servers = Servers(start_servers(url, 2))
    try:
        with cr.Client(servers.alive()[0].address, timeout=60) as client:
            graph_id = client.create_graph(network()).graph_id
            twin_id = client.create_graph(network()).graph_id
            dataset_id = client.upload_dataset("failover", training_data(), progress=False).dataset_id
            job_id = start_job(client, graph_id, dataset_id).job_id
        follower = Follower(servers, job_id)
        reached = 0
        spacing = TOTAL_STEPS // (ROUNDS + 1)
        for round_index in range(ROUNDS):
            # Somewhere around the next of evenly spaced marks (a taken-over job may already have run past
            # it on a loaded machine: then a checkpoint on), and a moment later: mid-step, mid-commit or
            # mid-evaluation. The marks leave the job steps to run after the last kill.
            mark = (round_index + 1) * spacing + rng.randint(-spacing // 4, spacing // 4)
            target = max(mark, reached + CHECKPOINT_EVERY)
            reached = kill_the_runner(servers, job_id, target, rng.uniform(0, 0.02), url)
        with cr.Client(servers.alive()[0].address, timeout=120) as client:
            survivor_job = client.get_job(job_id)
            assert survivor_job.wait(progress=False).state == "succeeded"
            final = raw_job(servers.alive()[1], job_id)
            assert final.resumes == ROUNDS and final.worker in {server.address for server in servers.alive()}
            twin = start_job(client, twin_id, dataset_id)
            assert twin.wait(progress=False).state == "succeeded"
            survived, uninterrupted = survivor_job.history(), twin.history()
            assert survived.steps == uninterrupted.steps == list(range(1, TOTAL_STEPS + 1))
            assert survived.losses == uninterrupted.losses
            assert survived.learning_rates == uninterrupted.learning_rates
            assert survived.metrics == uninterrupted.metrics
            parameters, step = client.get_parameters_with_step(graph_id)
            twin_parameters, twin_step = client.get_parameters_with_step(twin_id)
            assert step == twin_step == TOTAL_STEPS
            assert_same_bits(parameters, twin_parameters)
        follower.join(60)
        assert follower.steps == list(range(1, TOTAL_STEPS + 1))
        assert follower.losses == uninterrupted.losses
        assert follower.states[0] in ("queued", "running") and follower.states[-1] == "succeeded"
    finally:
        servers.kill_all()


@pytest.fixture
def pair(url: str) -> Iterator[Servers]:
    servers = Servers(start_servers(url, 2))
    yield servers
    servers.kill_all()


def test_cancel_and_watch_from_the_server_that_does_not_run_the_job(pair: Servers) -> None:
    first, second = pair.alive()
    with cr.Client(first.address, timeout=60) as client:
        graph_id = client.create_graph(network()).graph_id
        dataset_id = client.upload_dataset("elsewhere", training_data(), progress=False).dataset_id
        job_id = start_job(client, graph_id, dataset_id, max_steps=10**9).job_id
    runner = pair.running(job_id)
    other = second if runner is first else first
    with cr.Client(other.address, timeout=60) as client:
        job = client.get_job(job_id)
        wait_for(lambda: job.info().step >= 2 * CHECKPOINT_EVERY, "two commits")
        events: list[cr.JobEvent] = []
        watcher = threading.Thread(target=lambda: events.extend(job.watch()), daemon=True)
        watcher.start()
        wait_for(lambda: sum(event.state is None for event in events) > CHECKPOINT_EVERY, "the history")
        answer = job.cancel()
        assert answer.state in ("running", "cancelled")
        wait_for(lambda: job.info().ended, "the running server to see the cancel and stop")
        watcher.join(60)
        info = job.info()
        assert info.state == "cancelled"
        steps = [event.step for event in events if event.state is None]
        assert steps == list(range(1, info.step + 1))
        assert [event.state for event in events if event.state is not None] == ["running", "cancelled"]
        assert client.get_parameters_with_step(graph_id)[1] == info.step  # its end is committed
        ended = raw_job(other, job_id)
        assert ended.worker == runner.address and ended.resumes == 0


def answers(job: cr.Job) -> bool:
    try:
        job.info()
    except cr.ChainruleError as error:
        assert error.code == grpc.StatusCode.UNAVAILABLE, error
        return False
    return True


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own, since the test stops it."""
    cluster = PostgresServer()
    try:
        yield cluster.start()
    finally:
        cluster.close()


def test_a_job_outlives_an_outage_of_the_database_and_ends_as_if_never_interrupted(
    own_postgres: PostgresServer,
) -> None:
    """While PostgreSQL is down the job cannot commit: it stops at its last commit instead of failing,
    and once the database is back a server takes it up again from there."""
    (server,) = start_servers(own_postgres.database(), 1)
    try:
        with cr.Client(server.address, timeout=60) as client:
            graph_id = client.create_graph(network()).graph_id
            twin_id = client.create_graph(network()).graph_id
            dataset_id = client.upload_dataset("outage", training_data(), progress=False).dataset_id
            job = start_job(client, graph_id, dataset_id, max_steps=600)
            wait_for(lambda: job.info().step >= 100, "the job to run")
            own_postgres.stop()
            wait_for(lambda: any("stops at its last commit" in line for line in server.log), "the job to stop")
            own_postgres.start()
            wait_for(lambda: answers(job), "the server to reach PostgreSQL again")
            assert job.wait(progress=False).state == "succeeded"
            assert raw_job(server, job.job_id).resumes >= 1
            twin = start_job(client, twin_id, dataset_id, max_steps=600)
            assert twin.wait(progress=False).state == "succeeded"
            survived, uninterrupted = job.history(), twin.history()
            assert survived.steps == uninterrupted.steps == list(range(1, 601))
            assert survived.losses == uninterrupted.losses and survived.metrics == uninterrupted.metrics
            assert_same_bits(client.get_parameters(graph_id), client.get_parameters(twin_id))
    finally:
        server.kill()
