"""The queue of jobs, the workers that run them, and every call on jobs: create, get, list, cancel, watch.

The queue is the store's: each server's workers claim the next job (Store.claim_job) and hold it
with a lease their server's heartbeat renews, so any number of servers on one database share the
work, and a job whose server died is taken over by another once its lease lapses, from its last
commit. Calls on a job this server runs answer from memory (every step); on any other job, from
the store (every commit).
"""

from __future__ import annotations

import base64
import bisect
import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, TypeVar, cast

from chainrule.server.datasets import DatasetManager
from chainrule.server.engine import Engine
from chainrule.server.errors import ChainruleError, InvalidArgument, NotFound, Unavailable, shown
from chainrule.server.jobs.executor import Computing, ExecutorFactory, InProcessExecutor, not_computing
from chainrule.server.jobs.job import Job, WatchItem, event_step
from chainrule.server.jobs.planning import MAX_REPLICAS, JobPlan, check_against_graph, invalid, plan_job
from chainrule.server.jobs.runner import JobRunner
from chainrule.server.store import WATCHER_CONNECTIONS
from chainrule.server.store.base import ENDED_JOB_STATES, ClaimLost, JobEventRow, StoredJob
from chainrule.server.work import StopFlag
from chainrule.v1 import job_service_pb2 as pb

if TYPE_CHECKING:
    from chainrule.server.jobs.ray_executor import RayExecutors

log = logging.getLogger("chainrule.server.jobs")
Encoded = TypeVar("Encoded")
Read = TypeVar("Read")
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
ENCODED_SLACK = 256
"""Encoded events a job keeps beyond its tail's before dropping those of steps the tail no longer holds."""
STORED_EVENTS_PAGE = 1000
WATCH_STORE_SECONDS = 0.25
"""How often a watcher of a job another server runs looks in the store for its new commits."""
WATCH_STORE_WAIT_SECONDS = 0.05
"""How often such a watcher, between looks, checks whether its call ended or this server took the job."""
HEARTBEATS_PER_LEASE = 3
"""A server renews its claims and leases this many times per --job-lease-seconds."""


@dataclass
class WatchPosition:
    """How far a watch has got: the next step event it sends, and the last state it sent."""

    next_step: int
    reported: str | None = None


