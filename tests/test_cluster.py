"""Several `chainrule serve` processes on one PostgreSQL database, as a user scales out: any server
answers for any graph or job, a server's live copy of a graph follows what others commit (at
checkpoint granularity), a graph has one trainer across all servers, and ListGraphs pages soundly
while both servers create and delete. Failover of jobs is in test_failover.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

import chainrule.client as cr
from chainrule.v1 import graph_service_pb2 as gpb
from chainrule.v1 import job_service_pb2 as jpb
from chainrule.v1 import job_service_pb2_grpc
from tests.postgres import PostgresServer
from tests.server_process import ServerProcess
from tests.test_jobs import assert_same_bits, data, logistic_graph, wait_for

LEASE_SECONDS = "1"
"""--job-lease-seconds of the tests' servers: short, so that what a dead server held lapses soon."""


def start_servers(url: str, count: int, *args: str) -> list[ServerProcess]:
    return [ServerProcess(url, ["--job-lease-seconds", LEASE_SECONDS, *args]).start() for _ in range(count)]


@pytest.fixture
def cluster(postgres: PostgresServer) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    a, b = start_servers(postgres.database(), 2)
    yield a, b
    a.kill()
    b.kill()


def raw_job(server: ServerProcess, job_id: str) -> jpb.Job:
    """The job as the wire has it, with `worker` and `resumes`."""
    return job_service_pb2_grpc.JobServiceStub(server.channel()).GetJob(jpb.GetJobRequest(job_id=job_id), timeout=30)


def refused(call: Callable[[], object]) -> cr.ChainruleError:
    with pytest.raises(cr.ChainruleError) as raised:
        call()
    return raised.value


