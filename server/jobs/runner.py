"""The loop of one job's steps: its batches, learning rates and evaluations, each step computed by
a StepExecutor, and its commits and ending (see the package's docstring)."""

from __future__ import annotations

import bisect
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from chainrule.server.datasets import DatasetManager, LocalDataset
from chainrule.server.engine import Engine, TrainingSession
from chainrule.server.errors import ChainruleError, FailedPrecondition, InvalidArgument, Unavailable, shown
from chainrule.server.jobs.executor import (
    Computing,
    ExecutorContext,
    ExecutorFactory,
    ExecutorLost,
    InProcessExecutor,
    StepExecutor,
)
from chainrule.server.jobs.job import Job, event_step
from chainrule.server.jobs.planning import JobPlan
from chainrule.server.store.base import ClaimLost, JobEventRow, job_trainer
from chainrule.server.work import StopFlag

log = logging.getLogger("chainrule.server.jobs")
NO_AUTOMATIC_COMMITS = sys.maxsize
"""A job's session commits only when the job says so, with the job's row and history."""
DEFAULT_JOB_MAX_RESTARTS = 3
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 10.0
"""A job waiting for its cluster tries again after 1 s, then twice as long each time, up to this."""
STEPS_TOLD_SECONDS = 0.05
"""How often at most a job tells the server's step counter (on_step) its steps since, and once more as
its loop ends: told each step, the counter cost about 3 µs of a step of 1 ms."""


