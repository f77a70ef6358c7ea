"""Training jobs end to end against a real server on each backend (a SQLite file, then PostgreSQL):
batch order, evaluation, cancel, failure, tenants, one trainer per graph, the refusals of CreateJob,
and watchers.

The reference for a job's numbers is the engine itself, in-process, stepped over the batches the
contract says the job takes (an independent writing of the order: a Philox permutation keyed by
(seed, epoch), or dataset order), so a job that took another order, another count of steps or
another learning rate differs from it bit for bit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import chainrule.client as cr
from chainrule.client.errors import from_rpc_error
from chainrule.client.jobs import JobInfo
from chainrule.server import optim
from chainrule.server.engine import Engine
from chainrule.server.store import SqliteStore
from chainrule.v1 import graph_service_pb2 as gpb
from chainrule.v1 import job_service_pb2 as pb
from chainrule.v1 import job_service_pb2_grpc
from tests.server_process import ServerProcess

pytestmark = pytest.mark.both_backends

WAIT_SECONDS = 60.0
TRUE_W = np.array([[1.5], [-2.0], [0.5]])


def logistic_graph(dtype: str = "float64", dropout: float = 0.0) -> cr.GraphBuilder:
    """Logistic regression on 3 features, with an accuracy and a loss to evaluate."""
    g = cr.GraphBuilder("logistic", default_dtype=dtype)
    x = g.input("x", dtype=dtype, shape=[-1, 3])
    y = g.input("y", dtype=dtype, shape=[-1, 1])
    w = g.parameter("w", np.array([[0.1], [0.2], [-0.3]], dtype=dtype))
    b = g.parameter("b", np.zeros(1, dtype=dtype))
    features = cr.dropout(x, dropout, name="dropped") if dropout else x
    logits = (features @ w + b).named("logits")
    cr.sigmoid_cross_entropy(logits, y, name="loss")
    right = cr.equal(cr.greater(logits, 0.0), cr.greater(y, 0.5))
    cr.mean(cr.cast(right, dtype), name="accuracy")
    return g


def data(count: int, seed: int = 0, dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 3)).astype(dtype)
    y = (x @ TRUE_W + rng.normal(scale=0.5, size=(count, 1)) > 0).astype(dtype)
    return x, y


def expected_batches(
    count: int, batch: int, epochs: int, max_steps: int, seed: int, shuffle: bool, drop_last: bool
) -> list[tuple[int, np.ndarray]]:
    """(1-based epoch, example indices) of every step, as the contract describes them."""
    per_epoch = count // batch if drop_last else math.ceil(count / batch)
    epochs = epochs or (0 if max_steps else 1)
    total = min(limit for limit in (epochs * per_epoch, max_steps) if limit)
    steps = []
    for step in range(total):
        epoch = step // per_epoch
        if shuffle:
            generator = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, epoch])))
            order = generator.permutation(count)
        else:
            order = np.arange(count)
        start = (step % per_epoch) * batch
        steps.append((epoch + 1, order[start : start + batch]))
    return steps


class Reference:
    """The engine in-process on a throwaway store, stepped as a job steps; keeps every step's parameters."""

    def __init__(self, graph: cr.GraphBuilder, optimizer: optim.Optimizer, seed: int = 0) -> None:
        self.engine = Engine(SqliteStore(":memory:"))
        self.graph_id = self.engine.create_graph(graph.to_proto()).graph_id
        self.session = self.engine.start_training(
            self.graph_id, "loss", optimizer, checkpoint_every=10**9, keep_updates=False, seed=seed
        )
        self.losses: list[float] = []
        self.parameters = [dict(self.session.live.parameters)]

    def run(self, feeds: Callable[[np.ndarray], dict[str, np.ndarray]], rows: list[np.ndarray], rate: float) -> None:
        for step, indices in enumerate(rows):
            result = self.session.step(feeds(indices), learning_rate=rate, dropout_step=step)
            self.losses.append(result.loss)
            self.parameters.append(dict(self.session.live.parameters))


def assert_same_bits(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def wait_running(job: cr.Job, past_step: int = 0) -> JobInfo:
    infos: list[JobInfo] = []

    def running() -> bool:
        infos.append(job.info())
        return infos[-1].state == "running" and infos[-1].step > past_step

    wait_for(running, f"job {job.job_id} to run past step {past_step}")
    return infos[-1]


@pytest.fixture(scope="module")
def server(new_db: Callable[[], str]) -> Iterator[ServerProcess]:
    process = ServerProcess(new_db(), ["--job-workers", "2"]).start()
    yield process
    process.kill()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address, timeout=WAIT_SECONDS) as connected:
        yield connected


