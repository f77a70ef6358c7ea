"""Training jobs: queued in creation order, run by a pool of workers on the engine's training
sessions, reading their batches from the memory-mapped dataset cache, and watched live. No gRPC here.

Reproducible by construction: everything a step depends on is a function of what a commit
stores (the graph's parameters, optimizer state and state nodes, the job's step) and of the
spec: the batch of job step `s` comes from epoch `s // batches_per_epoch`, whose order is a
permutation drawn from Philox keyed by (seed, epoch); dropout is keyed by (seed, s); the learning
rate is the schedule's rate of `s`. So a job resumed from its last commit after a crash computes
exactly the steps an uninterrupted run computes.

Durable: every `checkpoint_every` steps and at its end, a job commits the graph's checkpoint,
its own row and the history of the steps since its last commit in one store transaction.
Between commits the history lives in memory (`Job.tail`), where watchers read it; a watcher
that falls behind the tail reads the store instead, so the job never waits for a watcher.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TypeAlias

import numpy as np

from chainrule.server import optim
from chainrule.server.datasets import DatasetManager, LocalDataset
from chainrule.server.engine import Engine, TrainingSession
from chainrule.server.errors import ChainruleError, FailedPrecondition, InvalidArgument, NotFound, Unavailable, shown
from chainrule.server.plan import Plan
from chainrule.server.shapes import describe
from chainrule.server.specs import Schedule, optimizer_from_proto, schedule_from_proto
from chainrule.server.store.base import ENDED_JOB_STATES, JobEventRow, StoredDataset, StoredJob
from chainrule.server.work import StopFlag
from chainrule.v1 import job_service_pb2 as pb

log = logging.getLogger("chainrule.server.jobs")
DEFAULT_JOB_WORKERS = 1
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_TOTAL_STEPS = 2**62
"""Beyond this a job's step count would not fit the store's and the wire's 64-bit integers."""
PAGE_TOKEN_PREFIX = "jobs-after"
SCHEDULER_POLL_SECONDS = 1.0
"""How often idle workers look at the queue without being told to (a safety net: they are told)."""
WATCH_POLL_SECONDS = 0.5
"""How often a watcher waiting for news looks whether its call ended or the server is stopping."""
WATCH_BATCH_SECONDS = 0.02
"""A watcher that has sent what there was waits this long before looking again, so it takes a
fast job's events in batches instead of waking at every step: watching stays cheap for the job."""
STORED_EVENTS_PAGE = 1000
NO_AUTOMATIC_COMMITS = sys.maxsize
"""A job's session commits only when the job says so, with the job's row and history."""
Computing = Callable[[StopFlag], contextlib.AbstractContextManager[None]]


def not_computing(stop: StopFlag) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


# ---------------------------------------------------------------- the spec, decoded and checked
@dataclass(frozen=True)
class EvaluationPlan:
    dataset_id: str
    feeds: dict[str, str]
    metrics: tuple[str, ...]
    every_steps: int
    batch_size: int


@dataclass(frozen=True)
class JobPlan:
    """A JobSpec as the runner uses it, with what it implies: batches per epoch and total steps."""

    loss: str
    optimizer: optim.Optimizer
    schedule: Schedule | None
    parameters: tuple[str, ...]
    dataset_id: str
    feeds: dict[str, str]
    batch_size: int
    seed: int
    shuffle: bool
    drop_last: bool
    checkpoint_every: int
    stop_on_non_finite_loss: bool
    evaluation: EvaluationPlan | None
    num_examples: int
    batches_per_epoch: int
    total_steps: int

    @property
    def datasets(self) -> set[str]:
        return {self.dataset_id} | ({self.evaluation.dataset_id} if self.evaluation else set())

    def batch_rows(self, step: int, order: np.ndarray | None) -> slice | np.ndarray:
        """The examples of job step `step` (0-based) within its epoch's `order` (None: dataset order)."""
        start = (step % self.batches_per_epoch) * self.batch_size
        stop = min(start + self.batch_size, self.num_examples)
        return slice(start, stop) if order is None else order[start:stop]

    def epoch_order(self, epoch: int) -> np.ndarray | None:
        """The order of the examples in `epoch` (0-based): a permutation keyed by (seed, epoch) when
        shuffling, else None (dataset order)."""
        if not self.shuffle:
            return None
        generator = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, epoch])))
        return generator.permutation(self.num_examples)


def _invalid(message: str, subject: str, reason: str = "BAD_JOB_SPEC") -> InvalidArgument:
    return InvalidArgument(message, reason=reason, subject=subject)


