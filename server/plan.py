"""A stored graph compiled once into a flat plan over integer slots, and its forward and reverse passes.

Slots follow the graph's topological order, so the forward pass walks them upwards and the
reverse pass downwards: when the reverse walk reaches a slot, every consumer of that slot has
already sent its contribution, so the slot's gradient (the sum over all paths) is final.
Contributions are summed out of place, so no gradient a VJP returned is ever modified.

What a request runs depends only on its targets (fetches, or loss and wrt), so that part is
worked out once per kind of request and cached as a `Schedule`: the slots to evaluate, the
values to release once the forward pass is done with them, and the reverse steps with only
the VJPs whose argument needs a gradient.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from chainrule.server.errors import Cancelled, InvalidArgument, NonScalarLoss, ResourceExhausted
from chainrule.server.graph import infer_node
from chainrule.server.ops import ANS, INFERENCE, OPS, STORED_SOURCES, Mode, NodeContext
from chainrule.server.shapes import ShapeError, TensorType, describe

Array = np.ndarray
SCHEDULE_CACHE_SIZE = 64
NUMPY_ERRORS = (ValueError, TypeError, IndexError, ArithmeticError, np.exceptions.AxisError)
"""What numpy raises for arguments an op cannot take; reported as INVALID_ARGUMENT naming the node."""
RELEASE_MIN_BYTES = 1 << 12
"""Released values smaller than this are kept: a stand-in would cost more than it frees."""


class StopFlag:
    """Set from another thread (a cancelled RPC) to stop a running pass between two steps."""

    stopped = False


@dataclass(frozen=True)
class Step:
    """One non-source node: its forward function and one VJP per argument (None: the argument
    takes no gradient), attrs already bound."""

    forward: Callable[..., Array]
    args: tuple[int, ...]
    vjps: tuple[Callable[..., Array] | None, ...]
    reads: tuple[frozenset[int], ...]
    saves: bool
    modal: bool
    differentiable: bool
    """False when the node's value is statically an int or bool tensor: no gradient passes through it."""


@dataclass(frozen=True)
class Source:
    op: str
    type: TensorType
    value: Array | None


ForwardStep = tuple[int, Callable[..., Array], tuple[int, ...], tuple[int, ...], bool, bool]
"""(slot, forward function, argument slots, slots to release after it, whether it returns a residual to keep,
whether it is modal: takes a NodeContext)."""
ReverseStep = tuple[int, tuple[int, ...], tuple[tuple[Callable[..., Array], int], ...], bool, bool]
"""(slot, argument slots, (VJP, argument) pairs to call, whether the slot's gradient is streamed,
whether the VJPs take the op's residual in place of its value)."""
Residuals = dict[int, Array]


@dataclass(frozen=True)
class Schedule:
    targets: tuple[int, ...]
    """The fetches of a forward pass; the loss and then each wrt of a backward pass."""
    constants: tuple[tuple[int, Array | None], ...]
    parameters: tuple[tuple[int, str], ...]
    inputs: tuple[tuple[int, str], ...]
    forward: tuple[ForwardStep, ...]
    reverse: tuple[ReverseStep, ...]
    checked_feed_shapes: OrderedDict[tuple, None] = field(default_factory=OrderedDict)
    """Feed shapes whose allocation estimate already passed, so a repeated request skips it."""


def _bind(function: Callable[..., Array], attrs: Mapping[str, object]) -> Callable[..., Array]:
    return functools.partial(function, **attrs) if attrs else function


def _value_only(function: Callable[..., tuple[Array, Array]]) -> Callable[..., Array]:
    """A saving op's forward function for a pass that will not call its VJPs: the residual is dropped at once."""

    def value(*arguments: Array, **context: NodeContext) -> Array:
        return function(*arguments, **context)[0]

    return value


_ZERO_ELEMENT = bytes(16)
"""One zero element of any wire dtype, for stand-ins to view."""


def _stand_in(value: Array) -> Array:
    """Shape and dtype of a released value, for VJPs that need no more of it: a read-only,
    zero-strided view of one zero element."""
    return np.ndarray(value.shape, value.dtype, _ZERO_ELEMENT, 0, (0,) * value.ndim)


