"""A job in memory while it has not ended: its row as it is now, the history not yet known to be in
the store, and the changes of state its watchers report."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import TypeAlias

from chainrule.server.jobs.planning import JobPlan
from chainrule.server.store.base import ENDED_JOB_STATES, JobEventRow, StoredJob


@dataclass(frozen=True)
class Transition:
    """A change of state, after the job's step `after_step`."""

    state: str
    after_step: int


class Job:
    """A job that has not ended (and, for its last watchers, one that just did): its row as it is
    now, the history not yet known to be in the store, and the changes of state watchers report."""

    def __init__(self, stored: StoredJob, plan: JobPlan) -> None:
        self.stored = stored
        self.plan = plan
        self.condition = threading.Condition()
        """Guards everything below; notified at each step and each change of state."""
        self.state = stored.state
        self.step = stored.step
        self.epoch = stored.epoch
        self.loss = stored.loss
        self.metrics = stored.metrics
        self.error = stored.error
        self.started_at = stored.started_at
        self.ended_at = stored.ended_at
        self.start_graph_step = stored.start_graph_step
        self.committed = stored.step
        """The job's last committed step: its history up to here is in the store."""
        self.tail: list[JobEventRow] = []
        """Events after the commit before the last one, by step: the last commit's and those since."""
        self.transitions = [Transition(stored.state, stored.step)]
        self.cancelling = False
        self.claimed = False
        """A worker took it (under the manager's lock)."""

    @property
    def job_id(self) -> str:
        return self.stored.job_id

    @property
    def ended(self) -> bool:
        return self.state in ENDED_JOB_STATES

    def snapshot(self) -> StoredJob:
        """The row as it is now (under `condition`)."""
        return replace(
            self.stored,
            state=self.state,
            step=self.step,
            epoch=self.epoch,
            loss=self.loss,
            metrics=self.metrics,
            error=self.error,
            started_at=self.started_at,
            ended_at=self.ended_at,
            start_graph_step=self.start_graph_step,
        )

    def change_state(self, state: str) -> None:
        """Under `condition`."""
        self.state = state
        self.transitions.append(Transition(state, self.step))
        self.condition.notify_all()


WatchItem: TypeAlias = JobEventRow | str
"""What a watch yields: a step's event, or a state (a change of state)."""


def event_step(event: JobEventRow) -> int:
    return event.step