@pytest.fixture
def endless(client: cr.Client) -> Iterator[Callable[..., cr.Job]]:
    """Starts jobs that run until cancelled, and cancels them at the end of the test."""
    started: list[cr.Job] = []

    def start(graph_id: str, dataset_id: str, **options: object) -> cr.Job:
        job = client.create_job(
            graph_id,
            dataset_id,
            loss="loss",
            optimizer=cr.Sgd(0.01),
            feeds={"x": "x", "y": "y"},
            batch_size=4,
            max_steps=10**9,
            **options,  # type: ignore[arg-type]
        )
        started.append(job)
        return job

    yield start
    for job in started:
        job.cancel()
        wait_for(lambda job=job: job.info().ended, "a cancelled job to end")  # type: ignore[misc]


def test_the_service_is_in_health_and_reflection_and_its_calls_logged(server: ServerProcess, client: cr.Client) -> None:
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(service="chainrule.v1.JobService"), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = reflection.ServerReflectionInfo(iter([request]), timeout=10)
    listed = [service.name for response in responses for service in response.list_services_response.service]
    assert "chainrule.v1.JobService" in listed
    client.list_jobs()
    wait_for(lambda: any("ListJobs OK" in line for line in server.log), "the call to be logged")


# ---------------------------------------------------------------- what a job computes
@pytest.mark.parametrize(
    ("epochs", "max_steps", "shuffle", "drop_last"),
    [(2, 0, False, False), (3, 0, True, True), (0, 13, True, False), (2, 7, False, False), (1, 0, True, False)],
    ids=["in order", "shuffled, drop_last", "max_steps alone cycles epochs", "max_steps first", "one shuffled epoch"],
)
def test_a_job_takes_the_documented_batches(
    client: cr.Client, epochs: int, max_steps: int, shuffle: bool, drop_last: bool
) -> None:
    x, y = data(22)
    seed = 20260611
    graph = logistic_graph()
    graph_id = client.create_graph(graph).graph_id
    dataset = client.upload_dataset("twenty-two", {"x": x, "y": y}, progress=False)
    job = client.create_job(
        graph_id,
        dataset.dataset_id,
        loss="loss",
        optimizer=cr.Sgd(0.3),
        feeds={"x": "x", "y": "y"},
        batch_size=5,
        epochs=epochs,
        max_steps=max_steps,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        checkpoint_every=3,
    )
    batches = expected_batches(22, 5, epochs, max_steps, seed, shuffle, drop_last)
    info = job.wait(progress=False)
    assert (info.state, info.step, info.total_steps, info.epoch) == (
        "succeeded",
        len(batches),
        len(batches),
        batches[-1][0],
    )
    history = job.history()
    assert history.steps == list(range(1, len(batches) + 1))
    watched = [event for event in job.watch() if event.state is None]
    assert [event.epoch for event in watched] == [epoch for epoch, _ in batches]

    reference = Reference(graph, optim.Sgd(0.3))
    reference.run(lambda rows: {"x": x[rows], "y": y[rows]}, [rows for _, rows in batches], 0.3)
    assert history.losses == reference.losses
    assert history.learning_rates == [0.3] * len(batches)
    parameters, step = client.get_parameters_with_step(graph_id)
    assert step == len(batches)
    assert_same_bits(parameters, reference.parameters[-1])


def test_shuffle_changes_the_order_and_the_seed_keys_it(client: cr.Client) -> None:
    x, y = data(40, seed=1)
    dataset = client.upload_dataset("forty", {"x": x, "y": y}, progress=False)
    losses = {}
    for label, shuffle, seed in (
        ("in order", False, 1),
        ("seed 1", True, 1),
        ("seed 1 again", True, 1),
        ("seed 2", True, 2),
    ):
        graph_id = client.create_graph(logistic_graph()).graph_id
        job = client.create_job(
            graph_id,
            dataset.dataset_id,
            loss="loss",
            optimizer=cr.Sgd(0.5),
            feeds={"x": "x", "y": "y"},
            batch_size=8,
            epochs=2,
            seed=seed,
            shuffle=shuffle,
        )
        job.wait(progress=False)
        losses[label] = job.history().losses
    assert losses["seed 1"] == losses["seed 1 again"]
    assert losses["seed 1"] != losses["in order"] and losses["seed 1"] != losses["seed 2"]