@functools.cache
def _one(dtype: np.dtype) -> Array:
    """The gradient seed of a scalar loss, shared by every request and therefore read-only."""
    one = np.ones((), dtype)
    one.flags.writeable = False
    return one


def _type_of(fed: Array | None) -> TensorType | None:
    return None if fed is None else TensorType(fed.dtype, fed.shape)


class Plan:
    def __init__(
        self,
        graph: nx.DiGraph,
        release_min_bytes: int = RELEASE_MIN_BYTES,
        max_request_bytes: int | None = None,
    ) -> None:
        self.release_min_bytes = release_min_bytes
        self.max_request_bytes = max_request_bytes
        self.names: list[str] = list(graph.graph["order"])
        self.slot_of: dict[str, int] = {name: slot for slot, name in enumerate(self.names)}
        self.ops: list[str] = []
        self.types: list[TensorType] = [graph.nodes[name]["type"] for name in self.names]
        self.attrs: list[Mapping[str, object]] = [graph.nodes[name]["attrs"] for name in self.names]
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
            count = len(node["inputs"])
            dtype = node["type"].dtype
            self.steps.append(
                Step(
                    _bind(op.forward, attrs),
                    tuple(self.slot_of[a] for a in node["inputs"]),
                    tuple(None if vjp is None else _bind(vjp, attrs) for vjp in op.vjps_for(count)),
                    op.reads_for(count),
                    op.saves,
                    op.modal,
                    dtype is None or dtype.kind == "f",
                )
            )
        self.inputs = {self.names[s]: s for s, src in self.sources.items() if src.op == "input"}
        self.parameters = {self.names[s]: s for s, src in self.sources.items() if src.op == "parameter"}
        """Trainable parameters; `state` nodes (running statistics) are kept with them but never trained."""
        self.state = {self.names[s]: s for s, src in self.sources.items() if src.op == "state"}
        self.stored = {self.names[s]: s for s, src in self.sources.items() if src.op in STORED_SOURCES}
        self._schedules: OrderedDict[tuple, Schedule] = OrderedDict()
        self._schedules_lock = threading.Lock()

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

    # ------------------------------------------------------------ schedules
    def _schedule(self, key: tuple, build: Callable[[], Schedule]) -> Schedule:
        with self._schedules_lock:
            schedule = self._schedules.get(key)
            if schedule is not None:
                self._schedules.move_to_end(key)
                return schedule
        schedule = build()
        with self._schedules_lock:
            self._schedules[key] = schedule
            if len(self._schedules) > SCHEDULE_CACHE_SIZE:
                self._schedules.popitem(last=False)
        return schedule

    def _forward_schedule(
        self, targets: tuple[int, ...], order: list[int], keep: set[int], reverse: tuple[ReverseStep, ...]
    ) -> Schedule:
        """Release each computed value that is not kept right after its last consumer has run."""
        last_consumer: dict[int, int] = {}
        for slot in order:
            step = self.steps[slot]
            if step is not None:
                for argument in step.args:
                    last_consumer[argument] = slot
        releases: dict[int, list[int]] = {}
        for value, consumer in last_consumer.items():
            if value not in keep and self.steps[value] is not None:
                releases.setdefault(consumer, []).append(value)
        residuals_used = {slot for slot, _, pairs, _, saves in reverse if saves}
        forward = []
        for slot in order:
            step = self.steps[slot]
            if step is not None:
                saves = slot in residuals_used
                function = _value_only(step.forward) if step.saves and not saves else step.forward
                forward.append((slot, function, step.args, tuple(releases.get(slot, ())), saves, step.modal))
        sources = [(slot, self.sources[slot]) for slot in order if self.steps[slot] is None]
        return Schedule(
            targets,
            constants=tuple((slot, source.value) for slot, source in sources if source.op == "constant"),
            parameters=tuple((slot, self.names[slot]) for slot, source in sources if source.op in STORED_SOURCES),
            inputs=tuple((slot, self.names[slot]) for slot, source in sources if source.op == "input"),
            forward=tuple(forward),
            reverse=reverse,
        )

    def _backward_schedule(self, loss_name: str, wrt_names: Sequence[str]) -> Schedule:
        loss = self.slot(loss_name, "loss")
        wrt = tuple(self.slot(name, "wrt") for name in wrt_names)
        if not wrt:
            raise InvalidArgument("wrt is empty and the graph has no parameters", reason="EMPTY_WRT", subject="wrt")
        if len(set(wrt)) != len(wrt):
            repeated = next(name for name in wrt_names if list(wrt_names).count(name) > 1)
            raise InvalidArgument(f"wrt names '{repeated}' more than once", reason="DUPLICATE_WRT", subject=repeated)
        order = self.needed([loss, *wrt])
        requires_grad = [False] * len(self.names)
        for slot in wrt:
            requires_grad[slot] = True
        for slot in order:
            step = self.steps[slot]
            if step is not None and not requires_grad[slot] and step.differentiable:
                requires_grad[slot] = any(
                    requires_grad[a] and vjp is not None for vjp, a in zip(step.vjps, step.args, strict=True)
                )
        feeds_loss = set(self.needed([loss]))
        wanted = set(wrt)
        lowest_wanted = min(wanted)
        keep = {loss, *wrt}
        reverse: list[ReverseStep] = []
        for slot in reversed(order):
            if slot < lowest_wanted:
                break
            if not requires_grad[slot]:
                continue
            step = self.steps[slot]
            pairs: list[tuple[Callable[..., Array], int]] = []
            if step is not None and slot in feeds_loss:
                for position, (vjp, argument) in enumerate(zip(step.vjps, step.args, strict=True)):
                    if requires_grad[argument] and vjp is not None:
                        pairs.append((vjp, argument))
                        for read in step.reads[position]:
                            keep.add(slot if read == ANS else step.args[read])
            arguments = step.args if step is not None else ()
            saves = step is not None and step.saves and bool(pairs)
            reverse.append((slot, arguments, tuple(pairs), slot in wanted, saves))
        return self._forward_schedule((loss, *wrt), order, keep, tuple(reverse))

    # ------------------------------------------------------------ passes
    def forward(
        self,
        feeds: Mapping[str, Array],
        parameters: Mapping[str, Array],
        fetches: Sequence[str],
        stop: StopFlag | None = None,
        mode: Mode = INFERENCE,
        state_updates: dict[str, Array] | None = None,
    ) -> list[Array]:
        """`state_updates`, when given, receives the new values of `state` nodes that modal ops
        computed (running statistics in training mode)."""
        schedule = self._schedule(("forward", *fetches), lambda: self._fetch_schedule(fetches))
        self.check_allocation(schedule, feeds)
        values, _ = self._evaluate(schedule, feeds, parameters, stop, mode, state_updates)
        return [values[slot] for slot in schedule.targets]  # type: ignore[misc]

    def _fetch_schedule(self, fetches: Sequence[str]) -> Schedule:
        slots = tuple(self.slot(name, "fetch") for name in fetches)
        return self._forward_schedule(slots, self.needed(slots), set(slots), ())

    def backward(
        self,
        feeds: Mapping[str, Array],
        parameters: Mapping[str, Array],
        loss: str,
        wrt: Sequence[str],
        loss_grad: Array | None = None,
        stop: StopFlag | None = None,
        mode: Mode = INFERENCE,
        state_updates: dict[str, Array] | None = None,
    ) -> tuple[Array, Iterator[tuple[str, Array]]]:
        """Run the forward pass now; return the loss value and a lazy reverse pass.

        The iterator yields (name, gradient) for every `wrt` node in reverse topological order,
        each as soon as it is final, releasing values and gradients it no longer needs.
        `state_updates` is filled by the forward pass, so it is complete when this returns.
        """
        schedule = self._schedule(("backward", loss, *wrt), lambda: self._backward_schedule(loss, wrt))
        self.check_allocation(schedule, feeds)
        values, residuals = self._evaluate(schedule, feeds, parameters, stop, mode, state_updates)
        loss_slot, *wrt_slots = schedule.targets
        for slot in wrt_slots:
            dtype = np.asarray(values[slot]).dtype
            if dtype.kind != "f":
                name = self.names[slot]
                fix = ""
                if name in feeds and dtype.kind in "iub":
                    fix = (
                        f"; it was fed {dtype} values (Python ints become int64): feed floats (1.0, not 1), "
                        "or declare the input's dtype (dtype='float64') so that such feeds are refused up front"
                    )
                raise InvalidArgument(
                    f"wrt '{name}' has dtype {dtype}; gradients exist for float nodes only{fix}",
                    reason="NOT_DIFFERENTIABLE",
                    subject=name,
                )
        loss_value = np.asarray(values[loss_slot])
        seed = self._seed(loss, loss_value, loss_grad)
        return loss_value, self._reverse(schedule, values, residuals, loss_slot, seed, stop)

    def _seed(self, loss: str, value: Array, loss_grad: Array | None) -> Array:
        if value.dtype.kind != "f":
            raise InvalidArgument(
                f"loss '{loss}' has dtype {value.dtype}; only a float node can be differentiated",
                reason="NOT_DIFFERENTIABLE",
                subject=loss,
            )
        if loss_grad is None:
            if value.shape != ():
                raise NonScalarLoss(loss, list(value.shape))
            return _one(value.dtype)
        if loss_grad.shape != value.shape:
            raise InvalidArgument(
                f"loss_grad has shape {list(loss_grad.shape)}; loss '{loss}' has shape {list(value.shape)}",
                reason="SHAPE_MISMATCH",
                subject="loss_grad",
            )
        return loss_grad.astype(value.dtype, copy=False)

    def _evaluate(
        self,
        schedule: Schedule,
        feeds: Mapping[str, Array],
        parameters: Mapping[str, Array],
        stop: StopFlag | None,
        mode: Mode = INFERENCE,
        state_updates: dict[str, Array] | None = None,
    ) -> tuple[list[Array | None], Residuals]:
        values: list[Array | None] = [None] * len(self.names)
        residuals: Residuals = {}
        for slot, value in schedule.constants:
            values[slot] = value
        for slot, name in schedule.parameters:
            values[slot] = parameters[name]
        for slot, name in schedule.inputs:
            fed = feeds.get(name)
            if fed is None:
                raise InvalidArgument(f"input '{name}' is needed but was not fed", reason="MISSING_FEED", subject=name)
            values[slot] = fed
        release_min_bytes = self.release_min_bytes
        slot = -1
        try:
            with np.errstate(all="ignore"):
                for done, (slot, function, arguments, releases, saves, modal) in enumerate(schedule.forward):
                    if stop is not None and stop.stopped:
                        raise Cancelled(
                            f"cancelled after {done} of {len(schedule.forward)} forward steps", reason="CANCELLED"
                        )
                    if modal:
                        context = self._context(slot, arguments, mode, state_updates)
                        value = function(*[values[argument] for argument in arguments], ctx=context)
                    elif len(arguments) == 1:
                        value = function(values[arguments[0]])
                    elif len(arguments) == 2:
                        value = function(values[arguments[0]], values[arguments[1]])
                    else:
                        value = function(*[values[argument] for argument in arguments])
                    if saves:
                        value, residuals[slot] = value
                    values[slot] = value
                    for released in releases:
                        unread = values[released]
                        if unread.nbytes >= release_min_bytes:  # type: ignore[union-attr]
                            values[released] = _stand_in(unread)  # type: ignore[arg-type]
        except NUMPY_ERRORS as error:
            raise self._node_error(slot, error) from None
        except MemoryError:
            raise self._memory_error(slot) from None
        return values, residuals

    def _context(
        self, slot: int, arguments: tuple[int, ...], mode: Mode, state_updates: dict[str, Array] | None
    ) -> NodeContext:
        """A modal node's context; its state updates are kept only for arguments that are `state` nodes."""
        state_names = [self.names[a] if self.ops[a] == "state" else None for a in arguments]
        return NodeContext(mode, self.names[slot], state_names, {} if state_updates is None else state_updates)

    def check_allocation(self, schedule: Schedule, feeds: Mapping[str, Array]) -> None:
        """Refuse, before anything is allocated, a request whose values would exceed max_request_bytes.

        Shapes come from the shape rules applied to the fed shapes, so a bad shape is reported
        here too, naming its node. When every input is fed exactly the dtype and shape it
        declares, the types inferred when the graph was built already are those, and are reused.
        The estimate adds up every value the request computes, an upper bound on what is alive
        at once.
        """
        if self.max_request_bytes is None:
            return
        fed_types = {slot: _type_of(feeds.get(name)) for slot, name in schedule.inputs}
        key = tuple(fed_types.values())
        if key in schedule.checked_feed_shapes:
            return
        static = all(fed == self.types[slot] for slot, fed in fed_types.items())
        types = {slot: self.types[slot] if fed is None else fed for slot, fed in fed_types.items()}
        for slot, _ in (*schedule.constants, *schedule.parameters):
            types[slot] = self.types[slot]
        total = 0
        for slot, _, arguments, _, _, _ in schedule.forward:
            name = self.names[slot]
            if static:
                known = self.types[slot]
            else:
                known = infer_node(name, self.ops[slot], [types[a] for a in arguments], self.attrs[slot])
                types[slot] = known
            if not known.is_known:
                continue
            itemsize = 8 if known.dtype is None else known.dtype.itemsize
            total += math.prod(known.shape) * itemsize  # type: ignore[arg-type]
            if total > self.max_request_bytes:
                raise ResourceExhausted(
                    f"node '{name}' ({self.ops[slot]}) of shape {describe(known.shape)} brings this request to "
                    f"about {total:,} bytes of values, more than the limit of {self.max_request_bytes:,}",
                    reason="REQUEST_TOO_LARGE",
                    subject=name,
                )
        with self._schedules_lock:
            schedule.checked_feed_shapes[key] = None
            if len(schedule.checked_feed_shapes) > SCHEDULE_CACHE_SIZE:
                schedule.checked_feed_shapes.popitem(last=False)

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

    def _node_error(self, slot: int, error: Exception, doing: str = "") -> InvalidArgument:
        """numpy signals dtypes it cannot combine (bool - bool) with TypeError; ShapeErrors carry their own reason."""
        name = self.names[slot]
        reason = error.reason if isinstance(error, ShapeError) else "SHAPE_MISMATCH"
        if isinstance(error, TypeError):
            reason = "DTYPE_MISMATCH"
        return InvalidArgument(f"{doing}node '{name}' ({self.ops[slot]}): {error}", reason=reason, subject=name)

    def _memory_error(self, slot: int) -> ResourceExhausted:
        name = self.names[slot]
        return ResourceExhausted(
            f"node '{name}' ({self.ops[slot]}) ran out of memory on the server", reason="OUT_OF_MEMORY", subject=name
        )

    def _reverse(
        self,
        schedule: Schedule,
        values: list[Array | None],
        residuals: Residuals,
        loss_slot: int,
        seed: Array,
        stop: StopFlag | None,
    ) -> Iterator[tuple[str, Array]]:
        grads: list[Array | None] = [None] * len(self.names)
        grads[loss_slot] = seed
        names = self.names
        slot = -1
        try:
            with np.errstate(all="ignore"):
                for done, (slot, arguments, pairs, streamed, saves) in enumerate(schedule.reverse):
                    if stop is not None and stop.stopped:
                        raise Cancelled(
                            f"cancelled after {done} of {len(schedule.reverse)} reverse steps", reason="CANCELLED"
                        )
                    grad = grads[slot]
                    if streamed:
                        value = values[slot]
                        yield names[slot], np.zeros(np.shape(value), np.asarray(value).dtype) if grad is None else grad
                    if grad is not None and pairs:
                        ans = residuals.pop(slot) if saves else values[slot]
                        for vjp, argument in pairs:
                            if len(arguments) == 1:
                                contribution = vjp(grad, ans, values[arguments[0]])
                            elif len(arguments) == 2:
                                contribution = vjp(grad, ans, values[arguments[0]], values[arguments[1]])
                            else:
                                contribution = vjp(grad, ans, *[values[argument] for argument in arguments])
                            dtype = values[argument].dtype  # type: ignore[union-attr]
                            if contribution.dtype != dtype:
                                contribution = contribution.astype(dtype)
                            previous = grads[argument]
                            grads[argument] = contribution if previous is None else previous + contribution
                    grads[slot] = None
                    values[slot] = None
        except NUMPY_ERRORS as error:
            raise self._node_error(slot, error, "the gradient through ") from None
        except MemoryError:
            raise self._memory_error(slot) from None
