"""The op registry's machinery: what an op declares, and `defop`, which registers one.

A VJP takes the incoming gradient `g`, the op's output `ans` and the op's arguments (attrs as
keywords), and returns the gradient with respect to one argument, already summed back to that
argument's shape. The plan calls only the VJPs of arguments that need a gradient. An argument
whose VJP is None takes no gradient (indices, conditions, shapes): zeros flow back to it, as to
a node with no path to the loss. An op whose result is an int or bool tensor passes no gradient
to anything.

Each op also declares which values its VJPs read (`reads`); the others may reach a VJP as
zero-strided stand-ins that keep only shape and dtype.

An op that `saves` returns (value, residual) from its forward function, and its VJPs receive
the residual where other ops' VJPs receive `ans` (and "ans" in its `reads` means the residual):
work the forward pass already did for the gradient, such as the log-softmax inside a
cross-entropy or a dropout mask, is kept instead of being done again.

A `modal` op's forward function also takes `ctx`, a `NodeContext`: whether the call trains
(batch statistics, active dropout), a random generator keyed by the training seed, the graph's
step and the node's name, and `update_state`, through which batch normalization hands back new
running statistics for the graph's `state` nodes.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chainrule.server.shapes import Shape, TensorType

Array = np.ndarray
Forward = Callable[..., Any]
Vjp = Callable[..., Any]
Infer = Callable[..., TensorType]

ANS = -1
"""In `Op.reads`, the position that stands for the op's own output (or residual)."""
EVERY_ARG = -2
"""In `Op.reads` of a variadic op, the position that stands for all of its arguments (einsum's operands)."""

SOURCE_OPS = ("input", "parameter", "constant", "state")
"""Nodes with no arguments: fed per request, trained, fixed, or updated by training (running statistics)."""
STORED_SOURCES = ("parameter", "state")
"""Sources whose current values the server keeps with the graph."""


@dataclass(frozen=True)
class Attr:
    """An attribute an op accepts: its AttrValue kind (i, f, s, b, ints, floats) and default."""

    kind: str
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class Op:
    name: str
    min_arity: int
    max_arity: int | None
    """None: any number of arguments from min_arity on (concat)."""
    forward: Forward | None
    vjps: tuple[Vjp | None, ...]
    """One per argument position; a variadic op has one, called with `position=` the argument's index."""
    infer: Infer | None
    reads: tuple[frozenset[int], ...] = ()
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    saves: bool = False
    modal: bool = False
    inputs: str = ""
    """The arguments, as the README's op table names them."""
    convention: str = ""
    """The gradient convention, as the README's op table states it."""

    @property
    def is_source(self) -> bool:
        return self.forward is None

    @property
    def variadic(self) -> bool:
        return self.max_arity is None

    def takes(self, count: int) -> bool:
        return count >= self.min_arity and (self.max_arity is None or count <= self.max_arity)

    def arity_text(self) -> str:
        if self.max_arity is None:
            return f"at least {self.min_arity}"
        if self.max_arity == self.min_arity:
            return str(self.min_arity)
        return f"{self.min_arity} to {self.max_arity}"

    def vjps_for(self, count: int) -> tuple[Vjp | None, ...]:
        if not self.variadic:
            return self.vjps[:count]
        (vjp,) = self.vjps
        return tuple(None if vjp is None else functools.partial(vjp, position=i) for i in range(count))

    def reads_for(self, count: int) -> tuple[frozenset[int], ...]:
        """The read sets for `count` arguments: optional arguments not given are not read."""
        reads = self.reads * count if self.variadic else self.reads[:count]
        every = frozenset(range(count))
        return tuple(
            frozenset(p for p in (read | every if EVERY_ARG in read else read) if p < count and p != EVERY_ARG)
            for read in reads
        )


SOURCE_ATTRS: dict[str, dict[str, Attr]] = {"input": {"dtype": Attr("s"), "shape": Attr("ints")}}
OPS: dict[str, Op] = {name: Op(name, 0, 0, None, (), None, (), SOURCE_ATTRS.get(name, {})) for name in SOURCE_OPS}

_READ_WORDS = {"ans": ANS, "x": 0, "y": 1, "z": 2}


def _read_set(spec: str, arity: int | None) -> frozenset[int]:
    positions: set[int] = set()
    for word in spec.split():
        if word == "args":
            positions.update(range(arity) if arity is not None else (EVERY_ARG,))
        elif word.isdigit():
            positions.add(int(word))
        else:
            positions.add(_READ_WORDS[word])
    return frozenset(positions)


def defop(
    name: str,
    forward: Forward,
    *vjps: Vjp | None,
    infer: Infer,
    reads: Sequence[str],
    attrs: Mapping[str, Attr] | None = None,
    saves: bool = False,
    modal: bool = False,
    min_arity: int | None = None,
    variadic: bool = False,
    inputs: str = "",
    convention: str = "",
) -> None:
    """Register an op. `reads[i]` names the values the i-th VJP uses beyond their shapes
    ("ans", "x", "y", "z", a position number, or "args" for all), so the plan can release every
    other value as soon as the forward pass is done with it.

    The op takes one argument per VJP; `min_arity` makes the trailing ones optional (a conv's
    bias). A `variadic` op has one VJP, called for every argument with its `position`."""
    assert name not in OPS, f"op {name!r} is registered twice"
    assert len(reads) == len(vjps), name
    max_arity = None if variadic else len(vjps)
    lowest = len(vjps) if min_arity is None else min_arity
    read_sets = tuple(_read_set(spec, max_arity) for spec in reads)
    OPS[name] = Op(
        name, lowest, max_arity, forward, vjps, infer, read_sets, attrs or {}, saves, modal, inputs, convention
    )


def unbroadcast(g: Array, shape: Shape) -> Array:
    """Sum `g` over the axes that broadcasting added or stretched, so it has `shape` again."""
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)  # type: ignore[arg-type]
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    stretched = tuple(axis for axis, size in enumerate(shape) if size == 1 and g.shape[axis] != 1)  # type: ignore[arg-type]
    if stretched:
        g = g.sum(axis=stretched, keepdims=True)
    return g


# ---------------------------------------------------------------- what modal ops see of a call
@dataclass(frozen=True)
class Mode:
    """How a call runs the graph: `training` turns on batch statistics and dropout. Random draws
    are keyed by (seed, step, node name), so a run is reproducible on any graph built from the
    same definition."""

    training: bool = False
    seed: int = 0
    step: int = 0


INFERENCE = Mode()


class NodeContext:
    """One modal node's view of the call: its mode, its random generator, and where its state updates go."""

    __slots__ = ("mode", "node", "_state_names", "_updates")

    def __init__(self, mode: Mode, node: str, state_names: Sequence[str | None], updates: dict[str, Array]) -> None:
        self.mode = mode
        self.node = node
        self._state_names = state_names
        self._updates = updates

    @property
    def training(self) -> bool:
        return self.mode.training

    def rng(self) -> np.random.Generator:
        """A generator of its own for this node in this step: the same draws whenever (seed, step, node) repeat."""
        digest = hashlib.sha256(self.node.encode("utf-8", "surrogatepass")).digest()
        words = np.frombuffer(digest[:16], dtype="<u4").tolist()
        seed = np.random.SeedSequence([self.mode.seed & 0xFFFFFFFFFFFFFFFF, self.mode.step, *words])
        return np.random.Generator(np.random.Philox(seed))

    def update_state(self, position: int, value: Array) -> None:
        """The new value of the argument at `position`, kept when that argument is a `state` node."""
        name = self._state_names[position] if position < len(self._state_names) else None
        if name is not None:
            self._updates[name] = value
