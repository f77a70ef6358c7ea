"""A `chainrule.v1.Graph` message -> a validated, shape-checked `networkx.DiGraph`.

The DiGraph's nodes are the node names, its edges run from each argument to its consumer, and
each node carries `type`, its statically inferred TensorType. Everything else about the nodes
is kept column by column in `graph.graph["nodes"]`, a `NodeTable` in topological order
(`graph.graph["order"]` is its list of names): a dict per node and per field would cost more
than the rest of the server at a million nodes. Nodes with equal attrs share one read-only
mapping and nodes with equal types one TensorType, which also lets the shape rules run once per
distinct (op, attrs, argument types) instead of once per node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from types import MappingProxyType
from typing import Any

import networkx as nx
import numpy as np

from chainrule import tensors
from chainrule.server.errors import CONTROL_CHARACTER, InvalidArgument, ResourceExhausted, check_name, shown
from chainrule.server.ops import OPS, STORED_SOURCES, Attr, Op
from chainrule.server.shapes import ShapeError, TensorType
from chainrule.server.work import StopFlag, stopped
from chainrule.v1 import graph_pb2

VALUED_SOURCES = (*STORED_SOURCES, "constant")
CYCLE_NODES_SHOWN = 4
CYCLE_NAME_CHARACTERS = 32
"""A cycle's message names its first few nodes, each cut to this, so that it stays short whatever the names."""


@dataclass(frozen=True)
class Limits:
    """What one graph may hold; the server's flags set these."""

    max_nodes: int = 1_000_000
    max_name_length: int = 256
    max_attrs_per_node: int = 16
    max_attr_list_length: int = 64
    max_tensor_elements: int = 1 << 28
    max_request_bytes: int = 4 << 30


@dataclass(frozen=True)
class NodeTable:
    """The nodes in topological order, one list per field; a node's index here is its slot."""

    names: list[str]
    slot_of: dict[str, int]
    ops: list[str]
    """The registry's own name string of each node's op: one object per op, not per node."""
    args: list[tuple[int, ...]]
    """Each node's argument slots, in argument order, repeats kept."""
    attrs: list[Mapping[str, Any]]
    """Validated, defaults filled in; nodes of one op with equal attrs share one read-only mapping."""
    values: dict[int, np.ndarray]
    """The values of parameter, state and constant nodes."""
    types: list[TensorType]
    """Statically inferred; equal types are one shared object."""


class Dag(nx.DiGraph):
    """A DiGraph whose edges carry no data: every edge shares one empty dict, as networkx's own
    docs show for thin graphs, which spares a dict per edge (and a third of the time to add one).
    Nothing may write edge attributes."""

    _no_edge_data: dict[str, Any] = {}

    def _edge_data(self) -> dict[str, Any]:
        return self._no_edge_data

    edge_attr_dict_factory = _edge_data  # type: ignore[assignment]


EDGES_PER_STOP_CHECK = 1 << 16
"""NetworkX adds edges in batches this large, so a stopped build stops within one batch."""


def build_graph(message: graph_pb2.Graph, limits: Limits | None = None, stop: StopFlag | None = None) -> nx.DiGraph:
    """Validate and shape-check `message`; `stop` ends the build between two nodes with Cancelled."""
    limits = limits or Limits()
    stop = stop or StopFlag()
    if not message.nodes:
        raise InvalidArgument("graph has no nodes", reason="EMPTY_GRAPH", subject="graph.nodes")
    if len(message.nodes) > limits.max_nodes:
        raise ResourceExhausted(
            f"graph has {len(message.nodes)} nodes, more than the limit of {limits.max_nodes}",
            reason="TOO_MANY_NODES",
            subject="graph.nodes",
        )
    check_name(message.name, "graph.name", limits.max_name_length)
    names, ops, args, later, attrs, values, slot_of = _read_nodes(message.nodes, limits, stop)
    if later:
        _resolve_later(names, args, later, slot_of, limits)
    graph = Dag(name=message.name)
    graph.add_nodes_from(names)
    edges = ((names[argument], name) for name, slots in zip(names, args, strict=True) for argument in slots)
    while batch := list(islice(edges, EDGES_PER_STOP_CHECK)):
        if stop.stopped:
            raise stopped("adding the graph's edges")
        graph.add_edges_from(batch)
    del edges
    if later:  # the message lists some node before an argument of it: sort the columns topologically
        names, ops, args, attrs, values, slot_of = _sorted(graph, names, ops, args, attrs, values, slot_of, stop)
    types = _infer_types(names, ops, args, attrs, values, limits, stop)
    node_data = graph.nodes
    for name, known in zip(names, types, strict=True):
        node_data[name]["type"] = known
    graph.graph["order"] = names
    graph.graph["nodes"] = NodeTable(names, slot_of, ops, args, attrs, values, types)
    return graph


