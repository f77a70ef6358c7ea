"""Data parallelism without Ray: how a step's batch splits into shards, what a replica computes on
its shard, and how the shards' results combine into the step the whole batch would have taken.

The combination is exact in arithmetic because it follows the loss's own reduction. A mean loss
(softmax_cross_entropy, sigmoid_cross_entropy, a mean over every axis) divides a sum over its
rows by their count, so the batch's loss and gradients are the shards' weighted by the rows each
one averaged over: `sum_i w_i * g_i / sum_i w_i`, with `w_i` the shard's examples, or, for
softmax_cross_entropy with class labels, its rows not labelled `ignore_index`. A sum loss adds
the shards' up. Anything else at the top of the loss (a sum of two means, a max, a norm) has no
such rule, and a job with replicas refuses it up front. The rule assumes what data-parallel
training always assumes: each example reaches the loss through its own rows, except for
batch_norm's batch statistics, which each replica computes over its own shard (as PyTorch's
DistributedDataParallel without SyncBatchNorm), its running statistics being replica 0's.

Nothing here imports Ray: the checks run when a job is created, on any server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from chainrule.server.errors import InvalidArgument, shown
from chainrule.server.ops import Mode
from chainrule.server.plan import Plan

Array = np.ndarray
MEAN_LOSSES = ("softmax_cross_entropy", "sigmoid_cross_entropy")
"""Ops whose value is a mean over their rows, whatever their attrs."""


@dataclass(frozen=True)
class Reduction:
    """How a loss reduces over the batch, as replicas need to know it."""

    mean: bool
    """True: shards weigh by the rows they average over; False: a sum, shards add up."""
    labels: str | None = None
    """softmax_cross_entropy's labels node: with class labels, rows labelled `ignore_index` do not count."""
    ignore_index: int = -100


@dataclass(frozen=True)
class ShardResult:
    """What one replica computed on its shard."""

    loss: float
    weight: float
    """The rows the shard's mean averaged over (1 for a sum loss)."""
    gradients: dict[str, Array]
    state_updates: dict[str, Array]


def loss_reduction(graph: Plan, loss: str) -> Reduction:
    """The reduction of `loss` over the batch, or INVALID_ARGUMENT naming the loss when it has none
    replicas can combine exactly."""
    slot = graph.slot_of[loss]
    op, attrs, args = graph.ops[slot], graph.attrs[slot], graph.args[slot]
    if op == "softmax_cross_entropy":
        return Reduction(True, graph.names[args[1]], int(attrs.get("ignore_index", -100)))
    if op == "sigmoid_cross_entropy":
        return Reduction(True)
    if op == "mean" and len(args) == 1 and _every_axis(graph, args[0], attrs.get("axes")):
        return Reduction(True)
    if op == "sum":
        return Reduction(False)
    raise InvalidArgument(
        f"spec.replicas: loss '{shown(loss)}' is a {op} node, whose gradients replicas cannot combine exactly; "
        "with replicas > 1 the loss must be softmax_cross_entropy, sigmoid_cross_entropy, a mean over every "
        "axis, or a sum (add a regularizer inside the mean, not beside it)",
        reason="BAD_JOB_SPEC",
        subject=loss,
    )


def _every_axis(graph: Plan, argument: int, axes: Sequence[int] | None) -> bool:
    if axes is None:
        return True
    shape = graph.types[argument].shape
    return shape is not None and {axis % len(shape) for axis in axes} == set(range(len(shape)))


def check_replicable(graph: Plan, loss: str, feeds: Mapping[str, str], replicas: int) -> None:
    """What a job with `replicas` > 1 needs of its graph: a loss replicas can combine, and inputs
    that take batches of any size (shards differ in size)."""
    if replicas <= 1:
        return
    loss_reduction(graph, loss)
    for name in feeds:
        shape = graph.sources[graph.inputs[name]].type.shape
        if shape and shape[0] is not None:
            raise InvalidArgument(
                f"spec.replicas: input '{shown(name)}' declares a first dimension of {shape[0]}, but each of the "
                f"{replicas} replicas takes a shard of the batch; declare the batch dimension unknown",
                reason="SHAPE_MISMATCH",
                subject=name,
            )


