"""Checks the engine's reverse pass against central finite differences, one declarative case at a time.

Modelled on HIPS autograd's `check_grads` and JAX's test tables: a test describes a graph in a
few lines, and the checker builds the real `chainrule.v1.Graph` message, validates it with
`build_graph`, runs `Plan.backward` and compares every streamed gradient with a float64 central
difference of <loss_grad, loss>. On the way it enforces what every backward pass must guarantee,
so each table row checks those too: the static types agree with the computed values, gradients
stream in reverse topological order with their node's dtype and shape, and no gradient already
streamed is modified afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import numpy.typing as npt

from chainrule import tensors
from chainrule.client.builder import attr_value
from chainrule.server.graph import build_graph
from chainrule.server.ops import INFERENCE, Mode
from chainrule.server.plan import Plan
from chainrule.v1 import graph_pb2

Array = np.ndarray
AttrLike = bool | int | float | str | Sequence[int] | Sequence[float]

# Central differences in float64: truncation error ~eps**2, rounding error ~1e-16 / eps.
EPS = 1e-6
RTOL = 1e-5
ATOL = 1e-7


# ---------------------------------------------------------------- building graph messages
def input_node(name: str, dtype: str | None = None, shape: Sequence[int] | None = None) -> graph_pb2.Node:
    attrs: dict[str, AttrLike] = {}
    if dtype is not None:
        attrs["dtype"] = dtype
    if shape is not None:
        attrs["shape"] = tuple(shape)
    return node(name, "input", **attrs)


def parameter(name: str, value: npt.ArrayLike) -> graph_pb2.Node:
    return graph_pb2.Node(name=name, op="parameter", value=tensors.encode(np.asarray(value), name))


def constant(name: str, value: npt.ArrayLike) -> graph_pb2.Node:
    return graph_pb2.Node(name=name, op="constant", value=tensors.encode(np.asarray(value), name))


def node(name: str, op: str, *inputs: str, **attrs: AttrLike | None) -> graph_pb2.Node:
    """An op node; an attr given as None is left out, so the op's default applies."""
    return graph_pb2.Node(
        name=name,
        op=op,
        inputs=list(inputs),
        attrs={key: attr_value(value) for key, value in attrs.items() if value is not None},
    )


def declared_inputs(feeds: Mapping[str, Array]) -> list[graph_pb2.Node]:
    """Input nodes declaring the dtype and shape of what will be fed, so every static type is fully known."""
    return [input_node(name, np.asarray(value).dtype.name, np.shape(value)) for name, value in feeds.items()]


def make_graph(nodes: Sequence[graph_pb2.Node], name: str = "gradcheck") -> graph_pb2.Graph:
    return graph_pb2.Graph(name=name, nodes=list(nodes))


# ---------------------------------------------------------------- running the reverse pass
@dataclass
class Backward:
    """What one Plan.backward produced, already checked for the guarantees every pass must keep."""

    loss: Array
    grads: dict[str, Array]
    streamed: list[str]
    topological: list[str]


def run_backward(
    nodes: Sequence[graph_pb2.Node],
    feeds: Mapping[str, Array],
    parameters: Mapping[str, Array] | None = None,
    *,
    loss: str,
    wrt: Sequence[str],
    loss_grad: Array | None = None,
    check_types: bool = True,
    mode: Mode = INFERENCE,
) -> Backward:
    """`mode` runs modal ops (batch_norm, dropout) in training mode when it says so."""
    parameters = dict(parameters or {})
    graph = build_graph(make_graph(nodes))
    # Release every value the reverse pass does not read, however small, so that a wrong
    # `reads` declaration in the op registry shows up as a wrong gradient here.
    plan = Plan(graph, release_min_bytes=0)
    if check_types:
        _check_static_types(graph, plan, feeds, parameters, mode)

    loss_value, stream = plan.backward(feeds, parameters, loss, list(wrt), loss_grad, mode=mode)
    grads: dict[str, Array] = {}
    snapshots: dict[str, Array] = {}
    streamed: list[str] = []
    for name, grad in stream:
        streamed.append(name)
        grads[name] = grad
        snapshots[name] = np.array(grad, copy=True)

    position = {name: slot for slot, name in enumerate(plan.names)}
    assert streamed == sorted(wrt, key=lambda name: -position[name]), (
        f"gradients streamed as {streamed}, not in reverse topological order of {list(wrt)}"
    )
    for name in streamed:
        np.testing.assert_array_equal(
            grads[name], snapshots[name], err_msg=f"the gradient of '{name}' changed after it was streamed"
        )
    for name, value in zip(streamed, plan.forward(feeds, parameters, streamed, mode=mode), strict=True):
        assert np.shape(grads[name]) == np.shape(value), (
            f"gradient of '{name}' has shape {np.shape(grads[name])}; the node has shape {np.shape(value)}"
        )
        assert np.asarray(grads[name]).dtype == np.asarray(value).dtype, (
            f"gradient of '{name}' has dtype {np.asarray(grads[name]).dtype}; the node has {np.asarray(value).dtype}"
        )
    return Backward(np.asarray(loss_value), grads, streamed, list(plan.names))


def _check_static_types(
    graph: nx.DiGraph, plan: Plan, feeds: Mapping[str, Array], parameters: Mapping[str, Array], mode: Mode
) -> None:
    """The shape rules must predict exactly the dtype and shape every node's forward actually produces."""
    names = list(plan.names)
    for name, value in zip(names, plan.forward(feeds, parameters, names, mode=mode), strict=True):
        inferred = graph.nodes[name]["type"]
        actual = np.asarray(value)
        if inferred.dtype is not None:
            assert inferred.dtype == actual.dtype, f"'{name}': inferred dtype {inferred.dtype}, computed {actual.dtype}"
        if inferred.shape is not None:
            assert len(inferred.shape) == actual.ndim and all(
                dim is None or dim == size for dim, size in zip(inferred.shape, actual.shape, strict=True)
            ), f"'{name}': inferred shape {inferred.shape}, computed {actual.shape}"


