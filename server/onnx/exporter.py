"""A chainrule graph with its current parameters and state -> a serialized ONNX ModelProto (opset 21).

Each node becomes the ONNX value of the same name: sources become graph inputs (`input`) and
initializers (`parameter`, `state` with their current values, `constant`), every other node one
ONNX node (or a few, named `<node>#<role>`) through `EXPORTS`. Attrs that ONNX takes as inputs
(shapes, axes, pads) become int64 initializers. Where numpy promotes dtypes (int / int is float,
float32 + float64 is float64) and ONNX does not, Casts make the ONNX model compute what the
chainrule graph computes. The model is checked with onnx.checker (full_check) before it is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper

from chainrule import tensors
from chainrule.server.errors import ChainruleError, InvalidArgument, ResourceExhausted
from chainrule.server.graph import Limits, infer_node, source_type
from chainrule.server.ops import OPS, SOURCE_OPS
from chainrule.v1 import graph_pb2

EXPORT_OPSET = 21
MAX_MODEL_BYTES = (2 << 30) - (64 << 20)
"""Protobuf's 2 GiB limit on one message, less room for everything but the initializers."""
ONNX_ELEMENT = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.bool_): TensorProto.BOOL,
}
MARK = "#"

Node = Mapping[str, Any]
"""A node as the exporter reads it: op, inputs, attrs (defaults filled in), value, type."""


def export_model(
    definition: graph_pb2.Graph, values: Mapping[str, np.ndarray], outputs: Sequence[str], limits: Limits | None = None
) -> bytes:
    """The graph as ONNX; `values` are the current parameters and state, `outputs` the nodes to
    export (empty: every computed node no other node reads)."""
    fields, graph = _read(definition, limits or Limits())
    wanted = list(outputs) or _unread(fields, graph)
    for name in wanted:
        if name not in fields:
            raise InvalidArgument(f"output '{name}' names no node of the graph", reason="UNKNOWN_NODE", subject=name)
    if len(set(wanted)) != len(wanted):
        repeated = next(name for name in wanted if wanted.count(name) > 1)
        raise InvalidArgument(f"outputs names '{repeated}' twice", reason="DUPLICATE_OUTPUT", subject=repeated)
    needed: set[str] = set(wanted)
    for name in wanted:
        needed |= nx.ancestors(graph, name)
    exporter = Exporter(fields, values)
    for name in fields:  # in topological order
        if name in needed:
            exporter.node(name)
    exporter.check_size()
    onnx_graph = helper.make_graph(
        exporter.nodes,
        definition.name or "chainrule",
        exporter.inputs,
        [exporter.value_info(name) for name in wanted],
        exporter.initializers,
    )
    model = helper.make_model(
        onnx_graph, opset_imports=[helper.make_opsetid("", EXPORT_OPSET)], producer_name="chainrule"
    )
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ChainruleError(
            f"the exported model fails onnx.checker, which is a chainrule bug; please report it: {error}",
            reason="EXPORT_CHECK_FAILED",
        ) from None
    return model.SerializeToString()


def _read(definition: graph_pb2.Graph, limits: Limits) -> tuple[dict[str, Node], nx.DiGraph]:
    """Each node's op, argument names, attrs (defaults filled in), value and statically inferred type,
    by name in topological order; and the graph's edges. The definition was validated when it was
    stored, so this only reads it, with the registry's shape rules."""
    given = {node.name: node for node in definition.nodes}
    graph = nx.DiGraph()
    graph.add_nodes_from(given)
    graph.add_edges_from((argument, node.name) for node in definition.nodes for argument in node.inputs)
    fields: dict[str, Node] = {}
    for name in nx.topological_sort(graph):
        node = given[name]
        op = OPS[node.op]
        attrs = {key: _attr_value(node.attrs[key]) for key in node.attrs}
        attrs.update(
            {key: spec.default for key, spec in op.attrs.items() if key not in attrs and spec.default is not None}
        )
        value = tensors.decode(node.value, name, limits.max_tensor_elements) if node.HasField("value") else None
        if op.is_source:
            known = source_type(op.name, attrs, value)
        else:
            known = infer_node(name, op.name, [fields[argument]["type"] for argument in node.inputs], attrs)
        fields[name] = {"op": op.name, "inputs": tuple(node.inputs), "attrs": attrs, "value": value, "type": known}
    return fields, graph