def plan_job(spec: pb.JobSpec, train: StoredDataset, evaluation: StoredDataset | None, default_every: int) -> JobPlan:
    """Check what the spec alone can tell (with its datasets' sizes) and work out its steps."""
    if not spec.loss:
        raise _invalid("spec.loss is empty; name the scalar node to minimize", "spec.loss")
    optimizer = optimizer_from_proto(spec.optimizer)
    try:
        optim.validate(optimizer)
    except ValueError as error:
        raise _invalid(f"spec.optimizer: {error}", "spec.optimizer", "BAD_OPTIMIZER") from None
    schedule = schedule_from_proto(spec.schedule, optimizer)
    if len(set(spec.parameters)) != len(spec.parameters):
        raise _invalid("spec.parameters names a parameter more than once", "spec.parameters")
    for field in ("batch_size", "epochs", "max_steps", "checkpoint_every"):
        value = getattr(spec, field)
        if value < 0:
            raise _invalid(f"spec.{field} is {value}; it must not be negative", f"spec.{field}")
    if spec.batch_size == 0:
        raise _invalid("spec.batch_size is 0; batches need at least one example", "spec.batch_size")
    if not spec.feeds:
        raise _invalid("spec.feeds is empty; map the graph's inputs to columns of the dataset", "spec.feeds")
    count, size = train.num_examples, spec.batch_size
    batches = count // size if spec.drop_last else -(-count // size)
    if batches == 0:
        why = f"fewer than batch_size {size} with drop_last" if count else "none"
        raise _invalid(
            f"dataset '{shown(train.dataset_id)}' has {count} examples, {why}: an epoch would have no batch",
            "spec.batch_size",
        )
    epochs = spec.epochs or (0 if spec.max_steps else 1)
    totals = [limit for limit in (epochs * batches, spec.max_steps) if limit]
    total = min(totals)
    if total >= MAX_TOTAL_STEPS:
        raise _invalid(f"the spec implies {total:,} steps, more than the {MAX_TOTAL_STEPS:,} a job can take", "spec")
    plan_evaluation = None
    if spec.HasField("evaluation"):
        message = spec.evaluation
        if not message.metrics:
            raise _invalid("spec.evaluation.metrics is empty; name at least one scalar node", "spec.evaluation.metrics")
        if len(set(message.metrics)) != len(message.metrics):
            raise _invalid("spec.evaluation.metrics names a node more than once", "spec.evaluation.metrics")
        for field in ("every_steps", "batch_size"):
            value = getattr(message, field)
            if value < 0:
                raise _invalid(
                    f"spec.evaluation.{field} is {value}; it must not be negative", f"spec.evaluation.{field}"
                )
        assert evaluation is not None
        if evaluation.num_examples == 0:
            raise _invalid(
                f"evaluation dataset '{shown(evaluation.dataset_id)}' has no examples", "spec.evaluation.dataset_id"
            )
        plan_evaluation = EvaluationPlan(
            evaluation.dataset_id,
            dict(message.feeds) or dict(spec.feeds),
            tuple(message.metrics),
            message.every_steps,
            message.batch_size or size,
        )
    return JobPlan(
        loss=spec.loss,
        optimizer=optimizer,
        schedule=schedule,
        parameters=tuple(spec.parameters),
        dataset_id=train.dataset_id,
        feeds=dict(spec.feeds),
        batch_size=size,
        seed=spec.seed,
        shuffle=spec.shuffle,
        drop_last=spec.drop_last,
        checkpoint_every=spec.checkpoint_every or default_every,
        stop_on_non_finite_loss=spec.stop_on_non_finite_loss,
        evaluation=plan_evaluation,
        num_examples=count,
        batches_per_epoch=batches,
        total_steps=total,
    )


def check_against_graph(
    job: JobPlan, graph: Plan, train: StoredDataset, evaluation: StoredDataset | None, graph_id: str
) -> None:
    """Refuse what the graph and the datasets tell up front: unknown nodes and columns, columns that
    do not fit the inputs they feed, inputs the loss or the metrics need that nothing feeds."""
    loss = _node(graph, job.loss, "spec.loss", "loss")
    _check_scalar(graph, loss, job.loss, "spec.loss", "the loss")
    names = job.parameters or tuple(graph.parameters)
    if not names:
        raise _invalid(f"graph '{graph_id}' has no parameters to train", "spec.parameters", "UNKNOWN_PARAMETER")
    for name in names:
        if name not in graph.parameters:
            kind = "a state node (running statistics), never trained" if name in graph.state else "not a parameter"
            if name not in graph.slot_of:
                kind = "no node of the graph"
            raise _invalid(f"spec.parameters names '{shown(name)}', {kind}", name, "UNKNOWN_PARAMETER")
    _check_feeds(graph, job.feeds, train, [loss], "spec.feeds", "the loss")
    _check_batch_dimension(graph, job.feeds, job.batch_size, job.num_examples, job.drop_last, "spec.feeds")
    if job.evaluation is not None and evaluation is not None:
        plan = job.evaluation
        slots = [_node(graph, metric, "spec.evaluation.metrics", "metric") for metric in plan.metrics]
        for slot, metric in zip(slots, plan.metrics, strict=True):
            _check_scalar(graph, slot, metric, "spec.evaluation.metrics", "a metric")
        _check_feeds(graph, plan.feeds, evaluation, slots, "spec.evaluation.feeds", "the metrics")
        _check_batch_dimension(graph, plan.feeds, plan.batch_size, evaluation.num_examples, False, "spec.evaluation")