def split_rows(rows: slice | Array, replicas: int) -> list[slice | Array]:
    """The batch's rows in `replicas` contiguous shards, the first `len % replicas` one example
    larger (numpy's array_split); a shard may be empty when the batch is smaller than `replicas`."""
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(rows.stop)
        count = stop - start
    else:
        start, count = 0, len(rows)
    size, larger = divmod(count, replicas)
    shards: list[slice | Array] = []
    for index in range(replicas):
        begin = start + index * size + min(index, larger)
        end = begin + size + (index < larger)
        shards.append(slice(begin, end) if isinstance(rows, slice) else rows[begin - start : end - start])
    return shards


def replica_seed(seed: int, replica: int) -> int:
    """Dropout's seed on `replica`: the job's own on replica 0 (one replica draws what an in-process
    job draws), one derived from (seed, replica) on the others, so every replica draws its own masks
    and a run draws the same ones again."""
    if replica == 0:
        return seed
    return int(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, replica]).generate_state(1, np.uint64)[0])


def compute_shard(
    graph: Plan,
    parameters: Mapping[str, Array],
    feeds: Mapping[str, Array],
    loss: str,
    names: Sequence[str],
    reduction: Reduction,
    mode: Mode,
) -> ShardResult:
    """A replica's part of a training step: its shard's loss, gradients and state updates (as
    TrainingSession.step computes them for a whole batch) and the weight of its mean."""
    graph.check_feeds(feeds)
    state_updates: dict[str, Array] = {}
    loss_value, reverse = graph.backward(feeds, parameters, loss, list(names), None, None, mode, state_updates)
    gradients = dict(reverse)
    return ShardResult(float(loss_value), _weight(graph, parameters, feeds, reduction, mode), gradients, state_updates)


def _weight(
    graph: Plan, parameters: Mapping[str, Array], feeds: Mapping[str, Array], reduction: Reduction, mode: Mode
) -> float:
    if not reduction.mean:
        return 1.0
    if reduction.labels is not None:
        labels = feeds.get(reduction.labels)
        if labels is None:  # computed from the inputs: evaluate just that node and what it needs
            labels = graph.forward(feeds, parameters, [reduction.labels], None, mode)[0]
        if labels.dtype.kind in "iu":
            return float(np.count_nonzero(labels != reduction.ignore_index))
    return float(len(next(iter(feeds.values()))))


def combine(shards: Sequence[ShardResult], reduction: Reduction) -> tuple[float, dict[str, Array], dict[str, Array]]:
    """The batch's loss, gradients and state updates from its shards' results, in shard order: a
    fixed order of summation, so a run combines the same bits every time. A mean weighs each shard
    by its rows; shards that averaged over none (every row ignored) are left out unless all did,
    when the result is what one replica computes then: NaN."""
    if reduction.mean:
        total = sum(shard.weight for shard in shards)
        used = [shard for shard in shards if shard.weight > 0] if total > 0 else list(shards)
        factors = [shard.weight / total for shard in used] if total > 0 else [1.0 / len(used)] * len(used)
    else:
        used, factors = list(shards), [1.0] * len(shards)
    loss = sum(factor * shard.loss for factor, shard in zip(factors, used, strict=True))
    gradients: dict[str, Array] = {}
    for name in used[0].gradients:
        total_gradient = None
        for factor, shard in zip(factors, used, strict=True):
            part = shard.gradients[name] if factor == 1.0 else shard.gradients[name] * factor
            total_gradient = part if total_gradient is None else total_gradient + part
        assert total_gradient is not None
        gradients[name] = total_gradient.astype(used[0].gradients[name].dtype, copy=False)
    return float(loss), gradients, dict(shards[0].state_updates)