def _attr_value(attr: graph_pb2.AttrValue) -> Any:
    kind = attr.WhichOneof("value")
    if kind is None:
        return None
    value = getattr(attr, kind)
    return tuple(value.values) if kind in ("ints", "floats") else value


def _unread(fields: Mapping[str, Node], graph: nx.DiGraph) -> list[str]:
    """Every computed node no other node reads (sources nobody reads are not results), in topological order."""
    unread = [name for name in fields if graph.out_degree(name) == 0]
    computed = [name for name in unread if fields[name]["op"] not in SOURCE_OPS]
    return computed or unread


class Exporter:
    def __init__(self, fields: Mapping[str, Node], values: Mapping[str, np.ndarray]) -> None:
        self.fields = fields
        self.values = values
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.dtypes: dict[str, np.dtype] = {}
        self.taken: set[str] = set(fields)
        self.initializer_bytes = 0

    # ------------------------------------------------------------ nodes
    def node(self, name: str) -> None:
        node = self.fields[name]
        op = node["op"]
        if op == "input":
            self._input(name, node)
        elif op in SOURCE_OPS:
            value = self.values.get(name, node["value"]) if op != "constant" else node["value"]
            self.initializer(name, np.asarray(value))
        else:
            rule = EXPORTS.get(op)
            if rule is None:
                raise InvalidArgument(
                    f"node '{name}' ({op}) has no ONNX equivalent, so the graph cannot be exported",
                    reason="NO_ONNX_EQUIVALENT",
                    subject=name,
                )
            dtype = node["type"].dtype
            if dtype is None:
                raise InvalidArgument(
                    f"node '{name}' ({op}) has no known dtype; declare the dtype of the inputs it depends on",
                    reason="UNKNOWN_DTYPE",
                    subject=name,
                )
            self.dtypes[name] = dtype
            rule(self, name, node)

    def _input(self, name: str, node: Node) -> None:
        dtype = node["type"].dtype
        if dtype is None:
            raise InvalidArgument(
                f"input '{name}' declares no dtype; an ONNX model's inputs need one",
                reason="UNKNOWN_DTYPE",
                subject=name,
            )
        self.dtypes[name] = dtype
        self.inputs.append(self.value_info(name))

    def value_info(self, name: str) -> onnx.ValueInfoProto:
        known = self.fields[name]["type"]
        shape = None if known.shape is None else list(known.shape)
        return helper.make_tensor_value_info(name, ONNX_ELEMENT[self.dtypes[name]], shape)

    def check_size(self) -> None:
        if self.initializer_bytes > MAX_MODEL_BYTES:
            raise ResourceExhausted(
                f"the graph's parameters and constants take {self.initializer_bytes:,} bytes; an ONNX model "
                "over 2 GiB needs external data files, which ExportOnnx does not write",
                reason="MODEL_TOO_LARGE",
            )

    # ------------------------------------------------------------ what rules use
    def helper_name(self, base: str, role: str) -> str:
        name = candidate = f"{base}{MARK}{role}"
        count = 1
        while candidate in self.taken:
            count += 1
            candidate = f"{name}{count}"
        self.taken.add(candidate)
        return candidate

    def initializer(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(onnx.numpy_helper.from_array(value, name))
        self.initializer_bytes += value.nbytes
        self.dtypes[name] = value.dtype
        return name

    def constant(self, base: str, role: str, value: Any, dtype: Any) -> str:
        return self.initializer(self.helper_name(base, role), np.asarray(value, dtype=dtype))

    def add(self, op_type: str, inputs: Sequence[str], output: str, dtype: np.dtype, **attributes: Any) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attributes))
        self.dtypes[output] = np.dtype(dtype)
        return output

    def step(
        self, base: str, role: str, op_type: str, inputs: Sequence[str], dtype: np.dtype, **attributes: Any
    ) -> str:
        """An intermediate ONNX node the exporter adds, named `<base>#<role>`."""
        return self.add(op_type, inputs, self.helper_name(base, role), dtype, **attributes)

    def cast(self, value: str, dtype: np.dtype, base: str) -> str:
        """`value` in `dtype`, through a Cast when it is not already."""
        if self.dtypes[value] == dtype:
            return value
        return self.step(base, f"{value}_as_{dtype}", "Cast", [value], dtype, to=ONNX_ELEMENT[np.dtype(dtype)])


