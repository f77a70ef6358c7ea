"""A job survives SIGKILL: killed at random moments, several rounds, restarted each time, it ends
with the parameters and the history of the same job run without interruption, bit for bit; and
SIGTERM stops jobs after their step, to resume at the next start.

The job exercises everything a step depends on: Adam's state, dropout (keyed by the seed and the
job's step), a shuffled order (keyed by the seed and the epoch), a schedule (of the job's step)
and evaluations. After each kill the database, read on its own, must hold the job's row, its
graph's checkpoint and its history at one and the same step: no committed step lost, no history
ahead of the parameters (and a SQLite file pass its integrity check).

Both backends: a SQLite file, then PostgreSQL. There the killed server's claim on the job lapses
before the next server takes the job up, so those servers run with a short --job-lease-seconds.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

import chainrule.client as cr
from chainrule.server.store.location import is_postgres_url
from tests.database import query
from tests.server_process import ServerProcess

pytestmark = pytest.mark.both_backends

SEED = 20261130
ROUNDS = 6
TOTAL_STEPS = 2500
CHECKPOINT_EVERY = 23


def lease(backend: str) -> list[str]:
    """What a restarted server on PostgreSQL waits for before taking up the job its killed predecessor held."""
    return ["--job-lease-seconds", "1"] if backend == "postgres" else []


def network() -> cr.GraphBuilder:
    rng = np.random.default_rng(0)
    g = cr.GraphBuilder("crash-tested mlp")
    x, y = g.input("x", dtype="float64", shape=[-1, 6]), g.input("y", dtype="float64", shape=[-1, 1])
    w1 = g.parameter("w1", rng.normal(scale=0.5, size=(6, 16)))
    b1 = g.parameter("b1", np.zeros(16))
    w2 = g.parameter("w2", rng.normal(scale=0.5, size=(16, 1)))
    b2 = g.parameter("b2", np.zeros(1))
    hidden = cr.dropout(cr.tanh(x @ w1 + b1), 0.2, name="dropped")
    logits = (hidden @ w2 + b2).named("logits")
    cr.sigmoid_cross_entropy(logits, y, name="loss")
    cr.mean(cr.cast(cr.equal(cr.greater(logits, 0.0), cr.greater(y, 0.5)), "float64"), name="accuracy")
    return g


def start_job(client: cr.Client, graph_id: str, dataset_id: str) -> cr.Job:
    return client.create_job(
        graph_id,
        dataset_id,
        loss="loss",
        optimizer=cr.Adam(0.01),
        feeds={"x": "x", "y": "y"},
        batch_size=16,
        max_steps=TOTAL_STEPS,
        seed=SEED,
        shuffle=True,
        checkpoint_every=CHECKPOINT_EVERY,
        evaluation=cr.Evaluation(["accuracy", "loss"], every_steps=200, batch_size=64),
        schedule=cr.Cosine(period_steps=2000, min_learning_rate=0.001, warmup_steps=50),
    )


def committed(db: str, job_id: str) -> tuple[str, int, int, int, int]:
    """(state, job step, graph step - start_graph_step, events stored, highest stored step), read from the database."""
    if not is_postgres_url(db):
        assert query(db, "PRAGMA integrity_check") == [("ok",)]
    [(state, step, graph_step, count, highest)] = query(
        db,
        "SELECT jobs.state, jobs.step, graphs.step - jobs.start_graph_step,"
        " (SELECT COUNT(*) FROM job_events WHERE job_id = jobs.job_id),"
        " (SELECT COALESCE(MAX(step), 0) FROM job_events WHERE job_id = jobs.job_id)"
        " FROM jobs JOIN graphs ON graphs.graph_id = jobs.graph_id WHERE jobs.job_id = ?",
        job_id,
    )
    return state, step, graph_step, count, highest


def test_a_job_killed_at_random_moments_ends_as_if_never_interrupted(backend: str, new_db: Callable[[], str]) -> None:
    rng = random.Random(SEED)
    db, args = new_db(), lease(backend)
    data = np.random.default_rng(1)
    x = data.normal(size=(200, 6))
    y = (np.sin(x[:, :1] * 2) + x[:, 1:2] > 0).astype(np.float64)
    server = ServerProcess(db, args).start()
    try:
        with cr.Client(server.address, timeout=60) as client:
            graph_id = client.create_graph(network()).graph_id
            twin_id = client.create_graph(network()).graph_id
            dataset_id = client.upload_dataset("crash data", {"x": x, "y": y}, progress=False).dataset_id
            job_id = start_job(client, graph_id, dataset_id).job_id
        steps_at_kills: list[int] = []
        reached = 0
        for round_index in range(ROUNDS):
            if round_index != ROUNDS // 2:  # that round kills the restarted server as soon as it answers
                # Somewhere in the next share of the steps left, at least a checkpoint on, and a moment later:
                # mid-step, mid-commit or mid-evaluation, whatever the machine's speed.
                share = (TOTAL_STEPS - reached) // (ROUNDS - round_index + 1)
                target = reached + rng.randint(CHECKPOINT_EVERY, max(CHECKPOINT_EVERY, share))
                with cr.Client(server.address, timeout=60) as client:
                    job = client.get_job(job_id)
                    while job.info().step < target:
                        time.sleep(0.005)
                time.sleep(rng.uniform(0, 0.02))
            server.kill()
            state, step, graph_step, count, highest = committed(db, job_id)
            assert step == graph_step == count == highest, (step, graph_step, count, highest)
            assert state == "RUNNING", f"the job ended ({state}) before the kills did"
            steps_at_kills.append(step)
            server = ServerProcess(db, args).start()
            with cr.Client(server.address, timeout=60) as client:
                reached = client.get_job(job_id).info().step
                assert reached >= step  # resumed from its last commit, not from 0
        assert len(set(steps_at_kills)) >= ROUNDS - 1, f"the kills hit too few distinct steps: {steps_at_kills}"
        if server.process is None or server.process.poll() is not None:
            server = ServerProcess(db, args).start()
        with cr.Client(server.address, timeout=60) as client:
            survivor = client.get_job(job_id)
            assert survivor.wait(progress=False).state == "succeeded"
            twin = start_job(client, twin_id, dataset_id)
            assert twin.wait(progress=False).state == "succeeded"
            survived, uninterrupted = survivor.history(), twin.history()
            assert survived.steps == uninterrupted.steps == list(range(1, TOTAL_STEPS + 1))
            assert survived.losses == uninterrupted.losses
            assert survived.learning_rates == uninterrupted.learning_rates
            assert survived.metrics == uninterrupted.metrics and len(survived.metrics["accuracy"]) == 13
            parameters, step = client.get_parameters_with_step(graph_id)
            twin_parameters, twin_step = client.get_parameters_with_step(twin_id)
            assert step == twin_step == TOTAL_STEPS
            for name, value in twin_parameters.items():
                assert parameters[name].tobytes() == value.tobytes(), name
    finally:
        server.kill()


def endless_job(client: cr.Client, graph_id: str, dataset_id: str) -> cr.Job:
    return client.create_job(
        graph_id,
        dataset_id,
        loss="loss",
        optimizer=cr.Sgd(0.01),
        feeds={"x": "x", "y": "y"},
        batch_size=16,
        max_steps=10**9,
        checkpoint_every=10,
    )


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_sigterm_stops_running_jobs_after_their_step_and_they_resume_at_the_next_start(
    backend: str, new_db: Callable[[], str]
) -> None:
    """Watchers get UNAVAILABLE and watch again; a restart with fewer workers than running jobs keeps
    each one's graph reserved until it resumes, and cancelling one that waits frees its graph."""
    db = new_db()
    x = np.random.default_rng(2).normal(size=(64, 6))
    y = (x[:, :1] > 0).astype(np.float64)
    server = ServerProcess(db, ["--job-workers", "2", *lease(backend)]).start()
    try:
        with cr.Client(server.address, timeout=60) as client:
            graphs = [client.create_graph(network()).graph_id for _ in range(2)]
            dataset_id = client.upload_dataset("sigterm", {"x": x, "y": y}, progress=False).dataset_id
            jobs = [endless_job(client, graph_id, dataset_id) for graph_id in graphs]
            wait_until(lambda: all(job.info().step > 3 for job in jobs), "both jobs to run")
            events: list[cr.JobEvent] = []
            with pytest.raises(cr.ChainruleError) as stopped:
                for event in jobs[0].watch():
                    events.append(event)
                    if len(events) == 5:
                        server.signal(signal.SIGTERM)
            assert stopped.value.code == grpc.StatusCode.UNAVAILABLE and "watch it again" in stopped.value.message
        assert server.process is not None and server.process.wait(timeout=60) == 0
        rows = query(db, "SELECT state, step FROM jobs ORDER BY seq")
        assert [state for state, _ in rows] == ["RUNNING", "RUNNING"] and all(step > 3 for _, step in rows)

        server = ServerProcess(db, ["--job-workers", "1", *lease(backend)]).start()
        with cr.Client(server.address, timeout=60) as client:
            first, second = (client.get_job(job.job_id) for job in jobs)
            wait_until(lambda: first.info().step > rows[0][1], "the first job to resume")
            waiting = second.info()
            assert waiting.state == "running" and waiting.step == rows[1][1]  # reserved, not yet resumed
            with pytest.raises(cr.ChainruleError) as busy:
                client.set_parameters(graphs[1], {"b2": np.zeros(1)})
            assert busy.value.reason == "GRAPH_BUSY"
            assert second.cancel().state == "cancelled"
            client.set_parameters(graphs[1], {"b2": np.zeros(1)})  # its graph is free again
            first.cancel()
            wait_until(lambda: first.info().ended, "the first job to stop")
            steps = [event.step for event in first.watch() if event.state is None]
            assert steps == list(range(1, first.info().step + 1))
    finally:
        server.kill()