def _node(graph: Plan, name: str, field: str, role: str) -> int:
    slot = graph.slot_of.get(name)
    if slot is None:
        raise _invalid(f"{field}: {role} '{shown(name)}' names no node of the graph", name, "UNKNOWN_NODE")
    return slot


def _check_scalar(graph: Plan, slot: int, name: str, field: str, role: str) -> None:
    shape = graph.types[slot].shape
    if shape is not None and shape != () and all(dim is not None for dim in shape):
        raise _invalid(
            f"{field}: {role} '{shown(name)}' has shape {list(shape)}; it must be a scalar: reduce it with sum or mean",
            name,
            "SHAPE_MISMATCH",
        )


def _check_feeds(
    graph: Plan, feeds: Mapping[str, str], dataset: StoredDataset, targets: list[int], field: str, needer: str
) -> None:
    columns = {column.name: column for column in dataset.columns}
    for name, column_name in feeds.items():
        slot = graph.inputs.get(name)
        if slot is None:
            why = "is not an input node" if name in graph.slot_of else "names no node of the graph"
            raise _invalid(f"{field}: '{shown(name)}' {why}", name, "UNKNOWN_FEED")
        column = columns.get(column_name)
        if column is None:
            have = ", ".join(f"'{shown(c)}'" for c in columns)
            raise _invalid(
                f"{field}: input '{shown(name)}' is fed column '{shown(column_name)}', which dataset "
                f"'{shown(dataset.dataset_id)}' does not have (it has {have})",
                column_name,
                "UNKNOWN_COLUMN",
            )
        declared = graph.sources[slot].type
        dtype = np.dtype(column.dtype)
        if declared.dtype is not None and dtype != declared.dtype:
            raise _invalid(
                f"{field}: column '{shown(column_name)}' holds {dtype}; "
                f"input '{shown(name)}' declares {declared.dtype}",
                name,
                "DTYPE_MISMATCH",
            )
        shape = declared.shape
        example = list(column.shape)
        if shape is not None and (
            len(shape) != len(example) + 1
            or any(d is not None and d != n for d, n in zip(shape[1:], example, strict=True))
        ):
            batches = describe((None, *example)).replace("?", "batch", 1)
            raise _invalid(
                f"{field}: column '{shown(column_name)}' has examples of shape {example}, so it feeds batches of "
                f"shape {batches}; input '{shown(name)}' declares {describe(shape)}",
                name,
                "SHAPE_MISMATCH",
            )
    needed = [graph.names[slot] for slot in graph.needed(targets) if slot in graph.sources]
    missing = [name for name in needed if name in graph.inputs and name not in feeds]
    if missing:
        raise _invalid(
            f"{field}: {needer} need{'s' if needer == 'the loss' else ''} input "
            f"{', '.join(repr(shown(name)) for name in missing)}, which no column feeds",
            missing[0],
            "MISSING_FEED",
        )


def _check_batch_dimension(
    graph: Plan, feeds: Mapping[str, str], batch_size: int, count: int, drop_last: bool, field: str
) -> None:
    """An input that declares a fixed first dimension takes only batches of exactly that many examples."""
    sizes = {batch_size} if drop_last or count % batch_size == 0 else {batch_size, count % batch_size}
    sizes = {min(size, count) for size in sizes}
    for name in feeds:
        shape = graph.sources[graph.inputs[name]].type.shape
        if shape and shape[0] is not None and sizes != {shape[0]}:
            raise _invalid(
                f"{field}: input '{shown(name)}' declares a first dimension of {shape[0]}, but batches of "
                f"{' and '.join(map(str, sorted(sizes)))} examples would feed it",
                name,
                "SHAPE_MISMATCH",
            )


# ---------------------------------------------------------------- a job in memory
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