# ---------------------------------------------------------------- rule kinds
Rule = Callable[[Exporter, str, Node], None]


def _onnx_attribute(kind: str, value: Any) -> Any:
    if kind == "b":
        return int(value)
    if kind in ("ints", "floats"):
        return list(value)
    return value


@dataclass(frozen=True)
class Same:
    """A native op that is one ONNX op: attrs by the same names; `inputs` names the attrs ONNX takes
    as (int64) inputs, after the data arguments, in order; `promote` which data arguments are cast
    to the node's dtype ("out") or to their common dtype ("joint") first."""

    onnx_op: str
    inputs: tuple[str, ...] = ()
    promote: str = ""
    promoted: tuple[int, ...] | None = None
    """The data positions `promote` applies to (None: all)."""
    scalar_inputs: frozenset[str] = frozenset()
    """Attrs of `inputs` that are 0-d tensors in ONNX (CumSum's axis)."""

    def __call__(self, ex: Exporter, name: str, node: Node) -> None:
        op = OPS[node["op"]]
        arguments = list(node["inputs"])
        data_count = len(arguments) if not self.inputs else op.min_arity
        data, trailing = arguments[:data_count], arguments[data_count:]
        data = _promoted(ex, name, data, self.promote, self.promoted)
        onnx_inputs = list(data)
        attrs = node["attrs"]
        for index, key in enumerate(self.inputs):
            if index < len(trailing):
                onnx_inputs.append(trailing[index])
            elif attrs.get(key) is not None:
                value = np.asarray(attrs[key], np.int64)
                onnx_inputs.append(
                    ex.constant(name, key, value.reshape(()) if key in self.scalar_inputs else value, np.int64)
                )
            else:
                onnx_inputs.append("")
        while onnx_inputs and not onnx_inputs[-1]:
            onnx_inputs.pop()
        attributes = {
            key: _onnx_attribute(op.attrs[key].kind, value)
            for key, value in attrs.items()
            if key not in self.inputs and value is not None
        }
        ex.add(self.onnx_op, onnx_inputs, name, ex.dtypes[name], **attributes)


def _promoted(ex: Exporter, name: str, data: list[str], promote: str, positions: tuple[int, ...] | None) -> list[str]:
    """`data` with the chosen positions cast to the node's dtype ("out") or to their common dtype ("joint")."""
    if not promote:
        return data
    chosen = range(len(data)) if positions is None else [p for p in positions if p < len(data)]
    if promote == "out":
        target = ex.dtypes[name]
    else:
        target = np.result_type(*[ex.dtypes[data[p]] for p in chosen])
    return [ex.cast(value, target, name) if p in chosen else value for p, value in enumerate(data)]


# ---------------------------------------------------------------- rules that are more than one ONNX op
def _cast(ex: Exporter, name: str, node: Node) -> None:
    (x,) = node["inputs"]
    ex.add("Cast", [x], name, ex.dtypes[name], to=ONNX_ELEMENT[ex.dtypes[name]])