# ---------------------------------------------------------------- finite differences
def numeric_gradient(
    nodes: Sequence[graph_pb2.Node],
    feeds: Mapping[str, Array],
    parameters: Mapping[str, Array] | None,
    *,
    loss: str,
    name: str,
    loss_grad: Array | None = None,
    eps: float = EPS,
    mode: Mode = INFERENCE,
) -> Array:
    """Central differences of <loss_grad, loss> with respect to node `name`, in float64.

    For a node that is neither fed nor a parameter, the graph is cut there: the node becomes an
    input fed with its own forward value, which is exactly the partial derivative reverse mode
    assigns to an intermediate node (every other path held fixed).
    """
    feeds = {key: np.asarray(value) for key, value in feeds.items()}
    parameters = {key: np.asarray(value) for key, value in (parameters or {}).items()}
    if name not in feeds and name not in parameters:
        [value] = Plan(build_graph(make_graph(nodes))).forward(feeds, parameters, [name], mode=mode)
        nodes = [input_node(name) if each.name == name else each for each in nodes]
        feeds[name] = np.asarray(value)
    plan = Plan(build_graph(make_graph(nodes)))
    sources = parameters if name in parameters else feeds
    base = np.array(sources[name], dtype=np.float64)
    assert sources[name].dtype == np.float64, "finite differences are taken in float64 only"
    cotangent = np.ones(()) if loss_grad is None else np.asarray(loss_grad, dtype=np.float64)

    def objective(value: Array) -> float:
        sources[name] = value
        [out] = plan.forward(feeds, parameters, [loss], mode=mode)
        return float(np.sum(cotangent * out))

    grad = np.zeros_like(base)
    for index in np.ndindex(base.shape):
        plus, minus = base.copy(), base.copy()
        plus[index] += eps
        minus[index] -= eps
        grad[index] = (objective(plus) - objective(minus)) / (2 * eps)
    return grad


def check_grads(
    nodes: Sequence[graph_pb2.Node],
    feeds: Mapping[str, Array],
    parameters: Mapping[str, Array] | None = None,
    *,
    loss: str,
    wrt: Sequence[str] | None = None,
    loss_grad: Array | None = None,
    eps: float = EPS,
    rtol: float = RTOL,
    atol: float = ATOL,
    mode: Mode = INFERENCE,
) -> Backward:
    """Every gradient Plan.backward streams equals its central difference; by default wrt every source fed."""
    wrt = list(wrt) if wrt is not None else [*feeds, *(parameters or {})]
    result = run_backward(nodes, feeds, parameters, loss=loss, wrt=wrt, loss_grad=loss_grad, mode=mode)
    for name in wrt:
        expected = numeric_gradient(
            nodes, feeds, parameters, loss=loss, name=name, loss_grad=loss_grad, eps=eps, mode=mode
        )
        np.testing.assert_allclose(
            result.grads[name], expected, rtol=rtol, atol=atol, err_msg=f"d<{loss}>/d{name} vs finite differences"
        )
    return result


# ---------------------------------------------------------------- one op at a time
@dataclass(frozen=True)
class OpCase:
    """One row of an op table: an op applied to arguments fed as inputs x0, x1, ..."""

    id: str
    op: str
    args: tuple[Array, ...]
    attrs: Mapping[str, AttrLike | None] = field(default_factory=dict)

    def feeds(self, dtype: npt.DTypeLike = np.float64) -> dict[str, Array]:
        """Float arguments in `dtype`; int and bool ones (indices, conditions) as they are."""
        return {
            f"x{i}": np.asarray(arg, dtype=dtype) if np.asarray(arg).dtype.kind == "f" else np.asarray(arg)
            for i, arg in enumerate(self.args)
        }

    def differentiable(self) -> list[str]:
        """The fed arguments that take a gradient: the float ones."""
        return [name for name, value in self.feeds().items() if value.dtype.kind == "f"]

    def nodes(self, dtype: npt.DTypeLike = np.float64) -> list[graph_pb2.Node]:
        feeds = self.feeds(dtype)
        return [*declared_inputs(feeds), node("out", self.op, *feeds, **self.attrs)]

    def output_shape(self) -> tuple[int, ...]:
        shape = build_graph(make_graph(self.nodes())).nodes["out"]["type"].shape
        assert shape is not None and None not in shape
        return tuple(shape)

    def cotangent(self, seed: int = 0) -> Array:
        """A random loss_grad, so no VJP can hide a wrong axis order behind a gradient of ones."""
        return np.asarray(np.random.default_rng(seed).standard_normal(self.output_shape()))


def check_op(case: OpCase, seed: int = 0) -> Backward:
    return check_grads(
        case.nodes(), case.feeds(), loss="out", wrt=case.differentiable(), loss_grad=case.cotangent(seed)
    )


def run_op(case: OpCase, loss_grad: Array | None = None, dtype: npt.DTypeLike = np.float64) -> Backward:
    feeds = case.feeds(dtype)
    if loss_grad is not None:
        loss_grad = np.asarray(loss_grad, dtype=dtype)
    return run_backward(case.nodes(dtype), feeds, loss="out", wrt=case.differentiable(), loss_grad=loss_grad)
