"""Learning-rate schedules against torch.optim.lr_scheduler, in a Train stream and in a job.

PyTorch computes its rates step by step (StepLR multiplies by gamma at each boundary), the
server by the closed forms the contract states, so they agree to rounding. Warmup is PyTorch's
LinearLR(start_factor=1 / warmup, total_iters=warmup - 1), chained with SequentialLR; cosine is
compared over its period, after which PyTorch's rises again where the contract holds the minimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch

import chainrule.client as cr
from chainrule.client.jobs import Cosine, StepDecay, Warmup
from chainrule.server.specs import Schedule
from chainrule.v1 import graph_service_pb2 as pb
from tests.server_process import ServerProcess
from tests.test_jobs import data, logistic_graph
from tests.test_service import expect_error, feeds, mlp_graph
from tests.test_training import config, decoded, sgd

Scheduler = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def torch_rates(make: Scheduler, steps: int, learning_rate: float) -> list[float]:
    """The learning rate each of `steps` optimizer steps uses under PyTorch's scheduler."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=learning_rate)
    scheduler = make(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def with_warmup(warmup: int, then: Scheduler) -> Scheduler:
    if warmup == 0:
        return then

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        linear = torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warmup, 1.0, total_iters=warmup - 1)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, then(optimizer)], milestones=[warmup])

    return make


def step_lr(step_size: int, gamma: float) -> Scheduler:
    return lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma)


def cosine_lr(period: int, minimum: float) -> Scheduler:
    return lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, period, minimum)


def constant_lr() -> Scheduler:
    return lambda optimizer: torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, total_iters=0)


CASES = [
    ("step decay", Schedule(0.1, 0, "step_decay", step_size=3, gamma=0.5), step_lr(3, 0.5), 20),
    ("step decay after warmup", Schedule(0.1, 4, "step_decay", step_size=5, gamma=0.7), step_lr(5, 0.7), 30),
    ("cosine", Schedule(0.2, 0, "cosine", period_steps=12, min_learning_rate=0.01), cosine_lr(12, 0.01), 13),
    ("cosine after warmup", Schedule(0.2, 3, "cosine", period_steps=10), cosine_lr(10, 0.0), 14),
    ("warmup alone", Schedule(0.05, 5), constant_lr(), 12),
    ("warmup of one step", Schedule(0.05, 1, "step_decay", step_size=2, gamma=0.1), step_lr(2, 0.1), 9),
]


@pytest.mark.parametrize(("schedule", "scheduler", "steps"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_rates_match_pytorch_schedulers(schedule: Schedule, scheduler: Scheduler, steps: int) -> None:
    expected = torch_rates(with_warmup(schedule.warmup_steps, scheduler), steps, schedule.learning_rate)
    got = [schedule.rate(step) for step in range(steps)]
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)


def test_cosine_holds_its_minimum_after_the_period() -> None:
    schedule = Schedule(0.2, 2, "cosine", period_steps=5, min_learning_rate=0.03)
    assert [schedule.rate(step) for step in range(7, 20)] == [0.03] * 13
    assert schedule.rate(6) == pytest.approx(0.03 + (0.2 - 0.03) * (1 + math.cos(math.pi * 4 / 5)) / 2, rel=1e-15)


@pytest.fixture(scope="module")
def stub(server: ServerProcess):  # type: ignore[no-untyped-def]
    return server.stub()


def test_a_train_stream_scales_each_update_by_the_scheduled_rate(stub) -> None:  # type: ignore[no-untyped-def]
    """Steps count from the stream's first batch: a second stream starts the schedule again."""
    graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
    schedule = pb.LearningRateSchedule(step_decay=pb.StepDecay(step_size=2, gamma=0.5), warmup_steps=2)
    expected = torch_rates(with_warmup(2, step_lr(2, 0.5)), 7, 0.1)
    x = np.random.default_rng(3).normal(size=(8, 3))
    for _ in range(2):
        requests = [config(graph_id, sgd(0.1), stream_gradients=True, stream_updates=True, schedule=schedule)]
        requests += [pb.TrainRequest(batch=pb.Batch(feeds=feeds(x=x))) for _ in range(7)]
        responses = list(stub.Train(iter(requests)))
        assert len(responses) == 7
        for response, rate in zip(responses, expected, strict=True):
            gradients, updates = decoded(list(response.gradients)), decoded(list(response.updates))
            for name, gradient in gradients.items():
                np.testing.assert_allclose(updates[name], -rate * gradient, rtol=1e-12)


@pytest.mark.parametrize(
    "schedule",
    [
        pb.LearningRateSchedule(step_decay=pb.StepDecay(step_size=0, gamma=0.5)),
        pb.LearningRateSchedule(step_decay=pb.StepDecay(step_size=2, gamma=math.nan)),
        pb.LearningRateSchedule(step_decay=pb.StepDecay(step_size=2, gamma=0)),
        pb.LearningRateSchedule(cosine=pb.Cosine(period_steps=0)),
        pb.LearningRateSchedule(cosine=pb.Cosine(period_steps=5, min_learning_rate=-1)),
        pb.LearningRateSchedule(warmup_steps=-1),
    ],
    ids=["step size 0", "gamma NaN", "gamma 0", "period 0", "negative minimum", "negative warmup"],
)
def test_a_train_stream_with_a_bad_schedule_is_refused_before_any_step(stub, schedule) -> None:  # type: ignore[no-untyped-def]
    graph_id = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph())).graph.graph_id
    x = np.zeros((2, 3))
    requests = [config(graph_id, sgd(0.1), schedule=schedule), pb.TrainRequest(batch=pb.Batch(feeds=feeds(x=x)))]
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Train(iter(requests)), "schedule.")
    step = stub.GetParameters(pb.GetParametersRequest(graph_id=graph_id)).step
    assert step == 0