def _reduce(onnx_op: str) -> Rule:
    def rule(ex: Exporter, name: str, node: Node) -> None:
        x, *axes_tensor = node["inputs"]
        attrs = node["attrs"]
        x = ex.cast(x, ex.dtypes[name], name)
        inputs = [x]
        extra: dict[str, Any] = {}
        if axes_tensor:
            inputs.append(axes_tensor[0])
        elif attrs.get("axes") is not None:
            axes = np.asarray(attrs["axes"], np.int64)
            inputs.append(ex.constant(name, "axes", axes, np.int64))
            if axes.size == 0:
                extra["noop_with_empty_axes"] = 1
        ex.add(onnx_op, inputs, name, ex.dtypes[name], keepdims=int(attrs["keepdims"]), **extra)

    return rule


def _split(ex: Exporter, name: str, node: Node) -> None:
    x, *sizes = node["inputs"]
    attrs = node["attrs"]
    inputs = [x]
    attributes: dict[str, Any] = {"axis": attrs["axis"]}
    if sizes:
        inputs.append(sizes[0])
        known = ex.fields[sizes[0]]["type"].shape
        if known is None or known[0] is None:
            raise InvalidArgument(
                f"node '{name}' (split): the number of pieces is not known statically",
                reason="NO_ONNX_EQUIVALENT",
                subject=name,
            )
        count = known[0]
    elif attrs.get("splits") is not None:
        inputs.append(ex.constant(name, "splits", attrs["splits"], np.int64))
        count = len(attrs["splits"])
    else:
        count = attrs["num_outputs"]
        attributes["num_outputs"] = count
    index = attrs["index"]
    outputs = [name if piece == index else ex.helper_name(name, f"piece{piece}") for piece in range(count)]
    ex.nodes.append(helper.make_node("Split", inputs, outputs, **attributes))
    for output in outputs:
        ex.dtypes[output] = ex.dtypes[name]


def _pad(ex: Exporter, name: str, node: Node) -> None:
    x, *tensors = node["inputs"]
    attrs = node["attrs"]
    dtype = ex.dtypes[name]
    pads = tensors[0] if tensors else ex.constant(name, "pads", attrs["pads"], np.int64)
    inputs = [x, pads]
    if attrs["mode"] == "constant":
        value = (
            ex.cast(tensors[1], dtype, name) if len(tensors) > 1 else ex.constant(name, "value", attrs["value"], dtype)
        )
        inputs.append(value)
    ex.add("Pad", inputs, name, dtype, mode=attrs["mode"])


def _clip(ex: Exporter, name: str, node: Node) -> None:
    x, *bounds = node["inputs"]
    attrs = node["attrs"]
    dtype = ex.dtypes[name]
    inputs = [ex.cast(x, dtype, name)]
    for position, key in enumerate(("min", "max")):
        if position < len(bounds):
            inputs.append(ex.cast(bounds[position], dtype, name))
        elif attrs.get(key) is not None:
            inputs.append(ex.constant(name, key, attrs[key], dtype))
        else:
            inputs.append("")
    while inputs and not inputs[-1]:
        inputs.pop()
    ex.add("Clip", inputs, name, dtype)


def _one_hot(ex: Exporter, name: str, node: Node) -> None:
    """An int64 OneHot of 0s and 1s (int64 indices, depth and values: the kernel every runtime has;
    onnxruntime lacks most other type combinations), then Where picks the off and on values."""
    indices, *tensors = node["inputs"]
    attrs = node["attrs"]
    dtype = ex.dtypes[name]
    whole = np.dtype(np.int64)
    depth = ex.cast(tensors[0], whole, name) if tensors else ex.constant(name, "depth", attrs["depth"], np.int64)
    bits = ex.constant(name, "bits", [0, 1], np.int64)
    hot = ex.step(name, "hot", "OneHot", [ex.cast(indices, whole, name), depth, bits], whole, axis=attrs["axis"])
    mask = ex.step(name, "mask", "Cast", [hot], np.dtype(np.bool_), to=TensorProto.BOOL)
    if len(tensors) > 1:
        values = ex.cast(tensors[1], dtype, name)
        off = ex.step(name, "off", "Gather", [values, ex.constant(name, "off_index", 0, np.int64)], dtype, axis=0)
        on = ex.step(name, "on", "Gather", [values, ex.constant(name, "on_index", 1, np.int64)], dtype, axis=0)
    else:
        off = ex.constant(name, "off", attrs["off_value"], dtype)
        on = ex.constant(name, "on", attrs["on_value"], dtype)
    ex.add("Where", [mask, on, off], name, dtype)


