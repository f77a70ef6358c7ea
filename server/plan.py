"""A stored graph compiled once into a flat plan over integer slots, and its forward and reverse passes.

Slots follow the graph's topological order, so the forward pass walks them upwards and the
reverse pass downwards: when the reverse walk reaches a slot, every consumer of that slot has
already sent its contribution, so the slot's gradient (the sum over all paths) is final.
Contributions are summed out of place, so no gradient a VJP returned is ever modified.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from chainrule.server.errors import Cancelled, InvalidArgument
from chainrule.server.ops import OPS
from chainrule.server.shapes import TensorType, describe

Array = np.ndarray


class StopFlag:
    """Set from another thread (a cancelled RPC) to stop a running pass between two steps."""

    stopped = False


@dataclass(frozen=True)
class Step:
    """One non-source node: its forward function and one VJP per argument, attrs already bound."""

    forward: Callable[..., Array]
    args: tuple[int, ...]
    vjps: tuple[Callable[..., Array], ...]


@dataclass(frozen=True)
class Source:
    op: str
    type: TensorType
    value: Array | None


def _bind(function: Callable[..., Array], attrs: Mapping[str, object]) -> Callable[..., Array]:
    return functools.partial(function, **attrs) if attrs else function


class Plan:
    def __init__(self, graph: nx.DiGraph) -> None:
        self.names: list[str] = list(graph.graph["order"])
        self.slot_of: dict[str, int] = {name: slot for slot, name in enumerate(self.names)}
        self.ops: list[str] = []
        self.steps: list[Step | None] = []
        self.sources: dict[int, Source] = {}
        for slot, name in enumerate(self.names):
            node = graph.nodes[name]
            op = OPS[node["op"]]
            self.ops.append(op.name)
            if op.forward is None:
                self.sources[slot] = Source(op.name, node["type"], node["value"])
                self.steps.append(None)
                continue
            attrs = node["attrs"]
            self.steps.append(
                Step(
                    _bind(op.forward, attrs),
                    tuple(self.slot_of[a] for a in node["inputs"]),
                    tuple(_bind(vjp, attrs) for vjp in op.vjps),
                )
            )
        self.inputs = {self.names[s]: s for s, src in self.sources.items() if src.op == "input"}
        self.parameters = {self.names[s]: s for s, src in self.sources.items() if src.op == "parameter"}

    # ------------------------------------------------------------ lookups
    def slot(self, name: str, role: str) -> int:
        slot = self.slot_of.get(name)
        if slot is None:
            raise InvalidArgument(f"{role} '{name}' names no node of the graph", reason="UNKNOWN_NODE", subject=name)
        return slot

    def needed(self, targets: Sequence[int]) -> list[int]:
        """The targets and every slot they depend on, in topological order."""
        seen = set(targets)
        stack = list(targets)
        while stack:
            step = self.steps[stack.pop()]
            if step is not None:
                for argument in step.args:
                    if argument not in seen:
                        seen.add(argument)
                        stack.append(argument)
        return sorted(seen)

    # ------------------------------------------------------------ passes
    def forward(
        self,
        feeds: Mapping[str, Array],
        parameters: Mapping[str, Array],
        fetches: Sequence[str],
        stop: StopFlag | None = None,
    ) -> list[Array]:
        slots = [self.slot(name, "fetch") for name in fetches]
        values = self._evaluate(self.needed(slots), feeds, parameters, stop)
        return [values[slot] for slot in slots]

    def backward(
        self,
        feeds: Mapping[str, Array],
        parameters: Mapping[str, Array],
        loss: str,
        wrt: Sequence[str],
        loss_grad: Array | None = None,
        stop: StopFlag | None = None,
    ) -> tuple[Array, Iterator[tuple[str, Array]]]:
        """Run the forward pass now; return the loss value and a lazy reverse pass.

        The iterator yields (name, gradient) for every `wrt` node in reverse topological order,
        each as soon as it is final, releasing values and gradients it no longer needs.
        """
        loss_slot = self.slot(loss, "loss")
        wrt_slots = [self.slot(name, "wrt") for name in wrt]
        if len(set(wrt_slots)) != len(wrt_slots):
            repeated = next(name for name in wrt if list(wrt).count(name) > 1)
            raise InvalidArgument(f"wrt names '{repeated}' more than once", reason="DUPLICATE_WRT", subject=repeated)
        order = self.needed([loss_slot, *wrt_slots])
        values = self._evaluate(order, feeds, parameters, stop)
        for slot in wrt_slots:
            if not np.issubdtype(np.asarray(values[slot]).dtype, np.floating):
                name = self.names[slot]
                raise InvalidArgument(
                    f"wrt '{name}' has dtype {np.asarray(values[slot]).dtype}; gradients exist for float nodes only",
                    reason="NOT_DIFFERENTIABLE",
                    subject=name,
                )
        seed = self._seed(loss, np.asarray(values[loss_slot]), loss_grad)
        return values[loss_slot], self._reverse(order, values, loss_slot, seed, wrt_slots, stop)

    def _seed(self, loss: str, value: Array, loss_grad: Array | None) -> Array:
        if not np.issubdtype(value.dtype, np.floating):
            raise InvalidArgument(
                f"loss '{loss}' has dtype {value.dtype}; only a float node can be differentiated",
                reason="NOT_DIFFERENTIABLE",
                subject=loss,
            )
        if loss_grad is None:
            if value.shape != ():
                raise InvalidArgument(
                    f"loss '{loss}' has shape {list(value.shape)}; a loss must be a scalar unless loss_grad is given",
                    reason="SHAPE_MISMATCH",
                    subject=loss,
                )
            return np.ones((), dtype=value.dtype)
        if loss_grad.shape != value.shape:
            raise InvalidArgument(
                f"loss_grad has shape {list(loss_grad.shape)}; loss '{loss}' has shape {list(value.shape)}",
                reason="SHAPE_MISMATCH",
                subject="loss_grad",
            )
        return loss_grad.astype(value.dtype, copy=False)

    def _evaluate(
        self, order: list[int], feeds: Mapping[str, Array], parameters: Mapping[str, Array], stop: StopFlag | None
    ) -> list[Array | None]:
        values: list[Array | None] = [None] * len(self.names)
        steps = self.steps
        with np.errstate(all="ignore"):
            for slot in order:
                if stop is not None and stop.stopped:
                    raise Cancelled("the request was cancelled", reason="CANCELLED")
                step = steps[slot]
                if step is None:
                    values[slot] = self._source_value(slot, feeds, parameters)
                    continue
                try:
                    values[slot] = step.forward(*[values[argument] for argument in step.args])
                except (ValueError, TypeError, IndexError, np.exceptions.AxisError) as error:
                    raise self._node_error(slot, error) from None
        return values

    def _source_value(self, slot: int, feeds: Mapping[str, Array], parameters: Mapping[str, Array]) -> Array:
        source = self.sources[slot]
        name = self.names[slot]
        if source.op == "constant":
            assert source.value is not None
            return source.value
        if source.op == "parameter":
            return parameters[name]
        fed = feeds.get(name)
        if fed is None:
            raise InvalidArgument(f"input '{name}' is needed but was not fed", reason="MISSING_FEED", subject=name)
        return fed

    def check_feeds(self, feeds: Mapping[str, Array]) -> None:
        """Refuse feeds that name no input, or whose dtype or shape the input does not declare."""
        for name, value in feeds.items():
            slot = self.inputs.get(name)
            if slot is None:
                why = "is not an input node" if name in self.slot_of else "names no node of the graph"
                raise InvalidArgument(f"feed '{name}' {why}", reason="UNKNOWN_FEED", subject=name)
            declared = self.sources[slot].type
            if declared.dtype is not None and value.dtype != declared.dtype:
                raise InvalidArgument(
                    f"feed '{name}' has dtype {value.dtype}; input '{name}' declares {declared.dtype}",
                    reason="DTYPE_MISMATCH",
                    subject=name,
                )
            shape = declared.shape
            if shape is not None and (
                len(shape) != value.ndim
                or any(d is not None and d != n for d, n in zip(shape, value.shape, strict=True))
            ):
                raise InvalidArgument(
                    f"feed '{name}' has shape {list(value.shape)}; input '{name}' declares {describe(shape)}",
                    reason="SHAPE_MISMATCH",
                    subject=name,
                )

    def _node_error(self, slot: int, error: Exception) -> InvalidArgument:
        name = self.names[slot]
        return InvalidArgument(f"node '{name}' ({self.ops[slot]}): {error}", reason="SHAPE_MISMATCH", subject=name)

    def _reverse(
        self,
        order: list[int],
        values: list[Array | None],
        loss_slot: int,
        seed: Array,
        wrt_slots: list[int],
        stop: StopFlag | None,
    ) -> Iterator[tuple[str, Array]]:
        requires_grad = self._requires_grad(order, wrt_slots)
        grads: list[Array | None] = [None] * len(self.names)
        grads[loss_slot] = seed
        wanted = set(wrt_slots)
        steps = self.steps
        with np.errstate(all="ignore"):
            for slot in reversed(order):
                if not wanted:
                    return
                if stop is not None and stop.stopped:
                    raise Cancelled("the request was cancelled", reason="CANCELLED")
                grad = grads[slot]
                ans = values[slot]
                if slot in wanted:
                    wanted.discard(slot)
                    yield self.names[slot], np.zeros_like(ans) if grad is None else grad
                step = steps[slot]
                if grad is not None and step is not None:
                    arguments = [values[argument] for argument in step.args]
                    for vjp, argument in zip(step.vjps, step.args, strict=True):
                        if not requires_grad[argument]:
                            continue
                        contribution = vjp(grad, ans, *arguments)
                        target = values[argument]
                        if contribution.dtype != target.dtype:  # type: ignore[union-attr]
                            contribution = contribution.astype(target.dtype)  # type: ignore[union-attr]
                        previous = grads[argument]
                        grads[argument] = contribution if previous is None else previous + contribution
                grads[slot] = None
                values[slot] = None

    def _requires_grad(self, order: list[int], wrt_slots: list[int]) -> list[bool]:
        """A slot needs a gradient when it is a wrt node or depends on one through float values."""
        requires = [False] * len(self.names)
        for slot in wrt_slots:
            requires[slot] = True
        for slot in order:
            step = self.steps[slot]
            if step is not None and not requires[slot] and any(requires[a] for a in step.args):
                requires[slot] = True
        return requires
