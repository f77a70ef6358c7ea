"""How a job's step is computed: the seam between the runner (batches, schedule, evaluation, commits,
leases) and whatever computes the step's loss, gradients and update.

The runner asks its executor for one step at a time, giving the rows of the training set the step
reads, the job's step (which keys dropout) and the learning rate; the executor answers with the
step's result once the graph's live parameters hold the update (through the job's
TrainingSession, the one place parameters change), so the runner's commits store it. The
in-process executor computes the whole batch in this process; an executor may instead split the
batch among replicas elsewhere (server/jobs/ray_executor.py) and apply their combined gradients
through the same session.

An executor that loses what it computes on (a replica gone) raises `ExecutorLost`: the step was
not applied, and the runner may start the job again from its last commit with a fresh executor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from chainrule.server.datasets import LocalDataset
from chainrule.server.engine import StepResult, TrainingSession
from chainrule.server.errors import Unavailable
from chainrule.server.jobs.planning import JobPlan
from chainrule.server.work import StopFlag

Computing = Callable[[StopFlag], contextlib.AbstractContextManager[None]]
"""Held around computing in this process, as calls hold a compute slot (see service/calls.py)."""


def not_computing(stop: StopFlag) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


class ExecutorLost(Unavailable):
    """What computed the job's steps is gone; the step that raised it was not applied."""

    counts = True
    """Whether this counts against the job's restarts (--job-max-restarts); False when the cluster
    itself is out of reach, which the job waits out."""


def never() -> bool:
    return False


def unheard(message: str) -> None:
    pass


@dataclass(frozen=True)
class ExecutorContext:
    """What an executor is made from: the job, its training session and its training set."""

    job_id: str
    spec: bytes
    """The job's serialized JobSpec, for settings the plan does not carry."""
    plan: JobPlan
    session: TrainingSession
    train: LocalDataset
    computing: Computing
    stopping: Callable[[], bool] = never
    """Whether to give up starting (the job is cancelled or the server stops): an executor that waits
    for its cluster looks at it."""
    waiting: Callable[[str], None] = unheard
    """Told what an executor starting waits for (the cluster's CPUs, say), as the job's status message."""


class StepExecutor(Protocol):
    def step(self, rows: slice | np.ndarray, step: int, learning_rate: float) -> StepResult:
        """Compute and apply job step `step` (0-based) on the training set's `rows`."""
        ...

    def close(self) -> None:
        """Release what the executor holds; called once, however the job's run ends."""
        ...


ExecutorFactory = Callable[[ExecutorContext], StepExecutor]


class InProcessExecutor:
    """Each step's whole batch through the session, in this process, within a compute slot."""

    def __init__(self, context: ExecutorContext) -> None:
        self.session = context.session
        self.computing = context.computing
        # Plain views of the mapped columns: slicing a np.memmap runs Python code for every batch.
        self.columns = {name: np.asarray(context.train.columns[column]) for name, column in context.plan.feeds.items()}
        self.flag = StopFlag()  # never raised: a job waits for its compute slot whatever happens

    def step(self, rows: slice | np.ndarray, step: int, learning_rate: float) -> StepResult:
        feeds = {name: column[rows] for name, column in self.columns.items()}
        with self.computing(self.flag):
            return self.session.step(feeds, learning_rate=learning_rate, dropout_step=step)

    def close(self) -> None:
        pass
