"""A stored graph compiled once into a flat plan over integer slots, and its forward and reverse passes.

Slots follow the graph's topological order, so the forward pass walks them upwards and the
reverse pass downwards: when the reverse walk reaches a slot, every consumer of that slot has
already sent its contribution, so the slot's gradient (the sum over all paths) is final.
Contributions are summed out of place, so no gradient a VJP returned is ever modified.

What a request runs depends only on its targets (fetches, or loss and wrt), so that part is
worked out once per kind of request and cached as a `Schedule`: the slots to evaluate, the
values to release once the forward pass is done with them, and the reverse steps with only
the VJPs whose argument needs a gradient. Concurrent first calls of one kind share one
planning run, which stops once none of them waits; what a plan and its schedules hold is
estimated in bytes (`Plan.bytes`), so the engine can bound the memory of its live graphs.
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
from chainrule.server.graph import NodeTable, infer_node
from chainrule.server.ops import ANS, INFERENCE, OPS, STORED_SOURCES, Mode, NodeContext
from chainrule.server.shapes import ShapeError, TensorType, describe
from chainrule.server.work import SharedWork, StopFlag, stopped

Array = np.ndarray
SCHEDULE_CACHE_SIZE = 64
NUMPY_ERRORS = (ValueError, TypeError, IndexError, ArithmeticError, np.exceptions.AxisError)
"""What numpy raises for arguments an op cannot take; reported as INVALID_ARGUMENT naming the node."""
RELEASE_MIN_BYTES = 1 << 12
"""Released values smaller than this are kept: a stand-in would cost more than it frees."""


@dataclass(frozen=True)
class BoundOp:
    """What every node of one op with equal attrs, arity and type runs: its forward function and
    one VJP per argument (None: the argument takes no gradient), attrs already bound. Shared, so
    a node of a large graph costs a pointer to one instead of a copy."""

    forward: Callable[..., Array]
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
    built_bytes: int = 0
    """An estimate of what the schedule itself holds."""
    checked_feed_shapes: OrderedDict[tuple, None] = field(default_factory=OrderedDict)
    """Feed shapes whose allocation estimate already passed, so a repeated request skips it."""

    @property
    def bytes(self) -> int:
        return self.built_bytes + len(self.checked_feed_shapes) * CHECKED_SHAPES_BYTES


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


def _value_bytes(known: TensorType) -> int:
    """The bytes of a value of type `known`; 0 when its shape is not known."""
    if not known.is_known:
        return 0
    itemsize = 8 if known.dtype is None else known.dtype.itemsize
    return math.prod(known.shape) * itemsize  # type: ignore[arg-type]


# What compiled graphs and schedules hold, estimated from how many of each Python object they
# keep (CPython 3.11, 64-bit, with the allocator's rounding and the GC header); test_engine_memory
# holds these estimates to what tracemalloc measures.
POINTER_BYTES = 8
TUPLE_BYTES = 56
"""A tuple without its items."""
CLOSURE_BYTES = 200
"""A `_value_only` wrapper: a function object and its cell."""
CHECKED_SHAPES_BYTES = 256
"""One checked feed-shape key: a tuple of a few TensorTypes."""
NAME_BYTES = 56
"""A node name's str object without its characters (ASCII); each character adds one byte."""
SLOT_BYTES = 32 + 3 * POINTER_BYTES
"""A slot number's int object, and its share of the name -> slot dict."""
NODE_BYTES = 6 * POINTER_BYTES
"""A node's entry in each per-node list: names, ops, types, attrs, args, bound."""


def _tuple_bytes(items: int) -> int:
    return TUPLE_BYTES + POINTER_BYTES * items


def _base_bytes(table: NodeTable) -> int:
    """An estimate of a compiled graph before any schedule: its per-node columns, names and the
    argument tuples (attrs, types and bound ops are shared, so they count little), and its constants."""
    nodes = len(table.names)
    edges = sum(map(len, table.args))
    characters = sum(map(len, table.names))
    per_node = NODE_BYTES + NAME_BYTES + SLOT_BYTES + TUPLE_BYTES
    constants = sum(value.nbytes for slot, value in table.values.items() if table.ops[slot] == "constant")
    return nodes * per_node + characters + edges * POINTER_BYTES + constants