def _dropout(ex: Exporter, name: str, node: Node) -> None:
    """A Dropout without training_mode: the identity in any runtime, as Forward's inference mode."""
    (x,) = node["inputs"]
    ratio = ex.constant(name, "ratio", node["attrs"]["ratio"], np.float32)
    ex.add("Dropout", [x, ratio], name, ex.dtypes[name])


def _pool(onnx_op: str) -> Rule:
    """ceil_mode as PyTorch has it: a last window that would start in the end padding is dropped, which
    ONNX's opset 21 does not do. Where that leaves the floor's output size, the export says ceil_mode 0."""
    same = Same(onnx_op)

    def rule(ex: Exporter, name: str, node: Node) -> None:
        attrs = node["attrs"]
        if attrs.get("ceil_mode") and attrs.get("auto_pad", "NOTSET") == "NOTSET":
            size = ex.fields[node["inputs"][0]]["type"].shape
            out = ex.fields[name]["type"].shape
            if size is not None and out is not None and None not in size and None not in out:
                if list(out[2:]) == _floor_sizes(size[2:], attrs):
                    node = {**node, "attrs": {**attrs, "ceil_mode": False}}
        same(ex, name, node)

    return rule


def _floor_sizes(size: Sequence[int], attrs: Mapping[str, Any]) -> list[int]:
    rank = len(size)
    kernel = attrs["kernel_shape"]
    strides = attrs.get("strides") or [1] * rank
    dilations = attrs.get("dilations") or [1] * rank
    pads = attrs.get("pads") or [0] * (2 * rank)
    return [
        (size[axis] + pads[axis] + pads[axis + rank] - (kernel[axis] - 1) * dilations[axis] - 1) // strides[axis] + 1
        for axis in range(rank)
    ]


def _batch_norm(ex: Exporter, name: str, node: Node) -> None:
    attrs = node["attrs"]
    ex.add(
        "BatchNormalization",
        list(node["inputs"]),
        name,
        ex.dtypes[name],
        epsilon=attrs["epsilon"],
        momentum=1.0 - attrs["momentum"],
    )


def _layer_norm(ex: Exporter, name: str, node: Node) -> None:
    """ONNX's LayerNormalization needs a scale: ones of the normalized shape when the node has none."""
    x, *rest = node["inputs"]
    attrs = node["attrs"]
    dtype = ex.dtypes[name]
    if not rest:
        shape = ex.fields[x]["type"].shape
        axis = attrs["axis"]
        normalized = None if shape is None else shape[axis % len(shape) :]
        if normalized is None or None in normalized:
            raise InvalidArgument(
                f"node '{name}' (layer_norm) has no scale and the normalized shape is not known statically",
                reason="NO_ONNX_EQUIVALENT",
                subject=name,
            )
        rest = [ex.constant(name, "scale", np.ones(normalized), dtype)]
    ex.add("LayerNormalization", [x, *rest], name, dtype, axis=attrs["axis"], epsilon=attrs["epsilon"])


