"""A `chainrule.v1.Graph` message -> a validated, shape-checked `networkx.DiGraph`.

Nodes are keyed by name and carry `op`, `inputs` (argument order, repeats kept), `attrs`
(Python values with defaults filled in), `value` (parameters and constants) and `type`
(the statically inferred TensorType). Edges run from each argument to its consumer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from chainrule import tensors
from chainrule.server.errors import CONTROL_CHARACTER, InvalidArgument, ResourceExhausted, check_name, shown
from chainrule.server.ops import OPS, STORED_SOURCES, Attr
from chainrule.server.shapes import ShapeError, TensorType
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


def build_graph(message: graph_pb2.Graph, limits: Limits | None = None) -> nx.DiGraph:
    limits = limits or Limits()
    if not message.nodes:
        raise InvalidArgument("graph has no nodes", reason="EMPTY_GRAPH", subject="graph.nodes")
    if len(message.nodes) > limits.max_nodes:
        raise ResourceExhausted(
            f"graph has {len(message.nodes)} nodes, more than the limit of {limits.max_nodes}",
            reason="TOO_MANY_NODES",
            subject="graph.nodes",
        )
    check_name(message.name, "graph.name", limits.max_name_length)
    graph = nx.DiGraph(name=message.name)
    for node in message.nodes:
        name, attributes = _check_node(node, limits)
        if name in graph:
            raise InvalidArgument(f"node '{name}' is defined twice", reason="DUPLICATE_NODE", subject=name)
        graph.add_node(name, **attributes)
    edges = []
    for name, inputs in graph.nodes(data="inputs"):
        for argument in inputs:
            if argument not in graph:
                check_name(argument, f"node '{shown(name)}' input", limits.max_name_length, subject=name)
                raise InvalidArgument(
                    f"node '{name}' names input '{shown(argument)}', which is not a node of the graph",
                    reason="UNKNOWN_INPUT",
                    subject=name,
                )
            edges.append((argument, name))
    graph.add_edges_from(edges)
    _check_acyclic(graph)
    order = list(nx.topological_sort(graph))
    graph.graph["order"] = order
    _infer_types(graph, order, limits)
    return graph


def _check_node(node: graph_pb2.Node, limits: Limits) -> tuple[str, dict[str, Any]]:
    name = node.name
    if not name:
        raise InvalidArgument(f"a node with op '{node.op}' has an empty name", reason="EMPTY_NAME", subject="name")
    if len(name) > limits.max_name_length or CONTROL_CHARACTER.search(name):
        check_name(name, "node name", limits.max_name_length, subject=shown(name))
    op = OPS.get(node.op)
    if op is None:
        raise InvalidArgument(f"node '{name}' has unknown op '{shown(node.op)}'", reason="UNKNOWN_OP", subject=name)
    if not op.takes(len(node.inputs)):
        raise InvalidArgument(
            f"node '{name}' ({op.name}) takes {op.arity_text()} input(s), got {len(node.inputs)}",
            reason="WRONG_ARITY",
            subject=name,
        )
    if len(node.attrs) > limits.max_attrs_per_node:
        raise InvalidArgument(
            f"node '{name}' has {len(node.attrs)} attrs, more than the limit of {limits.max_attrs_per_node}",
            reason="TOO_MANY_ATTRS",
            subject=name,
        )
    attrs = _check_attrs(name, op.name, op.attrs, node.attrs, limits)
    value = _check_value(name, op.name, node, limits)
    return name, {"op": op.name, "inputs": tuple(node.inputs), "attrs": attrs, "value": value}


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


def _infer_types(graph: nx.DiGraph, order: list[str], limits: Limits) -> None:
    """Give every node its static type; refuse a node whose known shape exceeds the element limit."""
    nodes = graph.nodes
    for name in order:
        node = nodes[name]
        op = OPS[node["op"]]
        if op.infer is None:
            node["type"] = source_type(node["op"], node["attrs"], node["value"])
            continue
        arguments = [nodes[argument]["type"] for argument in node["inputs"]]
        known = infer_node(name, node["op"], arguments, node["attrs"])
        node["type"] = known
        if known.is_known:
            elements = 1
            for dim in known.shape:  # type: ignore[union-attr]
                elements *= dim  # type: ignore[operator]
            if elements > limits.max_tensor_elements:
                raise ResourceExhausted(
                    f"node '{name}' ({node['op']}) would hold {elements:,} elements, more than the limit of "
                    f"{limits.max_tensor_elements:,}",
                    reason="TENSOR_TOO_LARGE",
                    subject=name,
                )


def infer_node(name: str, op: str, arguments: list[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    infer = OPS[op].infer
    assert infer is not None
    try:
        return infer(*arguments, **attrs)
    except ShapeError as error:
        raise InvalidArgument(f"node '{name}' ({op}): {error}", reason=error.reason, subject=name) from None