def _read_nodes(
    nodes: Sequence[graph_pb2.Node], limits: Limits, stop: StopFlag
) -> tuple[
    list[str],
    list[str],
    list[tuple[int, ...]],
    dict[int, list[str]],
    list[Mapping[str, Any]],
    dict[int, np.ndarray],
    dict[str, int],
]:
    """Each node checked on its own, in message order: name, op, arity, attrs and value; and its
    arguments' slots (message order for now) when the message lists them before it, else its
    arguments' names in `later`.

    What depends only on the op, the arity or the attrs' bytes is checked once per distinct
    combination; names are searched for control characters all at once at the end."""
    names: list[str] = []
    ops: list[str] = []
    args: list[tuple[int, ...]] = []
    later: dict[int, list[str]] = {}
    attrs: list[Mapping[str, Any]] = []
    values: dict[int, np.ndarray] = {}
    slot_of: dict[str, int] = {}
    slot = slot_of.__getitem__
    checked_ops: dict[tuple[str, int], tuple[Op, bool, Mapping[str, Any] | None]] = {}
    checked_attrs: dict[tuple, Mapping[str, Any]] = {}
    max_name_length = limits.max_name_length
    for index, node in enumerate(nodes):
        if stop.stopped:
            raise stopped(f"checking node {index:,} of {len(nodes):,}")
        name = node.name
        if not name or len(name) > max_name_length:
            _check_node_name(name, node.op, limits)
        arguments = node.inputs
        try:
            slots = tuple(map(slot, arguments))
        except KeyError:  # an argument listed after this node (or not at all)
            later[index] = arguments[:]
            slots = ()
        op_name = node.op
        checked = checked_ops.get((op_name, len(arguments)))
        if checked is None:
            op = _check_op(name, op_name, len(arguments))
            checked = checked_ops[op_name, len(arguments)] = (op, op.name in VALUED_SOURCES, None)
        op, valued, node_attrs = checked
        if node.attrs:
            node_attrs = _checked_attrs(name, op, node.attrs, limits, checked_attrs)
        elif node_attrs is None:
            node_attrs = _checked_attrs(name, op, {}, limits, checked_attrs)
            checked_ops[op_name, len(arguments)] = (op, valued, node_attrs)
        if valued or node.HasField("value"):
            value = _check_value(name, op.name, node, limits)
            if value is not None:
                values[index] = value
        if slot_of.setdefault(name, index) != index:
            raise InvalidArgument(f"node '{name}' is defined twice", reason="DUPLICATE_NODE", subject=name)
        names.append(name)
        ops.append(op.name)
        args.append(slots)
        attrs.append(node_attrs)
    if CONTROL_CHARACTER.search("".join(names)):
        for name in names:
            _check_node_name(name, "", limits)
    return names, ops, args, later, attrs, values, slot_of


def _check_node_name(name: str, op: str, limits: Limits) -> None:
    if not name:
        raise InvalidArgument(f"a node with op '{shown(op)}' has an empty name", reason="EMPTY_NAME", subject="name")
    check_name(name, "node name", limits.max_name_length, subject=shown(name))


def _check_op(name: str, op_name: str, arity: int) -> Op:
    op = OPS.get(op_name)
    if op is None:
        raise InvalidArgument(f"node '{name}' has unknown op '{shown(op_name)}'", reason="UNKNOWN_OP", subject=name)
    if not op.takes(arity):
        raise InvalidArgument(
            f"node '{name}' ({op.name}) takes {op.arity_text()} input(s), got {arity}",
            reason="WRONG_ARITY",
            subject=name,
        )
    return op


def _checked_attrs(
    name: str,
    op: Op,
    given: Mapping[str, graph_pb2.AttrValue],
    limits: Limits,
    checked: dict[tuple, Mapping[str, Any]],
) -> Mapping[str, Any]:
    """The node's attrs, checked and shared with every earlier node of the same op whose attrs
    have the same bytes."""
    if len(given) > limits.max_attrs_per_node:
        raise InvalidArgument(
            f"node '{name}' has {len(given)} attrs, more than the limit of {limits.max_attrs_per_node}",
            reason="TOO_MANY_ATTRS",
            subject=name,
        )
    key = (op.name, *sorted((key, value.SerializeToString()) for key, value in given.items()))
    shared = checked.get(key)
    if shared is None:
        shared = checked[key] = MappingProxyType(_check_attrs(name, op.name, op.attrs, given, limits))
    return shared