def test_evaluation_metrics_are_averaged_by_example_over_the_whole_set(client: cr.Client) -> None:
    """Metrics after steps 4, 8 and the last (10), over an evaluation set of 23 examples in batches
    of 5 (the last has 3), against numpy on the reference's parameters of those steps."""
    x, y = data(30, seed=2)
    features, labels = data(23, seed=3)
    graph = logistic_graph()
    graph_id = client.create_graph(graph).graph_id
    train = client.upload_dataset("train", {"x": x, "y": y}, progress=False)
    held_out = client.upload_dataset("held out", {"features": features, "labels": labels}, progress=False)
    job = client.create_job(
        graph_id,
        train.dataset_id,
        loss="loss",
        optimizer=cr.Sgd(0.4),
        feeds={"x": "x", "y": "y"},
        batch_size=6,
        epochs=2,
        seed=9,
        evaluation=cr.Evaluation(
            ["accuracy", "loss"],
            dataset_id=held_out.dataset_id,
            feeds={"x": "features", "y": "labels"},
            every_steps=4,
            batch_size=5,
        ),
    )
    info = job.wait(progress=False)
    history = job.history()
    assert sorted(history.metrics) == ["accuracy", "loss"]
    assert [step for step, _ in history.metrics["loss"]] == [4, 8, 10]

    reference = Reference(graph, optim.Sgd(0.4))
    rows = [indices for _, indices in expected_batches(30, 6, 2, 0, 9, True, False)]
    reference.run(lambda indices: {"x": x[indices], "y": y[indices]}, rows, 0.4)
    for step in (4, 8, 10):
        w, b = reference.parameters[step]["w"], reference.parameters[step]["b"]
        logits = features @ w + b
        accuracy = np.mean((logits > 0) == (labels > 0.5))
        loss = np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits))))
        got = {name: dict(points)[step] for name, points in history.metrics.items()}
        assert got["accuracy"] == pytest.approx(accuracy, rel=1e-12)
        assert got["loss"] == pytest.approx(loss, rel=1e-12)
    assert info.metrics == {name: points[-1][1] for name, points in history.metrics.items()}


def test_evaluation_runs_in_inference_mode_where_dropout_is_the_identity(client: cr.Client) -> None:
    """A graph that drops half its features while training: its job's steps match the engine's
    (the same masks, keyed by seed and step), and its metrics are those of the whole features,
    computed by numpy on the parameters of the evaluated step."""
    x, y = data(32, seed=4)
    graph = logistic_graph(dropout=0.5)
    graph_id = client.create_graph(graph).graph_id
    dataset = client.upload_dataset("dropped", {"x": x, "y": y}, progress=False)
    seed = 77
    job = client.create_job(
        graph_id,
        dataset.dataset_id,
        loss="loss",
        optimizer=cr.Sgd(0.4),
        feeds={"x": "x", "y": "y"},
        batch_size=8,
        epochs=2,
        seed=seed,
        evaluation=cr.Evaluation(["accuracy", "loss"], every_steps=3),
    )
    assert job.wait(progress=False).state == "succeeded"
    history = job.history()
    rows = [indices for _, indices in expected_batches(32, 8, 2, 0, seed, True, False)]
    reference = Reference(graph, optim.Sgd(0.4), seed=seed)
    reference.run(lambda indices: {"x": x[indices], "y": y[indices]}, rows, 0.4)
    undropped = Reference(logistic_graph(), optim.Sgd(0.4), seed=seed)
    undropped.run(lambda indices: {"x": x[indices], "y": y[indices]}, rows, 0.4)
    assert history.losses == reference.losses and history.losses != undropped.losses  # dropout trained
    assert [step for step, _ in history.metrics["loss"]] == [3, 6, 8]
    for step in (3, 6, 8):
        w, b = reference.parameters[step]["w"], reference.parameters[step]["b"]
        logits = x @ w + b
        accuracy = np.mean((logits > 0) == (y > 0.5))
        loss = np.mean(np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits))))
        got = {name: dict(points)[step] for name, points in history.metrics.items()}
        assert got["accuracy"] == pytest.approx(accuracy, rel=1e-12)
        assert got["loss"] == pytest.approx(loss, rel=1e-12)