def _softmax_cross_entropy(ex: Exporter, name: str, node: Node) -> None:
    logits, labels = node["inputs"]
    dtype = ex.dtypes[name]
    if ex.dtypes[labels].kind in "iu":
        rank = ex.fields[logits]["type"].shape
        if rank is None:
            raise InvalidArgument(
                f"node '{name}' (softmax_cross_entropy): the rank of '{logits}' is not known",
                reason="NO_ONNX_EQUIVALENT",
                subject=name,
            )
        if len(rank) > 2:
            perm = [0, len(rank) - 1, *range(1, len(rank) - 1)]
            logits = ex.step(name, "classes_first", "Transpose", [logits], ex.dtypes[logits], perm=perm)
        ignore = node["attrs"]["ignore_index"]
        ex.add("SoftmaxCrossEntropyLoss", [logits, labels], name, dtype, reduction="mean", ignore_index=ignore)
        return
    labels = ex.cast(labels, dtype, name)
    log_p = ex.step(name, "log_softmax", "LogSoftmax", [ex.cast(logits, dtype, name)], dtype, axis=-1)
    weighted = ex.step(name, "weighted", "Mul", [labels, log_p], dtype)
    last = ex.constant(name, "classes", [-1], np.int64)
    per_row = ex.step(name, "per_row", "ReduceSum", [weighted, last], dtype, keepdims=0)
    negated = ex.step(name, "negated", "Neg", [per_row], dtype)
    ex.add("ReduceMean", [negated], name, dtype, keepdims=0)


def _sigmoid_cross_entropy(ex: Exporter, name: str, node: Node) -> None:
    """mean(relu(x) - x t + softplus(-|x|)): stable for logits of any size."""
    dtype = ex.dtypes[name]
    x, t = (ex.cast(value, dtype, name) for value in node["inputs"])
    positive = ex.step(name, "relu", "Relu", [x], dtype)
    product = ex.step(name, "xt", "Mul", [x, t], dtype)
    size = ex.step(name, "abs", "Abs", [x], dtype)
    negative = ex.step(name, "neg_abs", "Neg", [size], dtype)
    tail = ex.step(name, "softplus", "Softplus", [negative], dtype)
    difference = ex.step(name, "difference", "Sub", [positive, product], dtype)
    total = ex.step(name, "total", "Add", [difference, tail], dtype)
    ex.add("ReduceMean", [total], name, dtype, keepdims=0)


def _not_equal(ex: Exporter, name: str, node: Node) -> None:
    boolean = np.dtype(np.bool_)
    operands = _promoted(ex, name, list(node["inputs"]), "joint", None)
    ex.add("Not", [ex.step(name, "equal", "Equal", operands, boolean)], name, boolean)


def _square(ex: Exporter, name: str, node: Node) -> None:
    (x,) = node["inputs"]
    x = ex.cast(x, ex.dtypes[name], name)
    ex.add("Mul", [x, x], name, ex.dtypes[name])


def _log_sigmoid(ex: Exporter, name: str, node: Node) -> None:
    dtype = ex.dtypes[name]
    x = ex.cast(node["inputs"][0], dtype, name)
    flipped = ex.step(name, "neg", "Neg", [x], dtype)
    softplus = ex.step(name, "softplus", "Softplus", [flipped], dtype)
    ex.add("Neg", [softplus], name, dtype)


def _silu(ex: Exporter, name: str, node: Node) -> None:
    dtype = ex.dtypes[name]
    x = ex.cast(node["inputs"][0], dtype, name)
    gate = ex.step(name, "sigmoid", "Sigmoid", [x], dtype)
    ex.add("Mul", [x, gate], name, dtype)


