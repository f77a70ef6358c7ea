"""The JobService servicer: decodes requests, calls the job manager, encodes answers.

Every RPC's behaviour is here, one method each; the jobs themselves are in `chainrule.server.jobs`.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from chainrule.server.errors import InvalidArgument
from chainrule.server.jobs import JobManager, WatchItem
from chainrule.server.service.calls import Call, CallGate, Servicer, unary, watching
from chainrule.server.store.base import ENDED_JOB_STATES, JOB_STATES, JobEventRow, StoredJob
from chainrule.v1 import job_service_pb2 as pb
from chainrule.v1 import job_service_pb2_grpc

STATE_PREFIX = "JOB_STATE_"


def job_state(state: str) -> pb.JobState.ValueType:
    return pb.JobState.Value(STATE_PREFIX + state)


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def job_message(job: StoredJob) -> pb.Job:
    return pb.Job(
        job_id=job.job_id,
        spec=pb.JobSpec.FromString(job.spec),
        state=job_state(job.state),
        step=job.step,
        total_steps=job.total_steps,
        epoch=job.epoch,
        loss=job.loss,
        metrics=job.metrics,
        error=job.error,
        create_time=_timestamp(job.created_at),
        start_time=_timestamp(job.started_at),
        end_time=_timestamp(job.ended_at),
        worker=job.worker,
        resumes=job.resumes,
        status_message="" if job.state in ENDED_JOB_STATES else job.status_message,
    )


def event_message(item: WatchItem) -> pb.JobEvent:
    if isinstance(item, str):
        return pb.JobEvent(state=job_state(item))
    return pb.JobEvent(
        step=item.step, epoch=item.epoch, loss=item.loss, metrics=item.metrics, learning_rate=item.learning_rate
    )


STATE_EVENTS = {state: event_message(state).SerializeToString() for state in JOB_STATES}


def encoded_event(item: WatchItem) -> bytes:
    """The JobEvent as WatchJob sends it: the job manager encodes each step once for all its watchers."""
    if isinstance(item, JobEventRow):
        return event_message(item).SerializeToString()
    return STATE_EVENTS[item]


def state_names(states: Iterator[int] | list[int]) -> tuple[str, ...]:
    names = []
    for index, state in enumerate(states):
        name = pb.JobState.Name(state).removeprefix(STATE_PREFIX) if state in pb.JobState.values() else ""
        if name not in JOB_STATES:
            raise InvalidArgument(
                f"states[{index}] is {name or state}; use JOB_STATE_QUEUED, RUNNING, SUCCEEDED, FAILED or CANCELLED",
                reason="BAD_STATE",
                subject=f"states[{index}]",
            )
        names.append(name)
    return tuple(names)


class JobService(Servicer, job_service_pb2_grpc.JobServiceServicer):
    """Training jobs: create, read, cancel, watch."""

    def __init__(self, jobs: JobManager, calls: CallGate) -> None:
        super().__init__(calls)
        self.jobs = jobs

    @unary
    def CreateJob(self, request: pb.CreateJobRequest, context: grpc.ServicerContext, call: Call) -> pb.Job:
        with self.computing(call):  # compiles the graph when it is not live
            return job_message(self.jobs.create(request.spec, call.tenant))

    @unary
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext, call: Call) -> pb.Job:
        return job_message(self.jobs.get(request.job_id, call.tenant))

    @unary
    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext, call: Call) -> pb.ListJobsResponse:
        jobs, next_token = self.jobs.list(
            request.page_size, request.page_token, call.tenant, state_names(list(request.states)), request.graph_id
        )
        return pb.ListJobsResponse(jobs=[job_message(job) for job in jobs], next_page_token=next_token)

    @unary
    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext, call: Call) -> pb.Job:
        return job_message(self.jobs.cancel(request.job_id, call.tenant))

    @watching
    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext, call: Call) -> Iterator[bytes]:
        """Runs on the watchers' own thread pool (see RunningServer), its events serialized already."""
        if request.from_step < 0:
            raise InvalidArgument(
                f"from_step is {request.from_step}; it must not be negative", reason="BAD_STEP", subject="from_step"
            )
        yield from self.jobs.watch(request.job_id, encoded_event, call.tenant, request.from_step, call.stop)