# ---------------------------------------------------------------- cancel, failure
def test_cancel_ends_a_queued_job_at_once_and_a_running_one_after_its_step(
    client: cr.Client, endless: Callable[..., cr.Job]
) -> None:
    x, y = data(20)
    graph_id = client.create_graph(logistic_graph()).graph_id
    dataset = client.upload_dataset("cancel", {"x": x, "y": y}, progress=False)
    running = endless(graph_id, dataset.dataset_id, checkpoint_every=7)
    wait_running(running, past_step=5)
    queued = endless(graph_id, dataset.dataset_id)
    assert queued.info().state == "queued"

    cancelled = queued.cancel()
    assert (cancelled.state, cancelled.step) == ("cancelled", 0) and cancelled.end_time is not None
    assert list(queued.watch()) == [cr.JobEvent(state="cancelled")]
    assert queued.cancel().state == "cancelled"  # cancelling an ended job changes nothing

    running.cancel()
    wait_for(lambda: running.info().ended, "the running job to stop")
    info = running.info()
    assert info.state == "cancelled" and 5 < info.step < info.total_steps
    assert running.history().steps == list(range(1, info.step + 1))
    _, step = client.get_parameters_with_step(graph_id)
    assert step == info.step  # the last step is committed with the job's end


def test_a_cancel_right_after_create_ends_the_job_however_it_meets_the_worker_taking_it_up(
    client: cr.Client, endless: Callable[..., cr.Job]
) -> None:
    """A cancel stored just after a worker claimed the job, before the job was registered in memory, was
    once lost on SQLite (no heartbeat carries it there) and the endless job ran on: cancelling at once,
    many times, lands in that moment now and then."""
    x, y = data(8)
    graph_id = client.create_graph(logistic_graph()).graph_id
    dataset = client.upload_dataset("cancel at once", {"x": x, "y": y}, progress=False)
    for _ in range(25):
        job = endless(graph_id, dataset.dataset_id)
        job.cancel()
        wait_for(lambda job=job: job.info().ended, "the job cancelled at once to end")  # type: ignore[misc]
        assert job.info().state == "cancelled"


def test_a_non_finite_loss_fails_the_job_naming_the_step_and_keeps_the_last_good_step(client: cr.Client) -> None:
    x, y = data(24)
    y[13] = np.nan  # in the 4th batch of 4, in order
    graph = logistic_graph()
    graph_id = client.create_graph(graph).graph_id
    dataset = client.upload_dataset("nan at 13", {"x": x, "y": y}, progress=False)
    job = client.create_job(
        graph_id,
        dataset.dataset_id,
        loss="loss",
        optimizer=cr.Sgd(0.3),
        feeds={"x": "x", "y": "y"},
        batch_size=4,
        epochs=1,
        shuffle=False,
        stop_on_non_finite_loss=True,
    )
    with pytest.raises(cr.JobFailed) as failed:
        job.wait(progress=False)
    info = failed.value.info
    assert info.state == "failed" and info.step == 3
    assert info.error.startswith("step 4: ") and "nan" in info.error and "not applied" in info.error
    events = list(job.watch())
    assert [event.step for event in events[:-1]] == [1, 2, 3] and events[-1].state == "failed"
    reference = Reference(graph, optim.Sgd(0.3))
    reference.run(lambda rows: {"x": x[rows], "y": y[rows]}, [np.arange(4 * i, 4 * i + 4) for i in range(3)], 0.3)
    parameters, step = client.get_parameters_with_step(graph_id)
    assert step == 3
    assert_same_bits(parameters, reference.parameters[3])


def test_a_shape_only_the_data_reveals_fails_the_first_step(client: cr.Client) -> None:
    g = cr.GraphBuilder("undeclared width")
    x = g.input("x", dtype="float64")
    w = g.parameter("w", np.ones((3, 1)))
    cr.sum(x @ w, name="loss")
    graph_id = client.create_graph(g).graph_id
    dataset = client.upload_dataset("width 4", {"x": np.ones((8, 4))}, progress=False)
    job = client.create_job(
        graph_id, dataset.dataset_id, loss="loss", optimizer=cr.Sgd(0.1), feeds={"x": "x"}, batch_size=4, epochs=1
    )
    info = job.wait(progress=False, raise_on_failure=False)
    assert info.state == "failed" and info.step == 0
    assert info.error.startswith("step 1: ") and "matmul" in info.error
    assert client.get_parameters_with_step(graph_id)[1] == 0


