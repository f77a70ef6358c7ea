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
    """A job this server runs (and, for its last watchers, one it just stopped running): its row as it
    is now, the history not yet known to be in the store, and the changes of state watchers report."""

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
        self.encoded: dict[int, tuple[JobEventRow, object]] = {}
        """Events of the tail as WatchJob sends them, by step, each encoded once for all the job's
        watchers (see JobManager.watch); filled and trimmed by the watchers, outside `condition`."""
        self.transitions = [Transition(stored.state, stored.step)]
        self.resumes = stored.resumes
        self.status_message = stored.status_message
        self.claim = stored.claim
        """What holds the job for this server (see Store.claim_job), and fences its writes."""
        self.cancelling = stored.cancel_requested
        self.lost = False
        """The claim no longer holds the job (another server took it over, or a cancel ended it while the
        claim had lapsed): the run stops without committing anything more."""
        self.released = False
        """This server no longer runs the job (it ended, or was handed over): its watchers here read the
        store from now on."""

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
            resumes=self.resumes,
            status_message=self.status_message,
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
