"""Training jobs on the server: what the client reports about one, its events, and the `Job` handle."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal, Self

import grpc
from tqdm import tqdm  # type: ignore[import-untyped]

from chainrule.v1 import graph_service_pb2, job_service_pb2_grpc
from chainrule.v1 import job_service_pb2 as pb

from .errors import ChainruleError, from_rpc_error, rpc_errors
from .training import History, Optimizer

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ENDED: tuple[JobState, ...] = ("succeeded", "failed", "cancelled")
_STATE_PREFIX = "JOB_STATE_"


def state_name(state: pb.JobState.ValueType) -> JobState:
    return pb.JobState.Name(state).removeprefix(_STATE_PREFIX).lower()  # type: ignore[return-value]


def state_value(state: JobState) -> pb.JobState.ValueType:
    return pb.JobState.Value(_STATE_PREFIX + state.upper())


@dataclass(frozen=True)
class StepDecay:
    """lr * gamma ** (t // step_size) after the warmup (PyTorch's StepLR)."""

    step_size: int
    gamma: float
    warmup_steps: int = 0

    def to_proto(self) -> graph_service_pb2.LearningRateSchedule:
        return graph_service_pb2.LearningRateSchedule(
            step_decay=graph_service_pb2.StepDecay(step_size=self.step_size, gamma=self.gamma),
            warmup_steps=self.warmup_steps,
        )


@dataclass(frozen=True)
class Cosine:
    """From lr down to min_learning_rate over period_steps after the warmup, then held there
    (PyTorch's CosineAnnealingLR over one period)."""

    period_steps: int
    min_learning_rate: float = 0.0
    warmup_steps: int = 0

    def to_proto(self) -> graph_service_pb2.LearningRateSchedule:
        return graph_service_pb2.LearningRateSchedule(
            cosine=graph_service_pb2.Cosine(period_steps=self.period_steps, min_learning_rate=self.min_learning_rate),
            warmup_steps=self.warmup_steps,
        )


@dataclass(frozen=True)
class Warmup:
    """lr * (s + 1) / warmup_steps for the first warmup_steps steps, then lr."""

    warmup_steps: int

    def to_proto(self) -> graph_service_pb2.LearningRateSchedule:
        return graph_service_pb2.LearningRateSchedule(warmup_steps=self.warmup_steps)


Schedule = StepDecay | Cosine | Warmup


@dataclass(frozen=True)
class Evaluation:
    """Metrics (scalar nodes) evaluated in inference mode over a whole dataset, averaged by example,
    every `every_steps` steps (0: only) and at the end. `dataset_id` empty means the job's dataset,
    `feeds` empty the job's feeds, `batch_size` 0 the job's."""

    metrics: Sequence[str]
    dataset_id: str = ""
    feeds: Mapping[str, str] = field(default_factory=dict)
    every_steps: int = 0
    batch_size: int = 0

    def to_proto(self) -> pb.Evaluation:
        return pb.Evaluation(
            dataset_id=self.dataset_id,
            feeds=dict(self.feeds),
            metrics=[self.metrics] if isinstance(self.metrics, str) else list(self.metrics),
            every_steps=self.every_steps,
            batch_size=self.batch_size,
        )


@dataclass(frozen=True)
class JobInfo:
    """What the server knows about a job (chainrule.v1.Job)."""

    job_id: str
    graph_id: str
    dataset_id: str
    state: JobState
    step: int
    total_steps: int
    epoch: int
    loss: float
    metrics: dict[str, float]
    error: str
    create_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    spec: pb.JobSpec = field(repr=False)
    worker: str = ""
    """The server running the job (host:port of its gRPC address), or that ran it last; empty before any has."""
    resumes: int = 0
    """How many times the job was taken up again from its last commit (a server restarted or died, replicas lost)."""
    status_message: str = ""
    """What keeps the job from going on while it has not ended (a server with Ray, its cluster's
    CPUs); empty otherwise."""

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def replicas(self) -> int:
        """Data-parallel replicas computing each step (spec.replicas; unset means 1)."""
        return self.spec.replicas or 1

    @classmethod
    def from_proto(cls, message: pb.Job) -> JobInfo:
        def moment(name: str) -> datetime | None:
            return getattr(message, name).ToDatetime(UTC) if message.HasField(name) else None  # type: ignore[arg-type]

        return cls(
            job_id=message.job_id,
            graph_id=message.spec.graph_id,
            dataset_id=message.spec.dataset_id,
            state=state_name(message.state),
            step=message.step,
            total_steps=message.total_steps,
            epoch=message.epoch,
            loss=message.loss,
            metrics=dict(message.metrics),
            error=message.error,
            create_time=moment("create_time"),
            start_time=moment("start_time"),
            end_time=moment("end_time"),
            spec=message.spec,
            worker=message.worker,
            resumes=message.resumes,
            status_message=message.status_message,
        )


@dataclass(frozen=True)
class JobEvent:
    """One event of a watch: a step (`state` None) with its epoch, loss, learning rate and, on
    evaluation steps, metrics; or a change of state (`state` set, the rest zero)."""

    step: int = 0
    epoch: int = 0
    loss: float = 0.0
    learning_rate: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    state: JobState | None = None

    @classmethod
    def from_proto(cls, message: pb.JobEvent) -> JobEvent:
        if message.state:
            return cls(state=state_name(message.state))
        return cls(message.step, message.epoch, message.loss, message.learning_rate, dict(message.metrics))


class JobFailed(Exception):
    """`Job.wait` found the job FAILED; `info.error` says at which step and why."""

    def __init__(self, info: JobInfo) -> None:
        super().__init__(f"job {info.job_id} failed: {info.error}")
        self.info = info


class JobWatch(Iterator[JobEvent]):
    """The events of a WatchJob stream; `cancel()` (or leaving its `with` block) ends it quietly."""

    def __init__(self, call: grpc.CallIterator[pb.JobEvent]) -> None:
        self._call = call
        self._responses = iter(call)
        self._cancelled = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> JobEvent:
        try:
            return JobEvent.from_proto(next(self._responses))
        except grpc.RpcError as error:
            if self._cancelled and error.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc_error(error) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel unannotated

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.cancel()


class Job:
    """A handle on a job running on the server: nothing runs on the client, so a script may end,
    or lose its connection, while the job goes on; `Client.get_job` makes a new handle."""

    def __init__(self, stub: job_service_pb2_grpc.JobServiceStub, job_id: str, timeout: float | None = None) -> None:
        self._stub = stub
        self.job_id = job_id
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"

    def info(self) -> JobInfo:
        with rpc_errors():
            return JobInfo.from_proto(self._stub.GetJob(pb.GetJobRequest(job_id=self.job_id), timeout=self.timeout))

    def cancel(self) -> JobInfo:
        """Ask the job to stop: a queued one ends CANCELLED at once, a running one after its current step."""
        request = pb.CancelJobRequest(job_id=self.job_id)
        with rpc_errors():
            return JobInfo.from_proto(self._stub.CancelJob(request, timeout=self.timeout))

    def watch(self, from_step: int = 0) -> JobWatch:
        """The job's events: its state, each step from `from_step` on (the history first), and each
        change of state, until the job ends (see chainrule.v1.JobEvent)."""
        return JobWatch(self._stub.WatchJob(pb.WatchJobRequest(job_id=self.job_id, from_step=from_step)))

    def wait(self, *, progress: bool | None = None, raise_on_failure: bool = True) -> JobInfo:
        """Follow the job to its end and return how it ended; raise JobFailed if it failed (unless
        `raise_on_failure` is False). `progress` None shows a progress bar (epoch, step, loss,
        metrics, steps/s) only when stderr is a terminal. A dropped connection or a server restart
        is survived: the watch starts again where it stopped."""
        info = self.info()
        show = sys.stderr.isatty() if progress is None else progress
        with tqdm(total=info.total_steps, initial=info.step, disable=not show, unit="step", dynamic_ncols=True) as bar:
            self._follow(info.step + 1, _Progress(bar, info).show)
        info = self.info()
        if info.state == "failed" and raise_on_failure:
            raise JobFailed(info)
        return info

    def _follow(self, from_step: int, on_event: Callable[[JobEvent], None]) -> None:
        """Watch to the end, watching again after UNAVAILABLE (a restarting server) from the next step."""
        while True:
            try:
                with self.watch(from_step) as events:
                    for event in events:
                        on_event(event)
                        if event.state is None:
                            from_step = event.step + 1
                return
            except ChainruleError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(1.0)

    def history(self) -> History:
        """The steps so far (every step, for a job that has ended), as `Client.fit` returns them:
        plot it with `History.plot`, which also draws the metrics."""
        history = History()
        last = self.info().step
        if last == 0:
            return history
        with self.watch() as events:
            for event in events:
                if event.state is None:
                    history.record_event(event.step, event.loss, event.learning_rate, event.metrics)
                    if event.step >= last:
                        break
        return history


class _Progress:
    """Job.wait's bar: the state as its description; the epoch, the loss and the latest value of
    each metric (evaluations come every few steps, and stay shown until the next) as its suffix."""

    def __init__(self, bar: tqdm, info: JobInfo) -> None:
        self.bar = bar
        self.epoch, self.loss, self.metrics = info.epoch, info.loss, dict(info.metrics)
        bar.set_description(info.state)
        if info.step:
            self._suffix()

    def show(self, event: JobEvent) -> None:
        if event.state is not None:
            self.bar.set_description(event.state)
            return
        self.epoch, self.loss = event.epoch, event.loss
        self.metrics.update(event.metrics)
        self.bar.update(event.step - self.bar.n)
        self._suffix()

    def _suffix(self) -> None:
        shown = {"epoch": self.epoch, "loss": f"{self.loss:.4g}"}
        shown.update({name: f"{value:.4g}" for name, value in self.metrics.items()})
        self.bar.set_postfix(shown, refresh=False)


def job_spec(
    graph_id: str,
    dataset_id: str,
    *,
    loss: str,
    optimizer: Optimizer,
    feeds: Mapping[str, str],
    batch_size: int,
    epochs: int = 0,
    max_steps: int = 0,
    parameters: Sequence[str] = (),
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    evaluation: Evaluation | None = None,
    checkpoint_every: int = 0,
    stop_on_non_finite_loss: bool = False,
    schedule: Schedule | None = None,
    replicas: int = 1,
) -> pb.JobSpec:
    return pb.JobSpec(
        graph_id=graph_id,
        loss=loss,
        optimizer=optimizer.to_proto(),
        parameters=[parameters] if isinstance(parameters, str) else list(parameters),
        dataset_id=dataset_id,
        feeds=dict(feeds),
        batch_size=batch_size,
        epochs=epochs,
        max_steps=max_steps,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        evaluation=None if evaluation is None else evaluation.to_proto(),
        checkpoint_every=checkpoint_every,
        stop_on_non_finite_loss=stop_on_non_finite_loss,
        schedule=None if schedule is None else schedule.to_proto(),
        replicas=replicas,
    )


def job_stub(channel: grpc.Channel) -> job_service_pb2_grpc.JobServiceStub:
    return job_service_pb2_grpc.JobServiceStub(channel)


def create_job(stub: job_service_pb2_grpc.JobServiceStub, spec: pb.JobSpec, timeout: float | None) -> Job:
    with rpc_errors():
        created = stub.CreateJob(pb.CreateJobRequest(spec=spec), timeout=timeout)
    return Job(stub, created.job_id, timeout)


def list_jobs(
    stub: job_service_pb2_grpc.JobServiceStub,
    states: Sequence[JobState],
    graph_id: str,
    page_size: int,
    timeout: float | None,
) -> list[JobInfo]:
    jobs: list[JobInfo] = []
    token = ""
    while True:
        page, token = list_jobs_page(stub, page_size, token, states, graph_id, timeout)
        jobs.extend(page)
        if not token:
            return jobs


def list_jobs_page(
    stub: job_service_pb2_grpc.JobServiceStub,
    page_size: int,
    page_token: str,
    states: Sequence[JobState],
    graph_id: str,
    timeout: float | None,
) -> tuple[list[JobInfo], str]:
    request = pb.ListJobsRequest(
        page_size=page_size, page_token=page_token, states=[state_value(state) for state in states], graph_id=graph_id
    )
    with rpc_errors():
        response = stub.ListJobs(request, timeout=timeout)
    return [JobInfo.from_proto(message) for message in response.jobs], response.next_page_token