# ---------------------------------------------------------------- the table
EXPORTS: dict[str, Rule] = {
    "cast": _cast,
    "reshape": Same("Reshape", inputs=("shape",)),
    "transpose": Same("Transpose"),
    "flatten": Same("Flatten"),
    "concat": Same("Concat", promote="out"),
    "split": _split,
    "slice": Same("Slice", inputs=("starts", "ends", "axes", "steps")),
    "gather": Same("Gather"),
    "gather_elements": Same("GatherElements"),
    "squeeze": Same("Squeeze", inputs=("axes",)),
    "unsqueeze": Same("Unsqueeze", inputs=("axes",)),
    "expand": Same("Expand", inputs=("shape",)),
    "tile": Same("Tile", inputs=("repeats",)),
    "pad": _pad,
    "shape": Same("Shape"),
    "one_hot": _one_hot,
    "argmax": Same("ArgMax"),
    "argmin": Same("ArgMin"),
    "cumsum": Same("CumSum", inputs=("axis",), scalar_inputs=frozenset({"axis"}), promote="out"),
    "einsum": Same("Einsum", promote="out"),
    "matmul": Same("MatMul", promote="out"),
    "add": Same("Add", promote="out"),
    "sub": Same("Sub", promote="out"),
    "mul": Same("Mul", promote="out"),
    "div": Same("Div", promote="out"),
    "pow": Same("Pow", promote="out"),
    "maximum": Same("Max", promote="out"),
    "minimum": Same("Min", promote="out"),
    "prelu": Same("PRelu", promote="out"),
    "equal": Same("Equal", promote="joint"),
    "not_equal": _not_equal,
    "less": Same("Less", promote="joint"),
    "less_equal": Same("LessOrEqual", promote="joint"),
    "greater": Same("Greater", promote="joint"),
    "greater_equal": Same("GreaterOrEqual", promote="joint"),
    "logical_and": Same("And"),
    "logical_or": Same("Or"),
    "logical_xor": Same("Xor"),
    "logical_not": Same("Not"),
    "where": Same("Where", promote="out", promoted=(1, 2)),
    "clip": _clip,
    "sum": _reduce("ReduceSum"),
    "mean": _reduce("ReduceMean"),
    "max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"),
    "reduce_prod": _reduce("ReduceProd"),
    "reduce_l1": _reduce("ReduceL1"),
    "reduce_l2": _reduce("ReduceL2"),
    "reduce_sum_square": _reduce("ReduceSumSquare"),
    "logsumexp": _reduce("ReduceLogSumExp"),
    "conv": Same("Conv"),
    "conv_transpose": Same("ConvTranspose"),
    "max_pool": _pool("MaxPool"),
    "average_pool": _pool("AveragePool"),
    "global_average_pool": Same("GlobalAveragePool"),
    "global_max_pool": Same("GlobalMaxPool"),
    "batch_norm": _batch_norm,
    "layer_norm": _layer_norm,
    "instance_norm": Same("InstanceNormalization"),
    "group_norm": Same("GroupNormalization"),
    "lrn": Same("LRN"),
    "dropout": _dropout,
    "softmax": Same("Softmax", promote="out"),
    "log_softmax": Same("LogSoftmax", promote="out"),
    "softmax_cross_entropy": _softmax_cross_entropy,
    "sigmoid_cross_entropy": _sigmoid_cross_entropy,
    "square": _square,
    "log_sigmoid": _log_sigmoid,
    "silu": _silu,
}
for _native, _onnx in {
    "abs": "Abs",
    "neg": "Neg",
    "exp": "Exp",
    "log": "Log",
    "sqrt": "Sqrt",
    "tanh": "Tanh",
    "sigmoid": "Sigmoid",
    "relu": "Relu",
    "softplus": "Softplus",
    "erf": "Erf",
    "sin": "Sin",
    "cos": "Cos",
    "reciprocal": "Reciprocal",
    "floor": "Floor",
    "ceil": "Ceil",
    "round": "Round",
    "sign": "Sign",
    "selu": "Selu",
    "softsign": "Softsign",
    "leaky_relu": "LeakyRelu",
    "elu": "Elu",
    "gelu": "Gelu",
    "hard_sigmoid": "HardSigmoid",
    "isnan": "IsNaN",
    "isinf": "IsInf",
}.items():
    EXPORTS[_native] = Same(_onnx, promote="out" if _native not in ("isnan", "isinf") else "")