def test_deleting_a_graph_under_a_running_job_fails_the_job_and_keeps_its_history(client: cr.Client) -> None:
    x, y = data(20)
    graph_id = client.create_graph(logistic_graph()).graph_id
    dataset = client.upload_dataset("deleted graph", {"x": x, "y": y}, progress=False)
    job = client.create_job(
        graph_id,
        dataset.dataset_id,
        loss="loss",
        optimizer=cr.Sgd(0.01),
        feeds={"x": "x", "y": "y"},
        batch_size=4,
        max_steps=10**9,
        checkpoint_every=5,
    )
    wait_running(job, past_step=3)
    client.delete_graph(graph_id)
    wait_for(lambda: job.info().ended, "the job to end")
    info = job.info()
    assert info.state == "failed" and f"graph '{graph_id}' was deleted" in info.error
    assert info.error.startswith(f"step {info.step + 1}: ")
    assert job.history().steps == list(range(1, info.step + 1))


# ---------------------------------------------------------------- one trainer per graph
def test_while_a_job_trains_a_graph_train_streams_and_set_parameters_are_refused_and_forward_answers(
    client: cr.Client, endless: Callable[..., cr.Job]
) -> None:
    x, y = data(20)
    graph_id = client.create_graph(logistic_graph()).graph_id
    dataset = client.upload_dataset("busy", {"x": x, "y": y}, progress=False)
    job = endless(graph_id, dataset.dataset_id)
    wait_running(job)
    with pytest.raises(cr.ChainruleError) as refused:
        list(client.train(graph_id, [{"x": x[:4], "y": y[:4]}], loss="loss", optimizer=cr.Sgd(0.1)))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION and refused.value.reason == "GRAPH_BUSY"
    assert job.job_id in refused.value.message
    with pytest.raises(cr.ChainruleError) as refused:
        client.set_parameters(graph_id, {"b": np.ones(1)})
    assert refused.value.reason == "GRAPH_BUSY"
    outputs = client.forward(graph_id, {"x": x, "y": y}, ["loss"])
    assert np.isfinite(outputs["loss"])


def test_a_second_job_on_a_graph_waits_for_the_first(client: cr.Client, endless: Callable[..., cr.Job]) -> None:
    x, y = data(20)
    graph_id = client.create_graph(logistic_graph()).graph_id
    dataset = client.upload_dataset("turns", {"x": x, "y": y}, progress=False)
    first = endless(graph_id, dataset.dataset_id)
    wait_running(first)
    second = client.create_job(
        graph_id, dataset.dataset_id, loss="loss", optimizer=cr.Sgd(0.1), feeds={"x": "x", "y": "y"}, batch_size=4
    )
    other_graph = client.create_graph(logistic_graph()).graph_id
    third = client.create_job(
        other_graph, dataset.dataset_id, loss="loss", optimizer=cr.Sgd(0.1), feeds={"x": "x", "y": "y"}, batch_size=4
    )
    assert third.wait(progress=False).state == "succeeded"  # a later job on another graph does not wait
    assert second.info().state == "queued"  # while the first still trains its graph
    first.cancel()
    wait_for(lambda: first.info().ended, "the first job to end")
    info = second.wait(progress=False)
    first_info = first.info()
    assert info.state == "succeeded" and info.start_time is not None and first_info.end_time is not None
    assert info.start_time >= first_info.end_time
    assert client.get_parameters_with_step(graph_id)[1] == first_info.step + info.total_steps


def test_a_job_waits_while_a_train_stream_holds_its_graph(client: cr.Client) -> None:
    x, y = data(20)
    graph_id = client.create_graph(logistic_graph()).graph_id
    dataset = client.upload_dataset("stream first", {"x": x, "y": y}, progress=False)
    release = threading.Event()

    def batches() -> Iterator[dict[str, np.ndarray]]:
        yield {"x": x[:4], "y": y[:4]}
        release.wait(WAIT_SECONDS)

    with client.train(graph_id, batches(), loss="loss", optimizer=cr.Sgd(0.1)) as stream:
        assert next(stream).step == 1
        job = client.create_job(
            graph_id, dataset.dataset_id, loss="loss", optimizer=cr.Sgd(0.1), feeds={"x": "x", "y": "y"}, batch_size=4
        )
        time.sleep(0.5)
        assert job.info().state == "queued"
        release.set()
        assert list(stream) == []
    info = job.wait(progress=False)
    assert info.state == "succeeded"
    assert client.get_parameters_with_step(graph_id)[1] == 1 + info.total_steps


# ---------------------------------------------------------------- refusals and datasets in use
def base_spec(graph_id: str, dataset_id: str) -> pb.JobSpec:
    return pb.JobSpec(
        graph_id=graph_id,
        loss="loss",
        optimizer=gpb.Optimizer(sgd=gpb.Sgd(learning_rate=0.1)),
        dataset_id=dataset_id,
        feeds={"x": "x", "y": "y"},
        batch_size=4,
        epochs=1,
        evaluation=pb.Evaluation(metrics=["accuracy"]),
    )