def _resolve_later(
    names: list[str], args: list[tuple[int, ...]], later: dict[int, list[str]], slot_of: dict[str, int], limits: Limits
) -> None:
    """The argument slots of nodes listed before some argument of theirs; an unknown name is refused."""
    for index, arguments in later.items():
        unknown = next((argument for argument in arguments if argument not in slot_of), None)
        if unknown is not None:
            name = names[index]
            check_name(unknown, f"node '{shown(name)}' input", limits.max_name_length, subject=name)
            raise InvalidArgument(
                f"node '{name}' names input '{shown(unknown)}', which is not a node of the graph",
                reason="UNKNOWN_INPUT",
                subject=name,
            )
        args[index] = tuple(slot_of[argument] for argument in arguments)


def _sorted(
    graph: nx.DiGraph,
    names: list[str],
    ops: list[str],
    args: list[tuple[int, ...]],
    attrs: list[Mapping[str, Any]],
    values: dict[int, np.ndarray],
    slot_of: dict[str, int],
    stop: StopFlag,
) -> tuple[list[str], list[str], list[tuple[int, ...]], list[Mapping[str, Any]], dict[int, np.ndarray], dict[str, int]]:
    """The columns in a topological order of `graph`; a cycle is refused, naming some of its nodes."""
    order: list[int] = []
    try:
        for name in nx.topological_sort(graph):
            if stop.stopped:
                raise stopped(f"sorting the graph's nodes, {len(order):,} of {len(names):,} done")
            order.append(slot_of[name])
    except nx.NetworkXUnfeasible:
        _check_acyclic(graph)
        raise
    new_slot = [0] * len(order)
    for slot, old in enumerate(order):
        new_slot[old] = slot
    sorted_names = [names[old] for old in order]
    return (
        sorted_names,
        [ops[old] for old in order],
        [tuple(new_slot[argument] for argument in args[old]) for old in order],
        [attrs[old] for old in order],
        {new_slot[old]: value for old, value in values.items()},
        {name: slot for slot, name in enumerate(sorted_names)},
    )


def _check_attrs(
    name: str, op: str, accepted: Mapping[str, Attr], given: Mapping[str, graph_pb2.AttrValue], limits: Limits
) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for key in sorted(given):
        spec = accepted.get(key)
        if spec is None:
            expected = ", ".join(sorted(accepted)) or "none"
            raise InvalidArgument(
                f"node '{name}' ({op}) has unknown attr '{shown(key)}' (accepted: {expected})",
                reason="BAD_ATTR",
                subject=name,
            )
        kind = given[key].WhichOneof("value")
        if kind != spec.kind:
            raise InvalidArgument(
                f"node '{name}' ({op}) attr '{key}' must be of kind '{spec.kind}', got '{kind or 'unset'}'",
                reason="BAD_ATTR",
                subject=name,
            )
        value = getattr(given[key], kind)
        if kind in ("ints", "floats"):
            value = tuple(value.values)
            if len(value) > limits.max_attr_list_length:
                raise InvalidArgument(
                    f"node '{name}' ({op}) attr '{key}' has {len(value)} entries, more than the limit of "
                    f"{limits.max_attr_list_length}",
                    reason="BAD_ATTR",
                    subject=name,
                )
        attrs[key] = value
    for key, spec in accepted.items():
        if key not in attrs:
            if spec.required:
                raise InvalidArgument(
                    f"node '{name}' ({op}) needs attr '{key}' of kind '{spec.kind}'", reason="BAD_ATTR", subject=name
                )
            if spec.default is not None:
                attrs[key] = spec.default
    if op == "input":
        _check_input_attrs(name, attrs)
    return attrs


def _check_input_attrs(name: str, attrs: dict[str, Any]) -> None:
    dtype = attrs.get("dtype")
    if dtype is not None and dtype not in tensors.DTYPE_NAMES:
        raise InvalidArgument(
            f"node '{name}' (input) attr 'dtype' is '{shown(dtype)}'; expected one of {', '.join(tensors.DTYPE_NAMES)}",
            reason="BAD_ATTR",
            subject=name,
        )
    shape = attrs.get("shape")
    if shape is not None and any(dim < -1 for dim in shape):
        raise InvalidArgument(
            f"node '{name}' (input) attr 'shape' {list(shape)} has a size below -1", reason="BAD_ATTR", subject=name
        )