class JobManager:
    """The queue, the workers, and every call on jobs."""

    def __init__(
        self,
        engine: Engine,
        datasets: DatasetManager,
        workers: int = DEFAULT_JOB_WORKERS,
        computing: Computing = not_computing,
        on_step: Callable[[], None] | None = None,
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
                raise _invalid(f"spec.{field} is empty", f"spec.{field}")
        graph = self.engine.live(spec.graph_id, tenant)
        with self.datasets.usage_lock:  # no delete of the datasets between this check and the queueing
            train = self.datasets.get_dataset(spec.dataset_id, tenant)
            evaluation = None
            if spec.HasField("evaluation"):
                evaluation = self.datasets.get_dataset(spec.evaluation.dataset_id or spec.dataset_id, tenant)
            plan = plan_job(spec, train, evaluation, self.engine.checkpoint_every)
            check_against_graph(plan, graph.plan, train, evaluation, spec.graph_id)
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
            self._end(job, "CANCELLED")
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
                events = tail[bisect.bisect_left(tail, next_step, key=_step) :] if covered else []
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
                self._run(job)
            except Exception:  # a bug: the job fails, the worker goes on
                log.exception("job %s failed unexpectedly", job.job_id)
                with job.condition:
                    job.error = f"step {job.step + 1}: the server failed unexpectedly; see its log"
                if not job.ended:
                    self._end(job, "FAILED")
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

    def _run(self, job: Job) -> None:
        plan, stored = job.plan, job.stored
        if job.cancelling:
            self._end(job, "CANCELLED")
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
                trainer=stored.job_id,
            )
        except ChainruleError as error:
            with job.condition:
                job.error = f"the job could not start: {error.message}"
            self._end(job, "FAILED")
            return
        try:
            try:
                self._start(job, session)
            except ChainruleError as error:
                with job.condition:
                    job.error = f"the job could not start: {error.message}"
                self._end(job, "FAILED")
                return
            self._train(job, session, train, evaluation)
        finally:
            try:
                session.finish()
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
            self.store.save_job(record)

    def _train(self, job: Job, session: TrainingSession, train: LocalDataset, evaluation: LocalDataset | None) -> None:
        plan = job.plan
        # Plain views of the mapped columns: slicing a np.memmap runs Python code for every batch.
        columns = {name: np.asarray(train.columns[column]) for name, column in plan.feeds.items()}
        schedule = plan.schedule
        step = job.step
        epoch, order = -1, None
        flag = StopFlag()  # never raised: a job waits for its compute slot whatever happens
        try:
            while step < plan.total_steps:
                if job.cancelling or self.draining:
                    break
                if step // plan.batches_per_epoch != epoch:
                    epoch = step // plan.batches_per_epoch
                    order = plan.epoch_order(epoch)
                rows = plan.batch_rows(step, order)
                feeds = {name: column[rows] for name, column in columns.items()}
                rate = plan.optimizer.learning_rate if schedule is None else schedule.rate(step)
                with self.computing(flag):
                    result = session.step(feeds, learning_rate=rate, dropout_step=step)
                step += 1
                if self.on_step is not None:
                    self.on_step()
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
        except ChainruleError as error:
            with job.condition:
                job.error = f"step {step + 1}: {error.message}"
            self._end(job, "FAILED", session)
            return
        if step >= plan.total_steps:
            self._end(job, "SUCCEEDED", session)
        elif job.cancelling:
            self._end(job, "CANCELLED", session)
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
            start = bisect.bisect_right(job.tail, job.committed, key=_step)
            events = tuple(job.tail[start:])
        if session.live.deleted:  # the job's row and history are all there is left to keep
            self.store.save_job(record, events)
        else:
            session.commit(lambda checkpoint: self.store.save_job(record, events, checkpoint))
        with job.condition:
            job.tail = job.tail[bisect.bisect_right(job.tail, job.committed, key=_step) :]
            job.committed = record.step
            if state is not None:
                job.ended_at = record.ended_at

    def _end(self, job: Job, state: str, session: TrainingSession | None = None) -> None:
        """Commit the job's end (with its last good step's parameters, when it ran), then let watchers
        and the queue know. When the store refuses, the job still ends in memory, and a restart finds
        it as its last commit left it."""
        try:
            if session is None:
                with job.condition:
                    record = replace(job.snapshot(), state=state, ended_at=time.time())
                self.store.save_job(record)
                with job.condition:
                    job.ended_at = record.ended_at
            else:
                self._commit(job, session, state)
        except ChainruleError as error:
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
        if session is None:  # it never trained (a resumed job cancelled before a worker took it holds its graph)
            self.engine.release(job.stored.graph_id, job.job_id)
        with self._lock:
            self._jobs.pop(job.job_id, None)
            self._wakeup.notify_all()
        log.info("job %s %s at step %d of %d", job.job_id, state.lower(), job.step, job.plan.total_steps)

    def _end_unstarted(self, stored: StoredJob, state: str, error: str) -> None:
        log.error("job %s: %s", stored.job_id, error)
        self.store.save_job(replace(stored, state=state, error=error, ended_at=time.time()))


def _step(event: JobEventRow) -> int:
    return event.step


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
