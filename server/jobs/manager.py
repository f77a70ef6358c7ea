"""The queue of jobs, the workers that run them, and every call on jobs: create, get, list, cancel, watch."""

from __future__ import annotations

import base64
import bisect
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace

from chainrule.server.datasets import DatasetManager
from chainrule.server.engine import Engine
from chainrule.server.errors import ChainruleError, InvalidArgument, NotFound, Unavailable, shown
from chainrule.server.jobs.executor import Computing, ExecutorFactory, InProcessExecutor, not_computing
from chainrule.server.jobs.job import Job, WatchItem, event_step
from chainrule.server.jobs.planning import JobPlan, check_against_graph, invalid, plan_job
from chainrule.server.jobs.runner import JobRunner
from chainrule.server.store.base import ENDED_JOB_STATES, JobEventRow, StoredJob
from chainrule.server.work import StopFlag
from chainrule.v1 import job_service_pb2 as pb

log = logging.getLogger("chainrule.server.jobs")
DEFAULT_JOB_WORKERS = 1
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
PAGE_TOKEN_PREFIX = "jobs-after"
SCHEDULER_POLL_SECONDS = 1.0
"""How often idle workers look at the queue without being told to (a safety net: they are told)."""
WATCH_POLL_SECONDS = 0.5
"""How often a watcher waiting for news looks whether its call ended or the server is stopping."""
WATCH_BATCH_SECONDS = 0.02
"""A watcher that has sent what there was waits this long before looking again, so it takes a
fast job's events in batches instead of waking at every step: watching stays cheap for the job."""
STORED_EVENTS_PAGE = 1000