def _check_value(name: str, op: str, node: graph_pb2.Node, limits: Limits) -> np.ndarray | None:
    has_value = node.HasField("value")
    if op not in VALUED_SOURCES:
        if has_value:
            raise InvalidArgument(
                f"node '{name}' ({op}) has a value; only parameter, state and constant nodes take one",
                reason="UNEXPECTED_VALUE",
                subject=name,
            )
        return None
    if not has_value:
        raise InvalidArgument(f"node '{name}' ({op}) needs a value", reason="MISSING_VALUE", subject=name)
    try:
        value = tensors.decode(node.value, name, max_elements=limits.max_tensor_elements)
    except tensors.TensorTooLarge as error:
        raise ResourceExhausted(str(error), reason="TENSOR_TOO_LARGE", subject=name) from None
    except tensors.TensorError as error:
        raise InvalidArgument(str(error), reason="BAD_TENSOR", subject=name) from None
    if op in STORED_SOURCES and not np.issubdtype(value.dtype, np.floating):
        raise InvalidArgument(
            f"node '{name}' ({op}) has dtype {value.dtype}; {op} nodes must be float32 or float64",
            reason="BAD_TENSOR",
            subject=name,
        )
    return value


def _check_acyclic(graph: nx.DiGraph) -> None:
    if nx.is_directed_acyclic_graph(graph):
        return
    cycle = [edge[0] for edge in nx.find_cycle(graph)]
    path = [f"'{shown(name, CYCLE_NAME_CHARACTERS)}'" for name in cycle[:CYCLE_NODES_SHOWN]]
    if len(cycle) > CYCLE_NODES_SHOWN:
        path.append(f"... ({len(cycle) - CYCLE_NODES_SHOWN:,} more)")
    path.append(path[0])
    raise InvalidArgument(
        f"graph has a cycle of {len(cycle):,} node{'s' if len(cycle) > 1 else ''}: {' -> '.join(path)}",
        reason="CYCLE",
        subject=cycle[0],
    )


def source_type(op: str, attrs: Mapping[str, Any], value: np.ndarray | None) -> TensorType:
    if value is not None:
        return TensorType(value.dtype, value.shape)
    dtype = attrs.get("dtype")
    shape = attrs.get("shape")
    return TensorType(
        None if dtype is None else np.dtype(dtype),
        None if shape is None else tuple(None if dim == -1 else dim for dim in shape),
    )


def _infer_types(
    names: list[str],
    ops: list[str],
    args: list[tuple[int, ...]],
    attrs: list[Mapping[str, Any]],
    values: dict[int, np.ndarray],
    limits: Limits,
    stop: StopFlag,
) -> list[TensorType]:
    """Every node's static type, in topological order; a node whose known shape exceeds the element
    limit is refused. A shape rule is a function of the op, its attrs and its argument types, all
    shared objects here, so it runs once per distinct combination of them."""
    types: list[TensorType] = []
    shared: dict[TensorType, TensorType] = {}
    inferred: dict[tuple, TensorType] = {}
    for slot, op in enumerate(ops):
        if stop.stopped:
            raise stopped(f"inferring the shape of node {slot:,} of {len(ops):,}")
        value = values.get(slot)
        if value is not None:
            known = TensorType(value.dtype, value.shape)
            types.append(shared.setdefault(known, known))
            continue
        arguments = args[slot]
        key = (op, id(attrs[slot]), *[id(types[argument]) for argument in arguments])
        known = inferred.get(key)  # type: ignore[assignment]
        if known is None:
            known = _infer_type(names[slot], op, [types[argument] for argument in arguments], attrs[slot], limits)
            known = inferred[key] = shared.setdefault(known, known)
        types.append(known)
    return types


def _infer_type(
    name: str, op: str, arguments: list[TensorType], attrs: Mapping[str, Any], limits: Limits
) -> TensorType:
    if OPS[op].infer is None:
        return source_type(op, attrs, None)
    known = infer_node(name, op, arguments, attrs)
    if known.is_known:
        elements = 1
        for dim in known.shape:  # type: ignore[union-attr]
            elements *= dim  # type: ignore[operator]
        if elements > limits.max_tensor_elements:
            raise ResourceExhausted(
                f"node '{name}' ({op}) would hold {elements:,} elements, more than the limit of "
                f"{limits.max_tensor_elements:,}",
                reason="TENSOR_TOO_LARGE",
                subject=name,
            )
    return known


def infer_node(name: str, op: str, arguments: list[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    infer = OPS[op].infer
    assert infer is not None
    try:
        return infer(*arguments, **attrs)
    except ShapeError as error:
        raise InvalidArgument(f"node '{name}' ({op}): {error}", reason=error.reason, subject=name) from None