class JobRunner:
    """Runs the jobs the manager's workers claim, one call of `run` per job."""

    def __init__(
        self,
        engine: Engine,
        datasets: DatasetManager,
        computing: Computing,
        on_step: Callable[[int], None] | None,
        draining: Callable[[], bool],
        finished: Callable[[Job], None],
        executors: ExecutorFactory = InProcessExecutor,
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.datasets = datasets
        self.computing = computing
        """Held around each step and each evaluation, as calls hold a compute slot."""
        self.on_step = on_step
        """Told how many steps the job has applied since it last told (see STEPS_TOLD_SECONDS)."""
        self.draining = draining
        """Whether the server is stopping: running jobs commit after their step, to resume at the next start."""
        self.finished = finished
        """Told when a job has ended, its end committed (or refused) and its watchers woken."""
        self.executors = executors
        self.max_restarts = DEFAULT_JOB_MAX_RESTARTS
        """How often a job starts again from its last commit after losing a replica, before it fails."""

    def run(self, job: Job) -> None:
        """Run a job a worker claimed until it ends, or until the server stops (it then commits and
        resumes at the next start)."""
        plan, stored = job.plan, job.stored
        if job.cancelling:
            self.end(job, "CANCELLED")
            return
        try:
            train = self.datasets.open(plan.dataset_id, stored.tenant)
            evaluation = None
            if plan.evaluation is not None:
                evaluation = self.datasets.open(plan.evaluation.dataset_id, stored.tenant)
            session = self.engine.start_training(
                stored.graph_id,
                plan.loss,
                plan.optimizer,
                plan.parameters,
                NO_AUTOMATIC_COMMITS,
                plan.stop_on_non_finite_loss,
                stored.tenant,
                keep_updates=False,
                seed=plan.seed,
                trainer=job_trainer(stored.job_id, job.claim),
            )
        except ChainruleError as error:
            with job.condition:
                job.error = f"the job could not start: {error.message}"
            self.end(job, "FAILED")
            return
        try:
            try:
                self._start(job, session)
            except ChainruleError as error:
                with job.condition:
                    job.error = f"the job could not start: {error.message}"
                self.end(job, "FAILED")
                return
            self._train_on_executors(job, session, train, evaluation)
        except ClaimLost:
            self._lose(job)
        finally:
            try:
                session.finish(commit=not job.lost)
            except ChainruleError as error:  # the job's end is settled; what the store refused is logged
                log.error("job %s: %s", job.job_id, error.message)

    def _start(self, job: Job, session: TrainingSession) -> None:
        """Mark the job RUNNING; a resumed one must find its graph where its last commit left it."""
        graph_step = session.live.step
        with job.condition:
            if job.started_at is None:
                job.started_at = time.time()
                job.start_graph_step = graph_step
            elif graph_step != job.start_graph_step + job.step:
                raise FailedPrecondition(
                    f"graph '{job.stored.graph_id}' is at step {graph_step}, not at {job.start_graph_step + job.step} "
                    f"where job step {job.step} left it",
                    reason="GRAPH_MOVED",
                )
            resumed = job.state == "RUNNING"
            if not resumed:
                job.change_state("RUNNING")
            record = job.snapshot()
        if not resumed:
            self.store.save_job(record, claim=job.claim)

    def _interrupted(self, error: ChainruleError) -> bool:
        """Whether the error is a shared database out of reach: then the job is not failed but stopped
        where its last commit left it, and any server takes it up again once the database answers."""
        return self.store.shared and isinstance(error, Unavailable) and error.reason == "STORE_UNAVAILABLE"

    def _interrupt(self, job: Job, error: ChainruleError) -> None:
        with job.condition:
            job.step = job.committed
            job.tail = [event for event in job.tail if event.step <= job.committed]
            job.lost = True
            job.condition.notify_all()
        log.warning(
            "job %s stops at its last commit, step %d, until a server takes it up again: %s",
            job.job_id,
            job.step,
            error.message,
        )

    def _lose(self, job: Job) -> None:
        """The job's claim no longer holds it: stop, committing nothing more (the server that holds it
        now goes on from the last commit, and fences out this one's writes)."""
        with job.condition:
            job.lost = True
            job.condition.notify_all()
        log.warning("job %s: another server holds it now; this one stops running it at step %d", job.job_id, job.step)

    def _train_on_executors(
        self, job: Job, session: TrainingSession, train: LocalDataset, evaluation: LocalDataset | None
    ) -> None:
        """Train until the job ends or the server stops. When its executor is lost (ExecutorLost: a
        replica died, or the Ray cluster is out of reach), the job goes back to its last commit and
        goes on with a fresh executor, redoing the same steps: a lost replica counts against
        `max_restarts`, a cluster out of reach is waited for as long as it takes."""
        stopping = lambda: job.cancelling or job.lost or self.draining()  # noqa: E731
        waiting = lambda message: self._status(job, message)  # noqa: E731
        context = ExecutorContext(
            job.job_id, job.stored.spec, job.plan, session, train, self.computing, stopping, waiting
        )
        restarts, pause = 0, RETRY_FIRST_SECONDS
        while True:
            started = False
            try:
                try:
                    executor = self.executors(context)
                except ExecutorLost:
                    raise
                except ChainruleError as error:
                    with job.condition:
                        job.error = f"the job could not start: {error.message}"
                    self.end(job, "FAILED")
                    return
                started = True
                self._status(job, "")
                try:
                    self._train(job, session, executor, evaluation)
                    return
                finally:
                    executor.close()
            except ExecutorLost as lost:
                restarts += lost.counts
                try:
                    self._go_back(job, session, resumes=started)
                except ChainruleError as error:
                    with job.condition:
                        job.error = f"step {job.step + 1}: {lost.message}; then: {error.message}"
                    self.end(job, "FAILED")
                    return
                if restarts > self.max_restarts:
                    with job.condition:
                        job.error = (
                            f"step {job.step + 1}: {lost.message}; given up after {self.max_restarts} restarts "
                            "(--job-max-restarts)"
                        )
                    self.end(job, "FAILED", session)
                    return
                log.warning("job %s: %s; going on from its last commit, step %d", job.job_id, lost.message, job.step)
                if lost.counts:
                    pause = RETRY_FIRST_SECONDS
                else:
                    if not stopping():
                        self._status(job, f"waiting for the Ray cluster: {lost.message}")
                    deadline = time.monotonic() + pause
                    while time.monotonic() < deadline and not stopping():
                        time.sleep(0.1)
                    pause = min(2 * pause, RETRY_MAX_SECONDS)
                if job.cancelling:
                    self.end(job, "CANCELLED", session)
                    return
                if self.draining():
                    return

    def _status(self, job: Job, message: str) -> None:
        """Say what the job waits for (empty: nothing), here and in the store for other servers' calls."""
        with job.condition:
            if job.status_message == message:
                return
            job.status_message = message
        try:
            self.store.set_job_status(job.job_id, job.claim, message)
        except ChainruleError as error:  # the server running the job still says it
            log.warning("job %s: could not store its status (%s): %s", job.job_id, message, error.message)

    def _go_back(self, job: Job, session: TrainingSession, resumes: bool) -> None:
        """Put the job and its graph back to the job's last commit, to redo the steps since; `resumes`
        when a run was lost (a failed attempt to start one again is no new resume)."""
        session.roll_back()
        with job.condition:
            job.step = job.committed
            job.tail = [event for event in job.tail if event.step <= job.committed]
            if job.tail and job.tail[-1].step == job.committed:
                job.epoch, job.loss = job.tail[-1].epoch, job.tail[-1].loss
            job.resumes += resumes
            job.condition.notify_all()

    def _train(
        self, job: Job, session: TrainingSession, executor: StepExecutor, evaluation: LocalDataset | None
    ) -> None:
        plan = job.plan
        schedule = plan.schedule
        step = job.step
        epoch, order = -1, None
        flag = StopFlag()  # never raised: a job waits for its compute slot whatever happens
        untold, tell_at = 0, time.monotonic() + STEPS_TOLD_SECONDS
        try:
            while step < plan.total_steps:
                if job.cancelling or job.lost or self.draining():
                    break
                if step // plan.batches_per_epoch != epoch:
                    epoch = step // plan.batches_per_epoch
                    order = plan.epoch_order(epoch)
                rate = plan.optimizer.learning_rate if schedule is None else schedule.rate(step)
                result = executor.step(plan.batch_rows(step, order), step, rate)
                step += 1
                untold += 1
                if self.on_step is not None and time.monotonic() >= tell_at:
                    self.on_step(untold)
                    untold, tell_at = 0, time.monotonic() + STEPS_TOLD_SECONDS
                metrics: dict[str, float] = {}
                failure = None
                if evaluation is not None and self._evaluates_after(plan, step):
                    try:
                        metrics = self._evaluate(job, evaluation, flag)
                    except ChainruleError as error:  # the step stands, with its event; the job fails after it
                        failure = error
                event = JobEventRow(step, epoch + 1, result.loss, rate, metrics)
                with job.condition:
                    job.step, job.epoch, job.loss = step, epoch + 1, result.loss
                    if metrics:
                        job.metrics = metrics
                    job.tail.append(event)
                    job.condition.notify_all()
                if failure is not None:
                    step -= 1  # the failing step's number is the one just taken
                    raise failure
                if step - job.committed >= plan.checkpoint_every and step < plan.total_steps:
                    self._commit(job, session)
        except ExecutorLost:
            raise
        except ChainruleError as error:
            if self._interrupted(error):
                self._interrupt(job, error)
                return
            with job.condition:
                job.error = f"step {step + 1}: {error.message}"
            self.end(job, "FAILED", session)
            return
        finally:
            if untold and self.on_step is not None:
                self.on_step(untold)
        if job.lost:
            return
        if step >= plan.total_steps:
            self.end(job, "SUCCEEDED", session)
        elif job.cancelling:
            self.end(job, "CANCELLED", session)
        else:  # the server is stopping: commit, and resume at the next start
            self._commit(job, session)

    @staticmethod
    def _evaluates_after(plan: JobPlan, step: int) -> bool:
        assert plan.evaluation is not None
        every = plan.evaluation.every_steps
        return step == plan.total_steps or (every > 0 and step % every == 0)

    def _evaluate(self, job: Job, data: LocalDataset, flag: StopFlag) -> dict[str, float]:
        """Each metric over the whole evaluation set in inference mode, averaged by example."""
        plan = job.plan.evaluation
        assert plan is not None
        columns = {name: np.asarray(data.columns[column]) for name, column in plan.feeds.items()}
        totals = [0.0] * len(plan.metrics)
        count = data.num_examples
        for start in range(0, count, plan.batch_size):
            stop = min(start + plan.batch_size, count)
            feeds = {name: column[start:stop] for name, column in columns.items()}
            with self.computing(flag):
                try:
                    values = self.engine.forward(job.stored.graph_id, feeds, plan.metrics, job.stored.tenant)
                except ChainruleError as error:
                    raise type(error)(
                        f"evaluation: {error.message}", reason=error.reason, subject=error.subject
                    ) from None
            for index, (metric, value) in enumerate(zip(plan.metrics, values, strict=True)):
                if np.size(value) != 1:
                    raise InvalidArgument(
                        f"evaluation: metric '{shown(metric)}' has shape {list(np.shape(value))}; a metric must be a "
                        "scalar: reduce it with mean",
                        reason="SHAPE_MISMATCH",
                        subject=metric,
                    )
                totals[index] += float(np.asarray(value).reshape(())) * (stop - start)
        return {metric: total / count for metric, total in zip(plan.metrics, totals, strict=True)}

    # ------------------------------------------------------------ commits and endings
    def _commit(self, job: Job, session: TrainingSession, state: str | None = None) -> None:
        """The graph's checkpoint, the job's row (in `state` when given) and the events since the last
        commit, in one transaction; then the job's in-memory history drops what two commits cover."""
        with job.condition:
            record = job.snapshot()
            if state is not None:
                record = replace(record, state=state, ended_at=time.time())
            start = bisect.bisect_right(job.tail, job.committed, key=event_step)
            events = tuple(job.tail[start:])
        if session.live.deleted:  # the job's row and history are all there is left to keep
            self.store.save_job(record, events, claim=job.claim)
        else:
            session.commit(lambda checkpoint, fence: self.store.save_job(record, events, checkpoint, fence, job.claim))
        with job.condition:
            job.tail = job.tail[bisect.bisect_right(job.tail, job.committed, key=event_step) :]
            job.committed = record.step
            if state is not None:
                job.ended_at = record.ended_at

    def end(self, job: Job, state: str, session: TrainingSession | None = None) -> None:
        """Commit the job's end (with its last good step's parameters, when it ran), then let watchers
        and the queue know. When the store refuses, the job still ends in memory, and a restart finds
        it as its last commit left it."""
        try:
            if session is None:
                with job.condition:
                    record = replace(job.snapshot(), state=state, ended_at=time.time())
                self.store.save_job(record, claim=job.claim)
                with job.condition:
                    job.ended_at = record.ended_at
            else:
                self._commit(job, session, state)
        except ClaimLost:  # another server holds the job now, and ends it
            self._lose(job)
            self.finished(job)
            return
        except ChainruleError as error:
            if self._interrupted(error):
                self._interrupt(job, error)
                self.finished(job)
                return
            log.error("job %s: could not commit its end (%s): %s", job.job_id, state, error.message)
            with job.condition:
                if isinstance(error, Unavailable) and session is not None:
                    job.step = job.committed = session.live.committed_step - job.start_graph_step
                    job.tail = [event for event in job.tail if event.step <= job.step]
                if state != "FAILED" or not job.error:
                    job.error = f"step {job.step + 1}: {error.message}"
                state = "FAILED"
                job.ended_at = time.time()
        with job.condition:
            job.change_state(state)
        self.finished(job)
        log.info("job %s %s at step %d of %d", job.job_id, state.lower(), job.step, job.plan.total_steps)