class JobManager:
    """The queue, the workers, and every call on jobs."""

    def __init__(
        self,
        engine: Engine,
        datasets: DatasetManager,
        workers: int = DEFAULT_JOB_WORKERS,
        computing: Computing = not_computing,
        on_step: Callable[[int], None] | None = None,
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
        """The jobs this server's workers run now; guarded by `_lock`."""
        self._generation = 0
        """Counts wake-ups (a job created or ended here, a graph freed), so a worker never sleeps through one."""
        self._threads: list[threading.Thread] = []
        self._heartbeat: threading.Thread | None = None
        self._stopped = threading.Event()
        self._watch_reads = threading.BoundedSemaphore(WATCHER_CONNECTIONS)
        """Held by each read of the store a watch makes (see _watch_read)."""
        self.draining = False
        self.runner = JobRunner(engine, datasets, computing, on_step, lambda: self.draining, self._finished, executors)
        datasets.in_use = self.uses_dataset
        engine.on_graph_free = self._wake

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the workers, which take up the jobs a previous run left unfinished first (a job that was
        running keeps its graph's lease meanwhile, so nothing trains that graph before it resumes), and
        the heartbeat. A server alone on its database (SQLite) takes its previous run's claims back at
        once; on a shared one they lapse (--job-lease-seconds) and any server takes the jobs up."""
        if not self.store.shared:
            self.store.release_all_leases()
        self._tell_of_waiting_jobs()
        if self._ray is not None:
            self._ray.start()
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"job-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.store.shared:  # else claims last until released (see _claim_seconds), and cancels come here
            self._heartbeat = threading.Thread(target=self._beat, name="job-heartbeat", daemon=True)
            self._heartbeat.start()

    def stop(self) -> None:
        """Running jobs stop after their current step, commit, and are let go: they stay RUNNING in the
        store, for another server to take up at once, or this one when it starts again. Watches end
        with UNAVAILABLE."""
        self.draining = True
        self._wake()
        for job in list(self._jobs.values()):
            with job.condition:
                job.condition.notify_all()
        for thread in self._threads:
            thread.join()
        self._stopped.set()
        if self._heartbeat is not None:
            self._heartbeat.join()

    @property
    def _ray(self) -> RayExecutors | None:
        """The Ray executors, when this server runs jobs on Ray."""
        # Imported here: a job's Ray driver runs as `python -m chainrule.server.jobs.ray_driver`, and
        # the package's import must not import that module before it runs.
        from chainrule.server.jobs.ray_executor import RayExecutors

        executors = self.runner.executors
        return executors if isinstance(executors, RayExecutors) else None

    @property
    def max_replicas(self) -> int:
        """The replicas this server's jobs may have: 1 in-process, more on Ray (--ray-address)."""
        return 1 if self.runner.executors is InProcessExecutor else MAX_REPLICAS

    def _tell_of_waiting_jobs(self) -> None:
        """Log the unfinished jobs this server cannot run (replicas without Ray), which wait for one that can."""
        try:
            waiting = [job for job in self.store.unfinished_jobs() if job.replicas > self.max_replicas]
        except ChainruleError as error:
            log.warning("could not look for jobs this server cannot run: %s", error.message)
            return
        for job in waiting:
            log.warning(
                "job %s (%s) has %d replicas, which run on a Ray cluster: it waits for a server started with "
                "--ray-address%s",
                job.job_id,
                job.state,
                job.replicas,
                "" if self.store.shared else "; restart this one with it to run the job",
            )

    def _explained(self, stored: StoredJob) -> StoredJob:
        """The job with what it waits for when no server holds it and this one cannot run it."""
        held = stored.claim and (stored.lease_until is None or stored.lease_until >= time.time())
        if stored.replicas > self.max_replicas and stored.state not in ENDED_JOB_STATES and not held:
            return replace(stored, status_message=waiting_for_ray(stored.replicas))
        return stored

    def _wake(self) -> None:
        with self._wakeup:
            self._generation += 1
            self._wakeup.notify_all()

    # ------------------------------------------------------------ calls
    def create(self, spec: pb.JobSpec, tenant: str = "") -> StoredJob:
        for field in ("graph_id", "dataset_id"):
            if not getattr(spec, field):
                raise invalid(f"spec.{field} is empty", f"spec.{field}")
        graph = self.engine.live(spec.graph_id, tenant)
        with self.datasets.usage_lock:
            train = self.datasets.get_dataset(spec.dataset_id, tenant)
            evaluation = None
            if spec.HasField("evaluation"):
                evaluation = self.datasets.get_dataset(spec.evaluation.dataset_id or spec.dataset_id, tenant)
            plan = plan_job(spec, train, evaluation, self.engine.checkpoint_every)
            check_against_graph(plan, graph.plan, train, evaluation, spec.graph_id)
            if plan.replicas > self.max_replicas:
                raise invalid(
                    f"spec.replicas is {plan.replicas}; replicas run on a Ray cluster, and this server runs jobs "
                    "in its own process: start it with --ray-address",
                    "spec.replicas",
                )
        if self._ray is not None:  # may look at the cluster: not under the lock
            self._ray.check_fits(plan.replicas)
        with self.datasets.usage_lock:  # insert_job finds the datasets still there, in its transaction
            stored = StoredJob(
                job_id=uuid.uuid4().hex,
                tenant=tenant,
                graph_id=spec.graph_id,
                spec=spec.SerializeToString(deterministic=True),
                state="QUEUED",
                total_steps=plan.total_steps,
                created_at=time.time(),
                replicas=plan.replicas,
            )
            stored = self.store.insert_job(stored, sorted(plan.datasets))
        self._wake()
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
        page = [
            self.get(row.job_id, tenant) if row.job_id in self._jobs else self._explained(row) for row in rows[:limit]
        ]
        return page, _encode_page_token(rows[limit - 1].seq) if len(rows) > limit else ""

    def cancel(self, job_id: str, tenant: str = "") -> StoredJob:
        """A job no server runs (queued, or waiting to resume) ends CANCELLED now; a running one after its
        current step: at once when it runs here, else once its server sees the request in the store
        (at its next heartbeat)."""
        job = self._heard_cancel(job_id, tenant)
        stored = self.store.cancel_job(job_id, tenant, time.time()) if job_id else None
        if stored is None:
            raise NotFound(f"job '{shown(job_id)}' not found", reason="JOB_NOT_FOUND", subject=job_id)
        if job is None and stored.cancel_requested:
            job = self._heard_cancel(job_id, tenant)  # a worker here may have claimed it meanwhile
        self._wake()  # its graph may be free
        return self.get(job_id, tenant) if job is not None else stored

    def _heard_cancel(self, job_id: str, tenant: str) -> Job | None:
        """Tell the job, if it runs here, that a cancel was asked for. A worker that claimed the job just
        before the request was stored registers it and then reads the request back (see `_claim`), so
        one of the two always sees the other: on SQLite no heartbeat would bring the request later."""
        with self._lock:
            job = self._live(job_id, tenant)
        if job is not None:
            with job.condition:
                job.cancelling = True
                job.condition.notify_all()
        return job

    def uses_dataset(self, dataset_id: str) -> bool:
        """Whether a queued or running job, on any server, trains on the dataset or evaluates on it."""
        return self.store.dataset_in_use(dataset_id)

    def _live(self, job_id: str, tenant: str) -> Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.stored.tenant == tenant else None

    def _stored(self, job_id: str, tenant: str) -> StoredJob:
        stored = self.store.get_job(job_id, tenant) if job_id else None
        if stored is None:
            raise NotFound(f"job '{shown(job_id)}' not found", reason="JOB_NOT_FOUND", subject=job_id)
        return self._explained(stored)

    def _plan(self, spec: pb.JobSpec, tenant: str) -> JobPlan:
        train = self.datasets.get_dataset(spec.dataset_id, tenant)
        evaluation = None
        if spec.HasField("evaluation"):
            evaluation = self.datasets.get_dataset(spec.evaluation.dataset_id or spec.dataset_id, tenant)
        return plan_job(spec, train, evaluation, self.engine.checkpoint_every)

    # ------------------------------------------------------------ watching
    def watch(
        self,
        job_id: str,
        encode: Callable[[WatchItem], Encoded],
        tenant: str = "",
        from_step: int = 0,
        stop: StopFlag | None = None,
    ) -> Iterator[Encoded]:
        """The job's events from `from_step` on and its changes of state, ending after its final
        state (see JobEvent in job_service.proto), each as `encode` makes it: from memory while this
        server runs the job, from the store's commits while it does not, going from one to the other
        as the job moves. A step in memory is encoded once for all the job's watchers here, so a
        watcher costs the server little more than sending (the same `encode` for every watch)."""
        stop = stop or StopFlag()
        position = WatchPosition(max(from_step, 1))
        while True:
            with self._lock:
                job = self._live(job_id, tenant)
            if job is not None:
                done = yield from self._watch_here(job, position, stop, encode)
            else:
                done = yield from self._watch_store(job_id, tenant, position, stop, encode)
            if done:
                return

    def _watch_here(
        self, job: Job, position: WatchPosition, stop: StopFlag, encode: Callable[[WatchItem], Encoded]
    ) -> Generator[Encoded, None, bool]:
        """Every step as this server takes it; True once the watch is over, False when the job is let go."""
        next_step = position.next_step
        with job.condition:
            seen = len(job.transitions)
            state = job.state
        if state not in ENDED_JOB_STATES:
            if state != position.reported:
                yield encode(state)
                position.reported = state
        else:
            seen -= 1  # the final state comes after the history
        while True:
            with job.condition:
                while (
                    job.step < next_step
                    and len(job.transitions) == seen
                    and not stop.stopped
                    and not job.released
                    and not (self.draining and not job.ended)
                ):
                    job.condition.wait(WATCH_POLL_SECONDS)
                tail = job.tail
                covered = bool(tail) and tail[0].step <= next_step
                events = tail[bisect.bisect_left(tail, next_step, key=event_step) :] if covered else []
                transitions = job.transitions[seen:]
                last_step, ended, released = job.step, job.ended, job.released
            if stop.stopped:
                return True
            if self.draining and not ended:
                raise Unavailable(
                    "the server is shutting down; the job goes on when a server takes it up: watch it again from "
                    f"step {next_step}",
                    reason="SHUTTING_DOWN",
                )
            if not covered and next_step <= last_step:  # a watcher behind the job's tail in memory
                read = partial(self.store.job_events, job.job_id, next_step, STORED_EVENTS_PAGE)
                stored = self._watch_read(read, next_step, stop)
                if stored is None:
                    return True
                events = stored
            shared = job.encoded if covered else {}
            for event in events:
                while transitions and transitions[0].after_step < event.step:
                    position.reported = transitions.pop(0).state
                    yield encode(position.reported)
                    seen += 1
                entry = shared.get(event.step)
                if entry is None or entry[0] is not event:  # a step taken again after a restart is new
                    entry = shared[event.step] = (event, encode(event))
                yield cast(Encoded, entry[1])
                next_step = position.next_step = event.step + 1
            while transitions and transitions[0].after_step < next_step:
                position.reported = transitions.pop(0).state
                yield encode(position.reported)
                seen += 1
            if ended and not transitions and next_step > last_step:
                return True
            if released and not ended and next_step > last_step:
                return False
            if covered and len(shared) > len(tail) + ENCODED_SLACK:
                job.encoded = {step: entry for step, entry in list(shared.items()) if step >= tail[0].step}
            time.sleep(WATCH_BATCH_SECONDS)

    def _watch_store(
        self, job_id: str, tenant: str, position: WatchPosition, stop: StopFlag, encode: Callable[[WatchItem], Encoded]
    ) -> Generator[Encoded, None, bool]:
        """Every commit of a job this server does not run, as the store shows it; True once the watch is
        over, False when this server takes the job up."""
        while True:
            stored = self._watch_read(partial(self._stored, job_id, tenant), position.next_step, stop)
            if stored is None:
                return True
            ended = stored.state in ENDED_JOB_STATES
            if not ended and stored.state != position.reported:
                position.reported = stored.state
                yield encode(stored.state)
            elif ended and position.reported == "QUEUED" and stored.started_at is not None:
                position.reported = "RUNNING"  # it ran between two looks
                yield encode("RUNNING")
            for event in self._stored_events(job_id, position.next_step, stored.step, stop):
                yield encode(event)
                position.next_step = event.step + 1
            if stop.stopped:
                return True
            if ended:
                yield encode(stored.state)
                return True
            deadline = time.monotonic() + WATCH_STORE_SECONDS
            while time.monotonic() < deadline:
                if stop.stopped:
                    return True
                if self.draining:
                    raise watch_again_later(position.next_step)
                with self._lock:
                    if self._live(job_id, tenant) is not None:
                        return False
                time.sleep(WATCH_STORE_WAIT_SECONDS)

    def _stored_events(self, job_id: str, next_step: int, last_step: int, stop: StopFlag) -> Iterator[JobEventRow]:
        while next_step <= last_step and not stop.stopped:
            events = self._watch_read(
                partial(self.store.job_events, job_id, next_step, STORED_EVENTS_PAGE), next_step, stop
            )
            if not events:
                return
            yield from events
            next_step = events[-1].step + 1

    def _watch_read(self, read: Callable[[], Read], next_step: int, stop: StopFlag) -> Read | None:
        """`read` of the store for a watch, made once the watchers' reads in flight are fewer than
        WATCHER_CONNECTIONS, so that however many watch (and however slow the store), calls and jobs
        find their connections free; None when the watch ended while it waited its turn."""
        while not self._watch_reads.acquire(timeout=WATCH_POLL_SECONDS):
            if stop.stopped:
                return None
            if self.draining:
                raise watch_again_later(next_step)
        try:
            return read()
        finally:
            self._watch_reads.release()

    # ------------------------------------------------------------ the workers
    def _work(self) -> None:
        while not self.draining:
            with self._wakeup:
                generation = self._generation
            job = self._claim()
            if job is None:
                with self._wakeup:
                    if self._generation == generation and not self.draining:
                        self._wakeup.wait(SCHEDULER_POLL_SECONDS)
                continue
            try:
                self.runner.run(job)
            except Exception:  # a bug: the job fails, the worker goes on
                log.exception("job %s failed unexpectedly", job.job_id)
                with job.condition:
                    job.error = f"step {job.step + 1}: the server failed unexpectedly; see its log"
                if not job.ended and not job.lost:
                    self.runner.end(job, "FAILED")
            finally:
                self._let_go(job)

    def _claim(self) -> Job | None:
        """The next job this server runs, claimed in the store (see Store.claim_job); None when there is none."""
        while not self.draining:
            try:
                with self.engine.claiming() as streamed:
                    stored = self.store.claim_job(
                        uuid.uuid4().hex, self.engine.worker, self._claim_seconds, streamed, self.max_replicas
                    )
            except ChainruleError as error:  # the store is out of reach: look again later
                log.warning("could not look for jobs to run: %s", error.message)
                return None
            if stored is None:
                return None
            start = "resumed" if stored.state == "RUNNING" else "started"
            try:
                plan = self._plan(pb.JobSpec.FromString(stored.spec), stored.tenant)
            except ChainruleError as error:
                self._end_unstarted(stored, "FAILED", f"could not be {start}: {error.message}")
                continue
            if plan.replicas > self.max_replicas:  # its row says fewer: never run it as fewer replicas
                self._end_unstarted(stored, "FAILED", f"could not be {start}: {waiting_for_ray(plan.replicas)}")
                continue
            job = Job(stored, plan)
            with self._lock:
                self._jobs[job.job_id] = job
            if not job.cancelling:  # a cancel stored after the claim, before the job was registered here
                try:
                    current = self.store.get_job(job.job_id, stored.tenant)
                except ChainruleError as error:  # on a shared store the heartbeat brings it instead
                    log.warning("job %s: could not read back whether a cancel was asked for: %s", job.job_id, error)
                else:
                    if current is not None and current.cancel_requested:
                        with job.condition:
                            job.cancelling = True
            if stored.state == "RUNNING":
                log.info(
                    "job %s resumes at step %d of %d (resume %d)",
                    job.job_id,
                    stored.step,
                    stored.total_steps,
                    stored.resumes,
                )
            return job
        return None

    @property
    def _claim_seconds(self) -> float | None:
        """A claim on a store no other server uses lasts until it is released: its server's next run
        releases what the previous one held (see `start`)."""
        return self.engine.lease_seconds if self.store.shared else None

    def _let_go(self, job: Job) -> None:
        """This server no longer runs the job: one that has not ended is left for any server to take up
        (this one stops, or lost it); its watchers here go on from the store."""
        if not job.ended and not job.lost:
            try:
                self.store.release_claim(job.job_id, job.claim)
            except ChainruleError as error:  # the claim lapses instead
                log.warning("job %s: its claim lapses instead of being released: %s", job.job_id, error.message)
        with job.condition:
            job.released = True
            job.condition.notify_all()
        self._finished(job)

    def _finished(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.job_id, None)
        self._wake()

    def _end_unstarted(self, stored: StoredJob, state: str, error: str) -> None:
        log.error("job %s: %s", stored.job_id, error)
        try:
            self.store.save_job(replace(stored, state=state, error=error, ended_at=time.time()), claim=stored.claim)
        except (ChainruleError, ClaimLost) as refused:  # it stays claimed until the claim lapses
            log.error("job %s: could not end it: %s", stored.job_id, refused)

    # ------------------------------------------------------------ the heartbeat
    def _beat(self) -> None:
        """Renew the claims on the jobs this server runs, and its Train streams' leases, a few times per
        lease; learn which jobs another server has taken over, and which a cancel was asked for."""
        while not self._stopped.wait(self.engine.lease_seconds / HEARTBEATS_PER_LEASE):
            with self._lock:
                jobs = [job for job in self._jobs.values() if not job.lost]
            try:
                held = self.store.renew_claims({job.job_id: job.claim for job in jobs}, self.engine.lease_seconds)
                self.engine.renew_stream_leases()
            except ChainruleError as error:
                log.warning("could not renew this server's claims and leases: %s", error.message)
                continue
            for job in jobs:
                with job.condition:
                    if job.job_id not in held:
                        job.lost = not job.ended and not job.released
                    elif held[job.job_id]:
                        job.cancelling = True
                    job.condition.notify_all()


def waiting_for_ray(replicas: int) -> str:
    return (
        f"spec.replicas is {replicas}: replicas run on a Ray cluster, and the job waits for a server started "
        "with --ray-address"
    )


def watch_again_later(next_step: int) -> Unavailable:
    return Unavailable(
        f"the server is shutting down: watch the job again from step {next_step}", reason="SHUTTING_DOWN"
    )


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