class Plan:
    """A graph compiled for evaluation: the graph's columns (shared, not copied) and one BoundOp per node."""

    def __init__(
        self,
        graph: nx.DiGraph,
        release_min_bytes: int = RELEASE_MIN_BYTES,
        max_request_bytes: int | None = None,
        stop: StopFlag | None = None,
    ) -> None:
        stop = stop or StopFlag()
        self.release_min_bytes = release_min_bytes
        self.max_request_bytes = max_request_bytes
        table: NodeTable = graph.graph["nodes"]
        self.names = table.names
        self.slot_of = table.slot_of
        self.ops = table.ops
        self.types = table.types
        self.attrs = table.attrs
        self.args = table.args
        """Each node's argument slots; a source node's are ()."""
        self.bound: list[BoundOp | None] = []
        """None for source nodes."""
        self.sources: dict[int, Source] = {}
        shared: dict[tuple, BoundOp] = {}
        for slot, op_name in enumerate(self.ops):
            if stop.stopped:
                raise stopped(f"compiling node {slot:,} of {len(self.ops):,}")
            op = OPS[op_name]
            if op.forward is None:
                value = table.values.get(slot) if op_name == "constant" else None
                self.sources[slot] = Source(op_name, self.types[slot], value)
                self.bound.append(None)
                continue
            attrs, count, known = self.attrs[slot], len(self.args[slot]), self.types[slot]
            key = (op_name, id(attrs), count, id(known))
            bound = shared.get(key)
            if bound is None:
                bound = shared[key] = BoundOp(
                    _bind(op.forward, attrs),
                    tuple(None if vjp is None else _bind(vjp, attrs) for vjp in op.vjps_for(count)),
                    op.reads_for(count),
                    op.saves,
                    op.modal,
                    known.dtype is None or known.dtype.kind == "f",
                )
            self.bound.append(bound)
        self.inputs = {self.names[s]: s for s, src in self.sources.items() if src.op == "input"}
        self.parameters = {self.names[s]: s for s, src in self.sources.items() if src.op == "parameter"}
        """Trainable parameters; `state` nodes (running statistics) are kept with them but never trained.
        Their values live with the graph's live state, not here."""
        self.state = {self.names[s]: s for s, src in self.sources.items() if src.op == "state"}
        self.stored = {self.names[s]: s for s, src in self.sources.items() if src.op in STORED_SOURCES}
        self.base_bytes = _base_bytes(table)
        """An estimate of what the compiled graph holds, before any schedule."""
        self._schedules: OrderedDict[tuple, Schedule] = OrderedDict()
        self._building: dict[tuple, SharedWork[Schedule]] = {}
        self._schedules_lock = threading.Lock()
        self.cache_bytes = 0
        """An estimate of what the cached schedules and their checked feed shapes hold."""
        self.max_cache_bytes: int | None = None
        """Bound on the bytes of cached schedules (and their checked feed shapes); the engine sets it."""
        self.on_cache_change: Callable[[], None] | None = None
        """Called after a schedule or a checked feed shape was cached or dropped; the engine counts them."""

    # ------------------------------------------------------------ lookups
    def slot(self, name: str, role: str) -> int:
        slot = self.slot_of.get(name)
        if slot is None:
            raise InvalidArgument(f"{role} '{name}' names no node of the graph", reason="UNKNOWN_NODE", subject=name)
        return slot

    def needed(self, targets: Sequence[int], stop: StopFlag | None = None) -> list[int]:
        """The targets and every slot they depend on, in topological order."""
        stop = stop or StopFlag()
        args = self.args
        seen = set(targets)
        stack = list(targets)
        while stack:
            if stop.stopped:
                raise stopped(f"finding what the request needs, {len(seen):,} nodes found")
            for argument in args[stack.pop()]:
                if argument not in seen:
                    seen.add(argument)
                    stack.append(argument)
        return sorted(seen)

    # ------------------------------------------------------------ schedules
    def _schedule(self, key: tuple, build: Callable[[StopFlag], Schedule], stop: StopFlag | None) -> Schedule:
        """The cached schedule of `key`, or one `build` run shared by every caller that asks for it
        meanwhile; it stops once none of them waits any longer."""
        doing = f"planning the pass over {len(self.names):,} nodes"
        with self._schedules_lock:
            schedule = self._schedules.get(key)
            if schedule is not None:
                self._schedules.move_to_end(key)
                return schedule
            if stop is not None and stop.stopped:  # a call already given up starts nothing
                raise stopped(doing)
            work = self._building.get(key)
            if work is None or not work.join():
                work = self._building[key] = SharedWork(lambda flag: self._build(key, build, flag), "schedule")
                work.join()
        return work.wait(stop, doing)

    def _build(self, key: tuple, build: Callable[[StopFlag], Schedule], stop: StopFlag) -> Schedule:
        try:
            schedule = build(stop)
            with self._schedules_lock:
                if key not in self._schedules:
                    self._schedules[key] = schedule
                    self.cache_bytes += schedule.bytes
                    self._trim_cache()
        finally:
            with self._schedules_lock:
                if self._building.get(key) is not None and self._building[key].stop is stop:
                    del self._building[key]
        if self.on_cache_change is not None:
            self.on_cache_change()
        return schedule

    def _trim_cache(self) -> None:
        """Drop least recently used schedules beyond SCHEDULE_CACHE_SIZE or max_cache_bytes (keeping the newest)."""
        while len(self._schedules) > SCHEDULE_CACHE_SIZE or (
            self.max_cache_bytes is not None and len(self._schedules) > 1 and self.cache_bytes > self.max_cache_bytes
        ):
            _, dropped = self._schedules.popitem(last=False)
            self.cache_bytes -= dropped.bytes

    @property
    def building(self) -> list[tuple]:
        """The kinds of request whose schedules are being planned now."""
        with self._schedules_lock:
            return list(self._building)

    @property
    def bytes(self) -> int:
        """An estimate of the compiled graph with its caches, for the engine's memory budget."""
        return self.base_bytes + self.cache_bytes

    def _forward_schedule(
        self,
        targets: tuple[int, ...],
        order: list[int],
        keep: set[int],
        reverse: tuple[ReverseStep, ...],
        stop: StopFlag,
        reverse_bytes: int = 0,
    ) -> Schedule:
        """Release each computed value that is not kept right after its last consumer has run."""
        bound, args = self.bound, self.args
        last_consumer: dict[int, int] = {}
        for slot in order:
            if stop.stopped:
                raise stopped("planning when to release values")
            for argument in args[slot]:
                last_consumer[argument] = slot
        releases: dict[int, list[int]] = {}
        for value, consumer in last_consumer.items():
            if value not in keep and bound[value] is not None:
                releases.setdefault(consumer, []).append(value)
        released_tuples = {consumer: tuple(released) for consumer, released in releases.items()}
        residuals_used = {slot for slot, _, pairs, _, saves in reverse if saves}
        forward = []
        append = forward.append
        sources = []
        value_only = 0
        for slot in order:
            if stop.stopped:
                raise stopped(f"planning the forward pass, {len(forward):,} of {len(order):,} nodes done")
            kind = bound[slot]
            if kind is None:
                sources.append((slot, self.sources[slot]))
                continue
            saves = slot in residuals_used
            function = kind.forward
            if kind.saves and not saves:
                function = _value_only(function)
                value_only += 1
            append((slot, function, args[slot], released_tuples.get(slot, ()), saves, kind.modal))
        size = reverse_bytes + value_only * CLOSURE_BYTES + len(forward) * _tuple_bytes(6)
        size += sum(_tuple_bytes(len(released)) for released in releases.values())
        size += _tuple_bytes(len(forward)) + _tuple_bytes(len(reverse)) + 3 * _tuple_bytes(len(sources))
        size += len(sources) * _tuple_bytes(2)
        return Schedule(
            targets,
            constants=tuple((slot, source.value) for slot, source in sources if source.op == "constant"),
            parameters=tuple((slot, self.names[slot]) for slot, source in sources if source.op in STORED_SOURCES),
            inputs=tuple((slot, self.names[slot]) for slot, source in sources if source.op == "input"),
            forward=tuple(forward),
            reverse=reverse,
            built_bytes=size,
        )

    def _backward_schedule(self, loss_name: str, wrt_names: Sequence[str], stop: StopFlag) -> Schedule:
        loss = self.slot(loss_name, "loss")
        wrt = tuple(self.slot(name, "wrt") for name in wrt_names)
        if not wrt:
            raise InvalidArgument("wrt is empty and the graph has no parameters", reason="EMPTY_WRT", subject="wrt")
        if len(set(wrt)) != len(wrt):
            repeated = next(name for name in wrt_names if list(wrt_names).count(name) > 1)
            raise InvalidArgument(f"wrt names '{repeated}' more than once", reason="DUPLICATE_WRT", subject=repeated)
        bound, args = self.bound, self.args
        loss_order = self.needed([loss], stop)
        feeds_loss = set(loss_order)
        order = loss_order if feeds_loss.issuperset(wrt) else self.needed([loss, *wrt], stop)
        requires_grad = [False] * len(self.names)
        for slot in wrt:
            requires_grad[slot] = True
        for slot in order:
            if stop.stopped:
                raise stopped("finding which nodes need a gradient")
            kind = bound[slot]
            if kind is not None and not requires_grad[slot] and kind.differentiable:
                requires_grad[slot] = any(
                    requires_grad[a] and vjp is not None for vjp, a in zip(kind.vjps, args[slot], strict=True)
                )
        wanted = set(wrt)
        lowest_wanted = min(wanted)
        keep = {loss, *wrt}
        reverse: list[ReverseStep] = []
        pair_count = 0
        for slot in reversed(order):
            if slot < lowest_wanted:
                break
            if stop.stopped:
                raise stopped(f"planning the reverse pass, {len(reverse):,} nodes done")
            if not requires_grad[slot]:
                continue
            kind = bound[slot]
            arguments = args[slot]
            pairs: list[tuple[Callable[..., Array], int]] = []
            if kind is not None and slot in feeds_loss:
                for position, (vjp, argument) in enumerate(zip(kind.vjps, arguments, strict=True)):
                    if requires_grad[argument] and vjp is not None:
                        pairs.append((vjp, argument))
                        for read in kind.reads[position]:
                            keep.add(slot if read == ANS else arguments[read])
            saves = kind is not None and kind.saves and bool(pairs)
            reverse.append((slot, arguments, tuple(pairs), slot in wanted, saves))
            pair_count += len(pairs)
        size = len(reverse) * (_tuple_bytes(5) + TUPLE_BYTES) + pair_count * (POINTER_BYTES + _tuple_bytes(2))
        return self._forward_schedule((loss, *wrt), order, keep, tuple(reverse), stop, size)

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
        schedule = self._schedule(("forward", *fetches), lambda flag: self._fetch_schedule(fetches, flag), stop)
        self.check_allocation(schedule, feeds, stop)
        values, _ = self._evaluate(schedule, feeds, parameters, stop, mode, state_updates)
        return [values[slot] for slot in schedule.targets]  # type: ignore[misc]

    def _fetch_schedule(self, fetches: Sequence[str], stop: StopFlag) -> Schedule:
        slots = tuple(self.slot(name, "fetch") for name in fetches)
        return self._forward_schedule(slots, self.needed(slots, stop), set(slots), (), stop)

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
        schedule = self._schedule(("backward", loss, *wrt), lambda flag: self._backward_schedule(loss, wrt, flag), stop)
        self.check_allocation(schedule, feeds, stop)
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

    def check_allocation(self, schedule: Schedule, feeds: Mapping[str, Array], stop: StopFlag | None = None) -> None:
        """Refuse, before anything is allocated, a request whose values would exceed max_request_bytes.

        Shapes come from the shape rules applied to the fed shapes, so a bad shape is reported
        here too, naming its node. When every input is fed exactly the dtype and shape it
        declares, the types inferred when the graph was built already are those, and are reused.
        The estimate adds up every value the request computes, an upper bound on what is alive
        at once. As when the graph was built, a shape rule runs once per distinct (op, attrs,
        argument types).
        """
        if self.max_request_bytes is None:
            return
        stop = stop or StopFlag()
        fed_types = {slot: _type_of(feeds.get(name)) for slot, name in schedule.inputs}
        key = tuple(fed_types.values())
        if key in schedule.checked_feed_shapes:
            return
        static = all(fed == self.types[slot] for slot, fed in fed_types.items())
        types = {slot: self.types[slot] if fed is None else fed for slot, fed in fed_types.items()}
        for slot, _ in (*schedule.constants, *schedule.parameters):
            types[slot] = self.types[slot]
        shared: dict[TensorType, TensorType] = {}
        inferred: dict[tuple, TensorType] = {}
        sizes: dict[int, int] = {}
        total = 0
        for done, (slot, _, arguments, _, _, _) in enumerate(schedule.forward):
            if stop.stopped:
                raise stopped(f"estimating the request's memory, {done:,} of {len(schedule.forward):,} nodes done")
            if static:
                known = self.types[slot]
            else:
                inference = (self.ops[slot], id(self.attrs[slot]), *[id(types[a]) for a in arguments])
                known = inferred.get(inference)  # type: ignore[assignment]
                if known is None:
                    arguments_types = [types[a] for a in arguments]
                    known = infer_node(self.names[slot], self.ops[slot], arguments_types, self.attrs[slot])
                    known = inferred[inference] = shared.setdefault(known, known)
                types[slot] = known
            size = sizes.get(id(known))
            if size is None:
                size = sizes[id(known)] = _value_bytes(known)
            total += size
            if total > self.max_request_bytes:
                name = self.names[slot]
                raise ResourceExhausted(
                    f"node '{name}' ({self.ops[slot]}) of shape {describe(known.shape)} brings this request to "
                    f"about {total:,} bytes of values, more than the limit of {self.max_request_bytes:,}",
                    reason="REQUEST_TOO_LARGE",
                    subject=name,
                )
        with self._schedules_lock:
            counted = any(cached is schedule for cached in self._schedules.values())
            before = schedule.bytes
            schedule.checked_feed_shapes[key] = None
            if len(schedule.checked_feed_shapes) > SCHEDULE_CACHE_SIZE:
                schedule.checked_feed_shapes.popitem(last=False)
            if counted:
                self.cache_bytes += schedule.bytes - before
        if self.on_cache_change is not None:
            self.on_cache_change()

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