REFUSALS: list[tuple[str, Callable[[pb.JobSpec], None], grpc.StatusCode, str]] = [
    ("unknown graph", lambda s: setattr(s, "graph_id", "f" * 32), grpc.StatusCode.NOT_FOUND, "GRAPH_NOT_FOUND"),
    ("unknown dataset", lambda s: setattr(s, "dataset_id", "f" * 32), grpc.StatusCode.NOT_FOUND, "DATASET_NOT_FOUND"),
    (
        "unknown evaluation dataset",
        lambda s: setattr(s.evaluation, "dataset_id", "e" * 32),
        grpc.StatusCode.NOT_FOUND,
        "DATASET_NOT_FOUND",
    ),
    ("unknown input", lambda s: s.feeds.update(z="x"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_FEED"),
    ("feed of a non-input", lambda s: s.feeds.update(w="x"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_FEED"),
    ("unknown column", lambda s: s.feeds.update(y="labels"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_COLUMN"),
    ("unfed input", lambda s: s.feeds.pop("y"), grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FEED"),
    ("unknown loss", lambda s: setattr(s, "loss", "lost"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_NODE"),
    ("unknown parameter", lambda s: s.parameters.append("v"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_PARAMETER"),
    ("input as parameter", lambda s: s.parameters.append("x"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_PARAMETER"),
    ("unknown metric", lambda s: s.evaluation.metrics.append("f1"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_NODE"),
    (
        "non-scalar metric",
        lambda s: s.evaluation.metrics.append("w"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "SHAPE_MISMATCH",
    ),
    ("no metrics", lambda s: s.evaluation.ClearField("metrics"), grpc.StatusCode.INVALID_ARGUMENT, "BAD_JOB_SPEC"),
    ("wrong dtype", lambda s: s.feeds.update(x="x32"), grpc.StatusCode.INVALID_ARGUMENT, "DTYPE_MISMATCH"),
    ("wrong example shape", lambda s: s.feeds.update(x="wide"), grpc.StatusCode.INVALID_ARGUMENT, "SHAPE_MISMATCH"),
    ("batch size 0", lambda s: setattr(s, "batch_size", 0), grpc.StatusCode.INVALID_ARGUMENT, "BAD_JOB_SPEC"),
    ("negative epochs", lambda s: setattr(s, "epochs", -1), grpc.StatusCode.INVALID_ARGUMENT, "BAD_JOB_SPEC"),
    (
        "drop_last with too few examples",
        lambda s: (setattr(s, "batch_size", 50), setattr(s, "drop_last", True)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_JOB_SPEC",
    ),
    ("no optimizer", lambda s: s.ClearField("optimizer"), grpc.StatusCode.INVALID_ARGUMENT, "BAD_OPTIMIZER"),
    (
        "learning rate 0",
        lambda s: setattr(s.optimizer.sgd, "learning_rate", 0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_OPTIMIZER",
    ),
    (
        "bad schedule",
        lambda s: s.schedule.step_decay.CopyFrom(gpb.StepDecay(step_size=0, gamma=0.5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "BAD_SCHEDULE",
    ),
    ("no feeds", lambda s: s.ClearField("feeds"), grpc.StatusCode.INVALID_ARGUMENT, "BAD_JOB_SPEC"),
]


@pytest.mark.parametrize(("mutate", "code", "reason"), [case[1:] for case in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_create_job_refuses_what_it_can_know_up_front(
    server: ServerProcess, client: cr.Client, mutate: Callable[[pb.JobSpec], None], code: grpc.StatusCode, reason: str
) -> None:
    x, y = data(20)
    graph_id = client.create_graph(logistic_graph()).graph_id
    columns = {"x": x, "y": y, "x32": x.astype(np.float32), "wide": np.hstack([x, x])}
    dataset = client.upload_dataset("refusals", columns, progress=False)
    spec = base_spec(graph_id, dataset.dataset_id)
    mutate(spec)
    stub = job_service_pb2_grpc.JobServiceStub(server.channel())
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateJob(pb.CreateJobRequest(spec=spec))
    error = from_rpc_error(refused.value)
    assert (error.code, error.reason) == (code, reason), error.message
    assert client.list_jobs(graph_id=graph_id) == []


def test_a_dataset_in_use_by_a_queued_or_running_job_cannot_be_deleted(
    client: cr.Client, endless: Callable[..., cr.Job]
) -> None:
    x, y = data(20)
    graph_id = client.create_graph(logistic_graph()).graph_id
    train = client.upload_dataset("in use", {"x": x, "y": y}, progress=False)
    held_out = client.upload_dataset("evaluated", {"x": x, "y": y}, progress=False)
    running = endless(graph_id, train.dataset_id)
    wait_running(running)
    queued = endless(graph_id, train.dataset_id, evaluation=cr.Evaluation(["accuracy"], dataset_id=held_out.dataset_id))
    for dataset in (train, held_out):
        with pytest.raises(cr.ChainruleError) as refused:
            client.delete_dataset(dataset.dataset_id)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION and refused.value.reason == "DATASET_IN_USE"
    queued.cancel()
    client.delete_dataset(held_out.dataset_id)
    running.cancel()
    wait_for(lambda: running.info().ended, "the job to end")
    client.delete_dataset(train.dataset_id)


# ---------------------------------------------------------------- tenants
def test_tenants_own_their_jobs(new_db: Callable[[], str], tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token alice\nbob-token bob\n")
    process = ServerProcess(new_db(), ["--auth-tokens", str(tokens)]).start()
    try:
        with (
            cr.Client(process.address, token="alice-token", timeout=WAIT_SECONDS) as alice,
            cr.Client(process.address, token="bob-token", timeout=WAIT_SECONDS) as bob,
        ):
            x, y = data(12)
            graph_id = alice.create_graph(logistic_graph()).graph_id
            dataset = alice.upload_dataset("alice's", {"x": x, "y": y}, progress=False)
            job = alice.create_job(
                graph_id,
                dataset.dataset_id,
                loss="loss",
                optimizer=cr.Sgd(0.1),
                feeds={"x": "x", "y": "y"},
                batch_size=4,
            )
            assert job.wait(progress=False).state == "succeeded"
            assert [info.job_id for info in alice.list_jobs()] == [job.job_id]
            assert bob.list_jobs() == []
            stranger = cr.Job(bob._jobs, job.job_id, WAIT_SECONDS)
            for call in (
                stranger.info,
                stranger.cancel,
                lambda: list(stranger.watch()),
                lambda: bob.get_job(job.job_id),
            ):
                with pytest.raises(cr.ChainruleError) as hidden:
                    call()
                assert hidden.value.code == grpc.StatusCode.NOT_FOUND
            bobs_graph = bob.create_graph(logistic_graph()).graph_id
            with pytest.raises(cr.ChainruleError) as hidden:
                bob.create_job(
                    bobs_graph, dataset.dataset_id, loss="loss", optimizer=cr.Sgd(0.1), feeds={"x": "x"}, batch_size=4
                )
            assert hidden.value.reason == "DATASET_NOT_FOUND"
    finally:
        process.kill()


# ---------------------------------------------------------------- watchers
def collect(job: cr.Job, from_step: int = 0, delay: float = 0.0, stop_after: int | None = None) -> list[cr.JobEvent]:
    events: list[cr.JobEvent] = []
    with job.watch(from_step) as watch:
        for event in watch:
            events.append(event)
            if delay:
                time.sleep(delay)
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


def test_watchers_get_every_step_once_in_order_however_and_whenever_they_watch(client: cr.Client) -> None:
    x, y = data(64)
    graph_id = client.create_graph(logistic_graph()).graph_id
    dataset = client.upload_dataset("watched", {"x": x, "y": y}, progress=False)
    total = 1500
    job = client.create_job(
        graph_id,
        dataset.dataset_id,
        loss="loss",
        optimizer=cr.Sgd(0.05),
        feeds={"x": "x", "y": "y"},
        batch_size=8,
        max_steps=total,
        checkpoint_every=16,
        evaluation=cr.Evaluation(["accuracy"], every_steps=250),
    )
    results: dict[str, list[cr.JobEvent]] = {}
    watchers = {
        "early": lambda: collect(job),
        "early, slow": lambda: collect(job, delay=0.001),
        "early, from 700": lambda: collect(job, from_step=700),
        "leaves after 40": lambda: collect(job, stop_after=40),
    }
    threads = [threading.Thread(target=lambda n=n, w=w: results.__setitem__(n, w())) for n, w in watchers.items()]
    for thread in threads:
        thread.start()
    wait_running(job, past_step=200)
    late = {"late": lambda: collect(job), "late, from 1000": lambda: collect(job, from_step=1000)}
    late_threads = [threading.Thread(target=lambda n=n, w=w: results.__setitem__(n, w())) for n, w in late.items()]
    for thread in late_threads:
        thread.start()
    for thread in threads + late_threads:
        thread.join(WAIT_SECONDS)
    assert job.info().state == "succeeded"
    history = job.history()
    assert history.steps == list(range(1, total + 1))
    assert [step for step, _ in history.metrics["accuracy"]] == [250, 500, 750, 1000, 1250, 1500]
    by_step = {event.step: event for event in job.watch() if event.state is None}
    for name, events in results.items():
        states = [event.state for event in events if event.state is not None]
        steps = [event.step for event in events if event.state is None]
        assert events[0].state in ("queued", "running"), name
        if name == "leaves after 40":
            assert steps == list(range(1, len(steps) + 1)), name
            continue
        first = 700 if "700" in name else 1000 if "1000" in name else 1
        assert steps == list(range(first, total + 1)), name
        assert states[-1] == "succeeded" and events[-1].state == "succeeded", name
        assert set(states) <= {"queued", "running", "succeeded"}, name
        assert all(event == by_step[event.step] for event in events if event.state is None), name
    # Leaving and coming back where one left off misses nothing.
    first_part = [event.step for event in results["leaves after 40"] if event.state is None]
    rest = [event.step for event in job.watch(first_part[-1] + 1) if event.state is None]
    assert first_part + rest == list(range(1, total + 1))


def test_watching_an_unknown_job_or_from_a_negative_step_is_refused(client: cr.Client) -> None:
    with pytest.raises(cr.ChainruleError) as missing:
        list(cr.Job(client._jobs, "0" * 32).watch())
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    x, y = data(8)
    graph_id = client.create_graph(logistic_graph()).graph_id
    dataset = client.upload_dataset("tiny", {"x": x, "y": y}, progress=False)
    job = client.create_job(
        graph_id, dataset.dataset_id, loss="loss", optimizer=cr.Sgd(0.1), feeds={"x": "x", "y": "y"}, batch_size=4
    )
    with pytest.raises(cr.ChainruleError) as negative:
        list(job.watch(-1))
    assert negative.value.code == grpc.StatusCode.INVALID_ARGUMENT
    job.wait(progress=False)


# ---------------------------------------------------------------- progress bars
def last_bar(stderr: str) -> str:
    """The bar as it was last drawn: tqdm redraws it in place after a carriage return."""
    return stderr.replace("\n", "\r").rstrip("\r").rsplit("\r", 1)[-1]


def test_wait_s_bar_shows_epoch_step_loss_the_latest_metrics_and_steps_per_second(
    client: cr.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """The job fails at its 4th step, so its last event (step 3) carries no metrics: the bar still
    shows those of step 2, the latest evaluation."""
    x, y = data(24)
    y[13] = np.nan
    graph_id = client.create_graph(logistic_graph()).graph_id
    dataset = client.upload_dataset("bar", {"x": x, "y": y}, progress=False)
    job = client.create_job(
        graph_id,
        dataset.dataset_id,
        loss="loss",
        optimizer=cr.Sgd(0.3),
        feeds={"x": "x", "y": "y"},
        batch_size=4,
        epochs=1,
        shuffle=False,
        stop_on_non_finite_loss=True,
        evaluation=cr.Evaluation(["accuracy"], every_steps=2),
    )
    capsys.readouterr()
    info = job.wait(progress=True, raise_on_failure=False)
    bar = last_bar(capsys.readouterr().err)
    history = job.history()
    assert info.state == "failed" and history.steps == [1, 2, 3]
    accuracy = dict(history.metrics["accuracy"])[2]
    assert bar.startswith("failed: ") and " 3/6 " in bar and "step/s" in bar, bar
    assert f"epoch=1, loss={history.losses[-1]:.4g}, accuracy={accuracy:.4g}" in bar, bar


def test_upload_dataset_s_bar_counts_the_bytes_sent(client: cr.Client, capsys: pytest.CaptureFixture[str]) -> None:
    from tqdm import tqdm

    columns = {"x": np.zeros((3 * 2**17, 2)), "y": np.ones(3 * 2**17, np.float32)}  # 6 MiB and 1.5 MiB
    total = sum(column.nbytes for column in columns.values())
    capsys.readouterr()
    client.upload_dataset("with a bar", columns, progress=True)
    bar = last_bar(capsys.readouterr().err)
    size = tqdm.format_sizeof(total)
    assert bar.startswith("100%|") and f" {size}/{size} " in bar and "B/s" in bar, bar