class JobManager:
    """The queue, the workers, and every call on jobs."""

    def __init__(
        self,
        engine: Engine,
        datasets: DatasetManager,
        workers: int = DEFAULT_JOB_WORKERS,
        computing: Computing = not_computing,
        on_step: Callable[[], None] | None = None,
        executors: ExecutorFactory = InProcessExecutor,
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.datasets = datasets
        self.workers = workers
        self.computing = computing
        """Held around each step and each evaluation, as calls hold a compute slot."""
        self.on_step = on_step
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}
        """Jobs that have not ended, in creation order; guarded by `_lock`."""
        self._threads: list[threading.Thread] = []
        self.draining = False
        self.runner = JobRunner(engine, datasets, computing, on_step, lambda: self.draining, self._finished, executors)
        datasets.in_use = self.uses_dataset
        engine.on_graph_free = self._wake

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Take up every job a previous run left unfinished, then start the workers. A job that was
        running keeps its graph reserved from now on, so nothing trains that graph before it resumes."""
        for stored in self.store.unfinished_jobs():
            try:
                plan = self._plan(pb.JobSpec.FromString(stored.spec), stored.tenant)
            except ChainruleError as error:
                self._end_unstarted(stored, "FAILED", f"could not be resumed: {error.message}")
                continue
            job = Job(stored, plan)
            if stored.state == "RUNNING":
                self.engine.reserve(stored.graph_id, stored.job_id)
                log.info("job %s resumes at step %d of %d", stored.job_id, stored.step, stored.total_steps)
            self._jobs[stored.job_id] = job
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"job-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Running jobs stop after their current step and commit; they stay RUNNING in the store and
        resume when the server starts again. Watches end with UNAVAILABLE."""
        self.draining = True
        self._wake()
        for job in list(self._jobs.values()):
            with job.condition:
                job.condition.notify_all()
        for thread in self._threads:
            thread.join()

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    # ------------------------------------------------------------ calls
    def create(self, spec: pb.JobSpec, tenant: str = "") -> StoredJob:
        for field in ("graph_id", "dataset_id"):
            if not getattr(spec, field):
                raise invalid(f"spec.{field} is empty", f"spec.{field}")
        graph = self.engine.live(spec.graph_id, tenant)
        with self.datasets.usage_lock:  # no delete of the datasets between this check and the queueing
            train = self.datasets.get_dataset(spec.dataset_id, tenant)
            evaluation = None
            if spec.HasField("evaluation"):
                evaluation = self.datasets.get_dataset(spec.evaluation.dataset_id or spec.dataset_id, tenant)
            plan = plan_job(spec, train, evaluation, self.engine.checkpoint_every)
            check_against_graph(plan, graph.plan, train, evaluation, spec.graph_id)
            if plan.replicas > 1 and self.runner.executors is InProcessExecutor:
                raise invalid(
                    f"spec.replicas is {plan.replicas}; replicas run on a Ray cluster, and this server runs jobs "
                    "in its own process: start it with --ray-address",
                    "spec.replicas",
                )
            stored = StoredJob(
                job_id=uuid.uuid4().hex,
                tenant=tenant,
                graph_id=spec.graph_id,
                spec=spec.SerializeToString(deterministic=True),
                state="QUEUED",
                total_steps=plan.total_steps,
                created_at=time.time(),
            )
            with self._lock:
                stored = self.store.insert_job(stored)
                self._jobs[stored.job_id] = Job(stored, plan)
                self._wakeup.notify_all()
        return stored

    def get(self, job_id: str, tenant: str = "") -> StoredJob:
        job = self._live(job_id, tenant)
        if job is not None:
            with job.condition:
                return job.snapshot()
        return self._stored(job_id, tenant)

    def list(
        self, page_size: int, page_token: str, tenant: str = "", states: tuple[str, ...] = (), graph_id: str = ""
    ) -> tuple[list[StoredJob], str]:
        if page_size < 0:
            raise InvalidArgument(f"page_size is {page_size}; it must not be negative", subject="page_size")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        rows = self.store.list_jobs(tenant, _decode_page_token(page_token), limit + 1, states, graph_id)
        page = [self.get(row.job_id, tenant) if row.job_id in self._jobs else row for row in rows[:limit]]
        return page, _encode_page_token(rows[limit - 1].seq) if len(rows) > limit else ""

    def cancel(self, job_id: str, tenant: str = "") -> StoredJob:
        """A queued job ends CANCELLED now; a running one after its current step (its worker ends it)."""
        with self._lock:
            job = self._live(job_id, tenant)
            if job is None:
                return self._stored(job_id, tenant)  # ended already: nothing to cancel
            with job.condition:
                job.cancelling = True
                unclaimed = not job.claimed
                job.claimed = True  # no worker takes it up now
        if unclaimed:
            self.runner.end(job, "CANCELLED")
        return self.get(job_id, tenant)

    def uses_dataset(self, dataset_id: str) -> bool:
        """Whether a queued or running job trains on the dataset or evaluates on it."""
        with self._lock:
            return any(dataset_id in job.plan.datasets for job in self._jobs.values())

    def _live(self, job_id: str, tenant: str) -> Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.stored.tenant == tenant else None

    def _stored(self, job_id: str, tenant: str) -> StoredJob:
        stored = self.store.get_job(job_id, tenant) if job_id else None
        if stored is None:
            raise NotFound(f"job '{shown(job_id)}' not found", reason="JOB_NOT_FOUND", subject=job_id)
        return stored

    def _plan(self, spec: pb.JobSpec, tenant: str) -> JobPlan:
        train = self.datasets.get_dataset(spec.dataset_id, tenant)
        evaluation = None
        if spec.HasField("evaluation"):
            evaluation = self.datasets.get_dataset(spec.evaluation.dataset_id or spec.dataset_id, tenant)
        return plan_job(spec, train, evaluation, self.engine.checkpoint_every)

    # ------------------------------------------------------------ watching
    def watch(
        self, job_id: str, tenant: str = "", from_step: int = 0, stop: StopFlag | None = None
    ) -> Iterator[WatchItem]:
        """The job's events from `from_step` on and its changes of state, ending after its final
        state (see JobEvent in job_service.proto)."""
        stop = stop or StopFlag()
        next_step = max(from_step, 1)
        with self._lock:
            job = self._live(job_id, tenant)
        if job is None:
            stored = self._stored(job_id, tenant)
            yield from self._stored_events(job_id, next_step, stored.step, stop)
            yield stored.state
            return
        with job.condition:
            seen = len(job.transitions)
            state = job.state
        if state not in ENDED_JOB_STATES:
            yield state
        else:
            seen -= 1  # the final state comes after the history
        while True:
            with job.condition:
                while (
                    job.step < next_step
                    and len(job.transitions) == seen
                    and not stop.stopped
                    and not (self.draining and not job.ended)
                ):
                    job.condition.wait(WATCH_POLL_SECONDS)
                tail = job.tail
                covered = bool(tail) and tail[0].step <= next_step
                events = tail[bisect.bisect_left(tail, next_step, key=event_step) :] if covered else []
                transitions = job.transitions[seen:]
                last_step, ended = job.step, job.ended
            if stop.stopped:
                return
            if self.draining and not ended:
                raise Unavailable(
                    "the server is shutting down; the job goes on when it restarts: watch it again from step "
                    f"{next_step}",
                    reason="SHUTTING_DOWN",
                )
            if not covered and next_step <= last_step:
                events = self.store.job_events(job_id, next_step, STORED_EVENTS_PAGE)
            for event in events:
                while transitions and transitions[0].after_step < event.step:
                    yield transitions.pop(0).state
                    seen += 1
                yield event
                next_step = event.step + 1
            while transitions and transitions[0].after_step < next_step:
                yield transitions.pop(0).state
                seen += 1
            if ended and not transitions and next_step > last_step:
                return
            time.sleep(WATCH_BATCH_SECONDS)

    def _stored_events(self, job_id: str, next_step: int, last_step: int, stop: StopFlag) -> Iterator[JobEventRow]:
        while next_step <= last_step and not stop.stopped:
            events = self.store.job_events(job_id, next_step, STORED_EVENTS_PAGE)
            if not events:
                return
            yield from events
            next_step = events[-1].step + 1

    # ------------------------------------------------------------ the workers
    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            try:
                self.runner.run(job)
            except Exception:  # a bug: the job fails, the worker goes on
                log.exception("job %s failed unexpectedly", job.job_id)
                with job.condition:
                    job.error = f"step {job.step + 1}: the server failed unexpectedly; see its log"
                if not job.ended:
                    self.runner.end(job, "FAILED")
            finally:
                self.engine.release(job.stored.graph_id, job.job_id)
                self._wake()

    def _next(self) -> Job | None:
        """The oldest job whose graph no other job or Train stream trains, jobs that were running
        first (they hold their graphs); None once the server is stopping."""
        with self._wakeup:
            while not self.draining:
                waiting = [job for job in self._jobs.values() if not job.claimed and not job.ended]
                waiting.sort(key=lambda job: (job.state != "RUNNING", job.stored.seq))
                for job in waiting:
                    if self.engine.reserve(job.stored.graph_id, job.job_id):
                        job.claimed = True
                        return job
                self._wakeup.wait(SCHEDULER_POLL_SECONDS)
        return None

    def _finished(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.job_id, None)
            self._wakeup.notify_all()

    def _end_unstarted(self, stored: StoredJob, state: str, error: str) -> None:
        log.error("job %s: %s", stored.job_id, error)
        self.store.save_job(replace(stored, state=state, error=error, ended_at=time.time()))


def _encode_page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{PAGE_TOKEN_PREFIX}:{seq}".encode()).decode()


def _decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        prefix, seq = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        if prefix == PAGE_TOKEN_PREFIX and seq.isdigit() and int(seq) < 2**63:
            return int(seq)
    except (ValueError, UnicodeError):
        pass
    raise InvalidArgument("page_token is not one this server issued", reason="BAD_PAGE_TOKEN", subject="page_token")
