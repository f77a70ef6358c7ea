"""While a job trains a graph, Forward, Backward and GetParameters read the parameters of one
whole step: never some parameters of one step and the rest of the next.

The graph makes every step's parameters predictable to the bit: with inputs of ones and SGD at
0.25, `loss = mean(x1 * a) + 2 mean(x2 * b)` moves `a` by -0.25 and `b` by -0.5 each step, so
after step k, a = -0.25 k and b = -0.5 k exactly. Each read is decoded to the k its parameters
belong to: a read mixing steps has no such k. On both backends (a SQLite file, then PostgreSQL).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

import chainrule.client as cr
from tests.server_process import ServerProcess
from tests.test_jobs import WAIT_SECONDS, wait_for, wait_running

pytestmark = pytest.mark.both_backends

RATE = 0.25
READS = 150
MAX_READS = 100 * READS


def two_counters() -> cr.GraphBuilder:
    g = cr.GraphBuilder("two counters")
    x1 = g.input("x1", dtype="float64", shape=[-1, 1])
    x2 = g.input("x2", dtype="float64", shape=[-1, 1])
    a = g.parameter("a", np.zeros(1))
    b = g.parameter("b", np.zeros(1))
    cr.add(cr.mean(x1 * a), cr.mean(x2 * b) * 2.0, name="loss")
    cr.sum(a * a * 0.5 + b * b * 0.5, name="probe")  # its gradients are a and b themselves
    return g


def step_of(a: np.ndarray, b: np.ndarray) -> int:
    """The step whose parameters (a, b) are; fails on a pair no single step has."""
    k = int(round(float(-a[0]) / RATE))
    assert a.tolist() == [-RATE * k] and b.tolist() == [-2 * RATE * k], f"a = {a}, b = {b}: no single step's"
    return k


def probe(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * a * 0.5 + b * b * 0.5))


def test_forward_backward_and_get_parameters_read_one_whole_step_of_a_running_job(server: ServerProcess) -> None:
    with cr.Client(server.address, timeout=WAIT_SECONDS) as client:
        graph_id = client.create_graph(two_counters()).graph_id
        ones = np.ones((8, 1))
        dataset = client.upload_dataset("ones", {"x1": ones, "x2": ones}, progress=False)
        job = client.create_job(
            graph_id,
            dataset.dataset_id,
            loss="loss",
            optimizer=cr.Sgd(RATE),
            feeds={"x1": "x1", "x2": "x2"},
            batch_size=4,
            max_steps=10**9,
            checkpoint_every=7,
        )
        try:
            wait_running(job)
            seen: dict[str, list[int]] = {"forward": [], "backward": [], "get_parameters": []}
            failures: list[BaseException] = []

            def forward() -> None:
                before = client.get_parameters_with_step(graph_id)[1]
                values = client.forward(graph_id, {}, ["a", "b", "probe"])
                after = client.get_parameters_with_step(graph_id)[1]
                k = step_of(values["a"], values["b"])
                assert before <= k <= after and float(values["probe"]) == probe(values["a"], values["b"])
                seen["forward"].append(k)

            def backward() -> None:
                stream = client.backward(graph_id, {}, "probe", ["a", "b"])
                gradients = dict(stream)
                k = step_of(gradients["a"], gradients["b"])
                assert float(np.asarray(stream.loss)) == probe(gradients["a"], gradients["b"])
                seen["backward"].append(k)

            def get_parameters() -> None:
                values, step = client.get_parameters_with_step(graph_id)
                assert step_of(values["a"], values["b"]) == step  # the step it names is the one it holds
                seen["get_parameters"].append(step)

            def repeat(read: Callable[[], None], steps: list[int]) -> None:
                """At least READS reads, and on until they span more than 10 steps (a loaded machine steps slowly)."""
                try:
                    while len(steps) < READS or (len(set(steps)) <= 10 and len(steps) < MAX_READS):
                        read()
                except BaseException as error:  # reported by the test's thread
                    failures.append(error)

            reads = {"forward": forward, "backward": backward, "get_parameters": get_parameters}
            threads = [threading.Thread(target=repeat, args=(read, seen[name])) for name, read in reads.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT_SECONDS)
            if failures:
                raise failures[0]
            assert job.info().state == "running", "the reads overlapped the job's steps"
            for name, steps in seen.items():
                assert len(steps) >= READS and len(set(steps)) > 10, (name, steps)  # read across many steps
        finally:
            job.cancel()
            wait_for(lambda: job.info().ended, "the job to end")