@pytest.mark.parametrize(
    ("schedule", "scheduler"),
    [
        (StepDecay(step_size=4, gamma=0.3, warmup_steps=3), with_warmup(3, step_lr(4, 0.3))),
        (Cosine(period_steps=9, min_learning_rate=0.002, warmup_steps=2), with_warmup(2, cosine_lr(9, 0.002))),
        (Warmup(6), with_warmup(6, constant_lr())),
    ],
    ids=["step decay", "cosine", "warmup"],
)
def test_a_jobs_steps_take_the_scheduled_rates(server: ServerProcess, schedule, scheduler) -> None:  # type: ignore[no-untyped-def]
    """The job counts steps from its own first step, whatever the graph's step; each event reports its rate."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 3))
    with cr.Client(server.address, timeout=60) as client:
        graph_id = client.create_graph(mlp_graph()).graph_id
        stub = server.stub()
        list(stub.Train(iter([config(graph_id, sgd(0.1)), pb.TrainRequest(batch=pb.Batch(feeds=feeds(x=x)))])))
        dataset = client.upload_dataset("schedule data", {"x": x})
        job = client.create_job(
            graph_id,
            dataset.dataset_id,
            loss="loss",
            optimizer=cr.Sgd(0.1),
            feeds={"x": "x"},
            batch_size=8,
            max_steps=11,
            schedule=schedule,
        )
        assert job.wait().state == "succeeded"
        history = job.history()
    expected = torch_rates(scheduler, 11, 0.1)
    assert history.steps == list(range(1, 12))
    np.testing.assert_allclose(history.learning_rates, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    ("schedule", "scheduler"),
    [
        (StepDecay(step_size=3, gamma=0.5, warmup_steps=2), with_warmup(2, step_lr(3, 0.5))),
        (Cosine(period_steps=8, min_learning_rate=0.05, warmup_steps=3), with_warmup(3, cosine_lr(8, 0.05))),
        (Warmup(5), with_warmup(5, constant_lr())),
    ],
    ids=["step decay", "cosine", "warmup"],
)
def test_a_jobs_parameters_are_those_of_sgd_at_the_scheduled_rates(server: ServerProcess, schedule, scheduler) -> None:  # type: ignore[no-untyped-def]
    """Logistic regression trained by a job against the same SGD written in numpy, each step at
    the rate PyTorch's scheduler gives it: a job that reported one rate and applied another, or
    applied the schedule one step off, ends with other parameters."""
    x, y = data(40, seed=8)
    steps, batch, base = 11, 8, 0.5
    with cr.Client(server.address, timeout=60) as client:
        graph_id = client.create_graph(logistic_graph()).graph_id
        dataset = client.upload_dataset("scheduled sgd", {"x": x, "y": y}, progress=False)
        job = client.create_job(
            graph_id,
            dataset.dataset_id,
            loss="loss",
            optimizer=cr.Sgd(base),
            feeds={"x": "x", "y": "y"},
            batch_size=batch,
            max_steps=steps,
            shuffle=False,
            schedule=schedule,
        )
        assert job.wait(progress=False).state == "succeeded"
        got = client.get_parameters(graph_id)
    w, b = np.array([[0.1], [0.2], [-0.3]]), np.zeros(1)  # logistic_graph's initial values
    for step, rate in enumerate(torch_rates(scheduler, steps, base)):
        rows = slice(step % 5 * batch, step % 5 * batch + batch)
        logits = x[rows] @ w + b
        dlogits = (1 / (1 + np.exp(-logits)) - y[rows]) / batch  # d mean(sigmoid cross-entropy) / d logits
        w, b = w - rate * (x[rows].T @ dlogits), b - rate * dlogits.sum(axis=0)
    np.testing.assert_allclose(got["w"], w, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got["b"], b, rtol=1e-12, atol=1e-15)