def test_a_graph_created_on_one_server_is_trained_on_the_other_and_each_reads_what_the_other_committed(
    cluster: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = cluster
    x, y = data(32)
    feeds = {"x": x, "y": y}
    with cr.Client(a.address, timeout=30) as on_a, cr.Client(b.address, timeout=30) as on_b:
        graph_id = on_a.create_graph(logistic_graph()).graph_id
        untrained = on_a.forward(graph_id, feeds, ["loss"])["loss"]  # A has it compiled and live

        # B trains it in lockstep, committing every 2 steps: A sees each commit, not the steps between.
        sent, step_taken = threading.Semaphore(0), threading.Semaphore(0)

        def lockstep() -> Iterator[dict[str, np.ndarray]]:
            for _ in range(5):
                sent.acquire()
                yield feeds

        stream = on_b.train(graph_id, lockstep(), loss="loss", optimizer=cr.Sgd(0.5), checkpoint_every=2)
        steps: list[int] = []
        reader = threading.Thread(target=lambda: [(steps.append(s.step), step_taken.release()) for s in stream])
        reader.start()
        seen_on_a = []
        for _ in range(3):
            sent.release()
            assert step_taken.acquire(timeout=30)
            seen_on_a.append(on_a.get_parameters_with_step(graph_id)[1])
        assert seen_on_a == [0, 2, 2], "A sees B's commits, at checkpoint granularity"
        sent.release(2)
        reader.join(30)
        assert steps == [1, 2, 3, 4, 5]

        on_b_values, on_b_step = on_b.get_parameters_with_step(graph_id)
        on_a_values, on_a_step = on_a.get_parameters_with_step(graph_id)
        assert on_a_step == on_b_step == 5 and on_a.get_graph(graph_id).step == 5
        assert_same_bits(on_a_values, on_b_values)
        trained = on_a.forward(graph_id, feeds, ["loss"])["loss"]
        assert trained.tobytes() == on_b.forward(graph_id, feeds, ["loss"])["loss"].tobytes()
        assert trained < untrained

        # And the other way: parameters set on A are what B computes with.
        assert on_a.set_parameters(graph_id, {"w": np.zeros((3, 1)), "b": np.ones(1)}) == 5
        np.testing.assert_array_equal(on_b.get_parameters(graph_id)["b"], np.ones(1))
        expected = np.mean(np.logaddexp(0.0, 1.0) - y * 1.0)  # sigmoid cross-entropy of a logit of 1
        np.testing.assert_allclose(on_b.forward(graph_id, feeds, ["loss"])["loss"], expected, rtol=1e-12)

        on_b.delete_graph(graph_id)
        gone = refused(lambda: on_a.forward(graph_id, feeds, ["loss"]))
        assert gone.code == grpc.StatusCode.NOT_FOUND and gone.reason == "GRAPH_NOT_FOUND"


def test_a_graph_has_one_trainer_across_servers(cluster: tuple[ServerProcess, ServerProcess]) -> None:
    """A Train stream on A holds the graph: B's Train and SetParameters get GRAPH_BUSY naming A, a job
    created on B waits until the stream ends, and then B's Train is refused naming the job."""
    a, b = cluster
    x, y = data(20)
    release = threading.Event()

    def held_open() -> Iterator[dict[str, np.ndarray]]:
        yield {"x": x[:4], "y": y[:4]}
        release.wait(60)

    with cr.Client(a.address, timeout=60) as on_a, cr.Client(b.address, timeout=60) as on_b:
        graph_id = on_a.create_graph(logistic_graph()).graph_id
        dataset = on_b.upload_dataset("one trainer", {"x": x, "y": y}, progress=False)
        with on_a.train(graph_id, held_open(), loss="loss", optimizer=cr.Sgd(0.1)) as stream:
            assert next(stream).step == 1
            busy = refused(lambda: list(on_b.train(graph_id, [{"x": x, "y": y}], loss="loss", optimizer=cr.Sgd(0.1))))
            assert busy.code == grpc.StatusCode.FAILED_PRECONDITION and busy.reason == "GRAPH_BUSY"
            assert f"a Train stream on server {a.address}" in busy.message
            assert refused(lambda: on_b.set_parameters(graph_id, {"b": np.ones(1)})).reason == "GRAPH_BUSY"
            job = on_b.create_job(
                graph_id,
                dataset.dataset_id,
                loss="loss",
                optimizer=cr.Sgd(0.1),
                feeds={"x": "x", "y": "y"},
                batch_size=4,
                max_steps=10**9,
                checkpoint_every=5,
            )
            time.sleep(1.5)  # a lease and then some: both servers have looked at the queue since
            assert job.info().state == "queued"
            release.set()
            assert list(stream) == []
        wait_for(lambda: job.info().step > 0, "the job to start once the stream ended")
        for server in (a, b):
            with cr.Client(server.address, timeout=60) as client:
                busy = refused(
                    lambda client=client: list(  # type: ignore[misc]
                        client.train(graph_id, [{"x": x, "y": y}], loss="loss", optimizer=cr.Sgd(0.1))
                    )
                )
                assert busy.reason == "GRAPH_BUSY" and f"job '{job.job_id}'" in busy.message
        info = job.cancel()
        wait_for(lambda: job.info().ended, "the job to end")
        info = job.info()
        assert info.state == "cancelled"
        assert on_a.get_parameters_with_step(graph_id)[1] == 1 + info.step  # the stream's step, then the job's
        on_a.set_parameters(graph_id, {"b": np.ones(1)})  # free again


def test_list_graphs_pages_through_every_graph_once_while_both_servers_create_and_delete(
    cluster: tuple[ServerProcess, ServerProcess],
) -> None:
    """Pages alternate between the servers while each creates graphs and deletes some of them. Every graph
    that exists throughout appears exactly once; no graph appears twice; and every graph created before
    the last page was asked for, and not deleted, appears: a new graph is never passed over."""
    a, b = cluster
    graph = logistic_graph()
    with cr.Client(a.address, timeout=60) as on_a, cr.Client(b.address, timeout=60) as on_b:
        lasting = [client.create_graph(graph).graph_id for client in (on_a, on_b) * 15]
        done = threading.Event()
        created: list[tuple[float, str]] = []
        """(when its CreateGraph returned, graph id) of the graphs that stay."""
        deleted: set[str] = set()
        errors: list[BaseException] = []
        progress = threading.Condition()

        def churn(client: cr.Client) -> None:
            try:
                while not done.is_set():
                    doomed = client.create_graph(graph).graph_id
                    kept = client.create_graph(graph).graph_id
                    deleted.add(doomed)
                    client.delete_graph(doomed)
                    with progress:
                        created.append((time.monotonic(), kept))
                        progress.notify_all()
            except BaseException as error:  # noqa: BLE001 -- reported by the test
                errors.append(error)

        workers = [threading.Thread(target=churn, args=(client,)) for client in (on_a, on_b)]
        for worker in workers:
            worker.start()
        try:
            stubs = [a.stub(), b.stub()]
            for _ in range(3):
                listed: list[str] = []
                token, page = "", 0
                while True:
                    asked = time.monotonic()
                    response = stubs[page % 2].ListGraphs(
                        gpb.ListGraphsRequest(page_size=7, page_token=token), timeout=30
                    )
                    listed += [info.graph_id for info in response.graphs]
                    token, page = response.next_page_token, page + 1
                    if not token:
                        break
                    with progress:  # both servers create and delete between any two pages
                        count = len(created)
                        assert progress.wait_for(lambda count=count: len(created) >= count + 2 or errors, 60)
                assert len(listed) == len(set(listed)), "a graph listed twice"
                assert set(lasting) <= set(listed)
                missed = [graph_id for when, graph_id in list(created) if when < asked and graph_id not in listed]
                assert not missed, f"graphs created before the last page was asked for were passed over: {missed}"
                assert page >= len(lasting) // 7  # pages of 7, the lasting graphs alone fill these
        finally:
            done.set()
            for worker in workers:
                worker.join(60)
        assert not errors, errors
        assert not deleted & {info.graph_id for info in on_a.list_graphs(page_size=50)}
