"""A JobSpec decoded and checked: what the spec alone tells (with its datasets' sizes), then what the
graph tells, both before a job is queued; and the batches of each step, which depend on nothing but
the plan and the step (see the package's docstring)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from chainrule.server import optim
from chainrule.server.errors import InvalidArgument, shown
from chainrule.server.jobs.replicas import check_replicable
from chainrule.server.plan import Plan
from chainrule.server.shapes import describe
from chainrule.server.specs import Schedule, optimizer_from_proto, schedule_from_proto
from chainrule.server.store.base import StoredDataset
from chainrule.v1 import job_service_pb2 as pb

MAX_TOTAL_STEPS = 2**62
"""Beyond this a job's step count would not fit the store's and the wire's 64-bit integers."""
MAX_REPLICAS = 1024
"""The most replicas a job may have: each is an actor and a shard of every step, gathered by one driver."""


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
    replicas: int = 1
    """Data-parallel replicas of the graph computing each step (see replicas.py)."""

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


def invalid(message: str, subject: str, reason: str = "BAD_JOB_SPEC") -> InvalidArgument:
    return InvalidArgument(message, reason=reason, subject=subject)


def plan_job(spec: pb.JobSpec, train: StoredDataset, evaluation: StoredDataset | None, default_every: int) -> JobPlan:
    """Check what the spec alone can tell (with its datasets' sizes) and work out its steps."""
    if not spec.loss:
        raise invalid("spec.loss is empty; name the scalar node to minimize", "spec.loss")
    optimizer = optimizer_from_proto(spec.optimizer)
    try:
        optim.validate(optimizer)
    except ValueError as error:
        raise invalid(f"spec.optimizer: {error}", "spec.optimizer", "BAD_OPTIMIZER") from None
    schedule = schedule_from_proto(spec.schedule, optimizer)
    if len(set(spec.parameters)) != len(spec.parameters):
        raise invalid("spec.parameters names a parameter more than once", "spec.parameters")
    for field in ("batch_size", "epochs", "max_steps", "checkpoint_every"):
        value = getattr(spec, field)
        if value < 0:
            raise invalid(f"spec.{field} is {value}; it must not be negative", f"spec.{field}")
    if spec.batch_size == 0:
        raise invalid("spec.batch_size is 0; batches need at least one example", "spec.batch_size")
    if not spec.feeds:
        raise invalid("spec.feeds is empty; map the graph's inputs to columns of the dataset", "spec.feeds")
    count, size = train.num_examples, spec.batch_size
    replicas = spec.replicas or 1
    most = min(size, count or size, MAX_REPLICAS)  # no examples at all is refused below, as such
    if not 1 <= replicas <= most:
        if most == MAX_REPLICAS:
            why = "the most a job may have"
        elif most == size:
            why = "batch_size"
        else:
            why = f"the examples of dataset '{shown(train.dataset_id)}', its whole batch"
        raise invalid(
            f"spec.replicas is {spec.replicas}; it must be from 1 to {most} ({why}): each replica computes a shard "
            "of every batch",
            "spec.replicas",
        )
    batches = count // size if spec.drop_last else -(-count // size)
    if batches == 0:
        why = f"fewer than batch_size {size} with drop_last" if count else "none"
        raise invalid(
            f"dataset '{shown(train.dataset_id)}' has {count} examples, {why}: an epoch would have no batch",
            "spec.batch_size",
        )
    epochs = spec.epochs or (0 if spec.max_steps else 1)
    totals = [limit for limit in (epochs * batches, spec.max_steps) if limit]
    total = min(totals)
    if total >= MAX_TOTAL_STEPS:
        raise invalid(f"the spec implies {total:,} steps, more than the {MAX_TOTAL_STEPS:,} a job can take", "spec")
    plan_evaluation = None
    if spec.HasField("evaluation"):
        message = spec.evaluation
        if not message.metrics:
            raise invalid("spec.evaluation.metrics is empty; name at least one scalar node", "spec.evaluation.metrics")
        if len(set(message.metrics)) != len(message.metrics):
            raise invalid("spec.evaluation.metrics names a node more than once", "spec.evaluation.metrics")
        for field in ("every_steps", "batch_size"):
            value = getattr(message, field)
            if value < 0:
                raise invalid(
                    f"spec.evaluation.{field} is {value}; it must not be negative", f"spec.evaluation.{field}"
                )
        assert evaluation is not None
        if evaluation.num_examples == 0:
            raise invalid(
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
        replicas=replicas,
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
        raise invalid(f"graph '{graph_id}' has no parameters to train", "spec.parameters", "UNKNOWN_PARAMETER")
    for name in names:
        if name not in graph.parameters:
            kind = "a state node (running statistics), never trained" if name in graph.state else "not a parameter"
            if name not in graph.slot_of:
                kind = "no node of the graph"
            raise invalid(f"spec.parameters names '{shown(name)}', {kind}", name, "UNKNOWN_PARAMETER")
    _check_feeds(graph, job.feeds, train, [loss], "spec.feeds", "the loss")
    _check_batch_dimension(graph, job.feeds, job.batch_size, job.num_examples, job.drop_last, "spec.feeds")
    check_replicable(graph, job.loss, job.feeds, job.replicas)
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
        raise invalid(f"{field}: {role} '{shown(name)}' names no node of the graph", name, "UNKNOWN_NODE")
    return slot


def _check_scalar(graph: Plan, slot: int, name: str, field: str, role: str) -> None:
    shape = graph.types[slot].shape
    if shape is not None and shape != () and all(dim is not None for dim in shape):
        raise invalid(
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
            raise invalid(f"{field}: '{shown(name)}' {why}", name, "UNKNOWN_FEED")
        column = columns.get(column_name)
        if column is None:
            have = ", ".join(f"'{shown(c)}'" for c in columns)
            raise invalid(
                f"{field}: input '{shown(name)}' is fed column '{shown(column_name)}', which dataset "
                f"'{shown(dataset.dataset_id)}' does not have (it has {have})",
                column_name,
                "UNKNOWN_COLUMN",
            )
        declared = graph.sources[slot].type
        dtype = np.dtype(column.dtype)
        if declared.dtype is not None and dtype != declared.dtype:
            raise invalid(
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
            raise invalid(
                f"{field}: column '{shown(column_name)}' has examples of shape {example}, so it feeds batches of "
                f"shape {batches}; input '{shown(name)}' declares {describe(shape)}",
                name,
                "SHAPE_MISMATCH",
            )
    needed = [graph.names[slot] for slot in graph.needed(targets) if slot in graph.sources]
    missing = [name for name in needed if name in graph.inputs and name not in feeds]
    if missing:
        raise invalid(
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
            raise invalid(
                f"{field}: input '{shown(name)}' declares a first dimension of {shape[0]}, but batches of "
                f"{' and '.join(map(str, sorted(sizes)))} examples would feed it",
                name,
                "SHAPE_MISMATCH",
            )
