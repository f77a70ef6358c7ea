"""An ONNX model -> a chainrule Graph message, one ONNX node at a time through the table in `table`.

Names. Every value the ONNX graph names becomes a node of exactly that name, so feeds, fetches,
`wrt` and parameter names are the ONNX names. Nodes the importer adds (the matmul inside a Gemm,
a transpose in front of a loss) are named `<onnx value>#<role>`, a form exporters do not
produce, and checked against every name in the model.

Sources. Graph inputs become `input` nodes with their dtype and shape (symbolic sizes -1). An
initializer becomes a `parameter` when it is a float tensor that some node reads as data; it
becomes `state` when batch normalization reads it as running statistics, and a `constant` when
`frozen` names it, when it is not float, or when every node reads it only as configuration (a
shape, axes, pads, a dropout ratio). An input that has an initializer is that initializer, as
the ONNX spec says for IR version 3 models.

Folding. A value is known at import time when it is a constant, or computed by a deterministic
node from known values (onnx's reference evaluator computes it then), or the shape of a value
whose shape onnx's shape inference knows. Known values feed the attrs of the native ops that
take shapes, axes and the like; unknown ones are passed as the trailing tensor arguments those
ops also accept, and run as ops.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.reference
from onnx import ModelProto, NodeProto, TensorProto

from chainrule import tensors
from chainrule.server.errors import InvalidArgument, ResourceExhausted
from chainrule.server.graph import Limits
from chainrule.server.onnx.model import MODEL_SUBJECT, ONNX_DOMAINS, element_type_name, onnx_opset, unsupported
from chainrule.server.onnx.worker import prepare_model
from chainrule.server.ops import OPS
from chainrule.v1 import graph_pb2

Dims = tuple[int | None, ...] | None
NAME_SHOWN_CHARACTERS = 40
"""How much of an ONNX node's name the list of unsupported ops quotes."""
HELPER_MARK = "#"
"""Joins an ONNX value's name and a role into the name of a node the importer adds."""
NEVER_FOLDED = frozenset(
    {
        "Dropout",
        "BatchNormalization",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Bernoulli",
        "Multinomial",
    }
)
"""Ops whose value depends on the call (training mode, random draws): never computed at import."""
SIZED_BY_INPUT = {"ConstantOfShape": 0, "Expand": 1, "Tile": 1}
"""Ops whose output size a known input sets (Tile's with its data): checked against --max-tensor-elements
before they are computed at import time."""
WIRE_DTYPE_OF_ONNX: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
    TensorProto.INT32: "int32",
    TensorProto.INT64: "int64",
    TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class ValueType:
    """What onnx knows statically about a value: its dtype and shape (None: unknown size or rank)."""

    dtype: np.dtype | None
    shape: Dims

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(size is not None for size in self.shape)


@dataclass(frozen=True)
class Imported:
    graph: graph_pb2.Graph
    outputs: list[str]


def import_model(data: bytes, name: str = "", frozen: Sequence[str] = (), limits: Limits | None = None) -> Imported:
    """Parse, check and map a serialized ONNX model (onnx's C++ parts run in a worker process, see
    `worker`); the caller stores the graph."""
    model = prepare_model(data)
    try:
        return Importer(model, frozen, limits or Limits()).run(name)
    except UnicodeDecodeError as error:  # protobuf parses proto2 strings lazily: a bad one fails when read
        raise InvalidArgument(
            f"the model holds a string that is not valid UTF-8 ({error.reason} at byte {error.start})",
            reason="BAD_ONNX_MODEL",
            subject=MODEL_SUBJECT,
        ) from None


def value_type(value: onnx.ValueInfoProto) -> ValueType:
    if value.type.WhichOneof("value") != "tensor_type":
        return ValueType(None, None)
    tensor = value.type.tensor_type
    dtype = _np_dtype(tensor.elem_type) if tensor.elem_type else None
    if not tensor.HasField("shape"):
        return ValueType(dtype, None)
    return ValueType(dtype, tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim))


def _np_dtype(elem_type: int) -> np.dtype | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def _on_the_wire(dtype: np.dtype) -> bool:
    try:
        tensors.wire_dtype(dtype)
    except tensors.TensorError:
        return False
    return True


def node_label(node: NodeProto) -> str:
    """How messages name an ONNX node: its name, else its first output."""
    return node.name or next((output for output in node.output if output), node.op_type)


class Importer:
    """The state of one import, and what the table's rules use to emit chainrule nodes."""

    def __init__(self, model: ModelProto, frozen: Sequence[str], limits: Limits) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = onnx_opset(model)
        self.limits = limits
        self.frozen = set(frozen)
        self.initializers = {tensor.name: tensor for tensor in self.graph.initializer}
        self.types: dict[str, ValueType] = {}
        for value in (*self.graph.input, *self.graph.value_info, *self.graph.output):
            self.types[value.name] = value_type(value)
        for tensor in self.graph.initializer:
            self.types[tensor.name] = ValueType(_np_dtype(tensor.data_type), tuple(tensor.dims))
        self.onnx_names = set(self.types)
        for node in self.graph.node:
            self.onnx_names.update(node.output)
        self.consumers = Counter(name for node in self.graph.node for name in node.input if name)
        self.graph_outputs = [output.name for output in self.graph.output]
        self.known: dict[str, np.ndarray] = {}
        self.nodes: dict[str, graph_pb2.Node] = {}
        self.read: set[str] = set()
        self.unsupported: dict[str, str] = {}
        self.node: NodeProto | None = None
        """The ONNX node being mapped, which errors name."""

    # ------------------------------------------------------------ the walk
    def run(self, name: str) -> Imported:
        from chainrule.server.onnx.table import TABLE

        self._check_frozen()
        self._sources(TABLE)
        for node in self.graph.node:
            self.node = node
            if self._fold(node):
                continue
            rule = TABLE.get(node.op_type) if node.domain in ONNX_DOMAINS else None
            if rule is None or not rule.available():
                label = node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}.{node.op_type}"
                self.unsupported.setdefault(label, node_label(node))
                continue
            rule.apply(self, node)
        self.node = None
        if self.unsupported:
            raise unsupported_ops(self.unsupported)
        self._emit_known()
        for output in self.graph_outputs:
            if output not in self.nodes:
                raise unsupported(f"graph output '{output}' is not a value chainrule computes", output)
        graph = graph_pb2.Graph(name=name or self.graph.name, nodes=list(self.nodes.values()))
        return Imported(graph, list(self.graph_outputs))

    def _check_frozen(self) -> None:
        for frozen in sorted(self.frozen):
            if frozen not in self.initializers:
                raise InvalidArgument(
                    f"frozen names '{frozen}', which is not an initializer of the model",
                    reason="UNKNOWN_INITIALIZER",
                    subject=frozen,
                )

    def _sources(self, table: Mapping[str, Any]) -> None:
        """Graph inputs, then initializers, classified by how the nodes read them."""
        config_only: dict[str, bool] = {}
        running_statistics: set[str] = set()
        for node in self.graph.node:
            rule = table.get(node.op_type) if node.domain in ONNX_DOMAINS else None
            configuration = rule.config if rule is not None else frozenset()
            for position, name in enumerate(node.input):
                if name in self.initializers:
                    config_only[name] = config_only.get(name, True) and position in configuration
                    if node.op_type == "BatchNormalization" and position in (3, 4):
                        running_statistics.add(name)
        for value in self.graph.input:
            if value.name not in self.initializers:
                self._input(value)
        for tensor in self.graph.initializer:
            array = onnx.numpy_helper.to_array(tensor)
            if tensor.name in self.frozen or array.dtype.kind != "f":
                self.known[tensor.name] = array
            elif tensor.name in running_statistics:
                self._emit_source(tensor.name, "state", array)
            elif config_only.get(tensor.name, False) and tensor.name not in self.graph_outputs:
                self.known[tensor.name] = array
            else:
                self._emit_source(tensor.name, "parameter", array)

    def _input(self, value: onnx.ValueInfoProto) -> None:
        known = self.types[value.name]
        elem_type = value.type.tensor_type.elem_type
        dtype = WIRE_DTYPE_OF_ONNX.get(elem_type)
        if dtype is None:
            raise unsupported(
                f"graph input '{value.name}' has element type {element_type_name(elem_type)}; chainrule inputs are "
                f"{', '.join(WIRE_DTYPE_OF_ONNX.values())}",
                value.name,
            )
        node = graph_pb2.Node(name=value.name, op="input")
        node.attrs["dtype"].s = dtype
        if known.shape is not None:
            node.attrs["shape"].ints.values.extend(-1 if size is None else size for size in known.shape)
        self._add(node)

    def _emit_source(self, name: str, op: str, value: np.ndarray) -> None:
        node = graph_pb2.Node(name=name, op=op)
        node.value.CopyFrom(self._encode(value, name))
        self._add(node)

    def _encode(self, value: np.ndarray, name: str) -> Any:
        try:
            return tensors.encode(value, name)
        except tensors.TensorError:
            raise unsupported(
                f"value '{name}' has dtype {value.dtype}; chainrule tensors are {', '.join(tensors.DTYPE_NAMES)}",
                name,
            ) from None

    def _emit_known(self) -> None:
        """Every known value the ONNX graph names becomes a constant node of that name (the values the
        importer made into attrs included, so they can still be fetched by name)."""
        for name, value in self.known.items():
            if name in self.nodes:
                continue
            if not _on_the_wire(value.dtype):
                if name in self.read or name in self.graph_outputs:
                    self._encode(value, name)  # raises, naming the value and its dtype
                continue
            self._emit_source(name, "constant", value)

    # ------------------------------------------------------------ folding
    def _fold(self, node: NodeProto) -> bool:
        """Compute the node now when its inputs are known; True when it was."""
        if node.domain not in ONNX_DOMAINS or node.op_type in NEVER_FOLDED:
            return False
        if node.op_type in ("Shape", "Size") and node.input[0] not in self.known:
            return self._fold_shape(node)
        if not all(name in self.known for name in node.input if name):
            return False
        self._check_fold_size(node)
        try:
            evaluator = onnx.reference.ReferenceEvaluator(node, opsets={"": self.opset})
            results = evaluator.run(None, {name: self.known[name] for name in node.input if name})
        except Exception:  # the op is mapped instead, and a real problem is then reported by name
            return False
        for output, result in zip(node.output, results, strict=False):
            if output:
                self.known[output] = np.asarray(result)
        return True

    def _fold_shape(self, node: NodeProto) -> bool:
        known = self.type_of(node.input[0])
        if not known.is_static:
            return False
        shape = np.array(known.shape, dtype=np.int64)
        if node.op_type == "Size":
            self.known[node.output[0]] = np.array(np.prod(shape), dtype=np.int64)
            return True
        attributes = self.attributes(node)
        start, end = attributes.get("start", 0), attributes.get("end", len(shape))
        self.known[node.output[0]] = shape[start:end]
        return True

    def _check_fold_size(self, node: NodeProto) -> None:
        position = SIZED_BY_INPUT.get(node.op_type)
        if position is None or position >= len(node.input):
            return
        sizes = self.known[node.input[position]]
        if sizes.dtype.kind in "iu" and sizes.size:
            elements = float(np.prod(np.abs(sizes.astype(np.float64))))
            if node.op_type == "Tile":
                elements *= self.known[node.input[0]].size
            self._check_elements(int(min(elements, 2.0**62)))

    def _check_elements(self, elements: int) -> None:
        if elements > self.limits.max_tensor_elements:
            label = node_label(self.node) if self.node is not None else MODEL_SUBJECT
            raise ResourceExhausted(
                f"node '{label}' would hold {elements:,} elements, more than the limit of "
                f"{self.limits.max_tensor_elements:,}",
                reason="TENSOR_TOO_LARGE",
                subject=label,
            )

    # ------------------------------------------------------------ what rules use
    def attributes(self, node: NodeProto) -> dict[str, Any]:
        return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}

    def value(self, name: str) -> np.ndarray | None:
        """The value of an ONNX value known at import time, or None."""
        return self.known.get(name) if name else None

    def type_of(self, name: str) -> ValueType:
        known = self.known.get(name)
        if known is not None:
            return ValueType(known.dtype, known.shape)
        return self.types.get(name, ValueType(None, None))

    def dtype_name(self, name: str) -> str:
        """The wire dtype name of an ONNX value, which the node being mapped needs."""
        dtype = self.type_of(name).dtype
        if dtype is None:
            raise self.refuse(f"the dtype of '{name}' is not known (onnx's shape inference gives none)")
        try:
            return tensors.dtype_name(dtype)
        except (KeyError, tensors.TensorError):
            raise self.refuse(f"'{name}' has dtype {dtype}, which chainrule tensors do not have") from None

    def arg(self, name: str) -> str:
        """The chainrule node holding ONNX value `name`, as an argument of the node being emitted."""
        self.read.add(name)
        return name

    def helper(self, base: str, role: str) -> str:
        """A fresh name for a node the importer adds, which no ONNX value has."""
        name = f"{base}{HELPER_MARK}{role}"
        candidate, count = name, 1
        while candidate in self.onnx_names or candidate in self.nodes:
            count += 1
            candidate = f"{name}{count}"
        return candidate

    def constant(self, base: str, role: str, value: np.ndarray) -> str:
        """An importer-added constant node."""
        name = self.helper(base, role)
        self._emit_source(name, "constant", np.asarray(value))
        return name

    def emit(self, name: str, op: str, inputs: Sequence[str], attrs: Mapping[str, Any] | None = None) -> str:
        node = graph_pb2.Node(name=name, op=op, inputs=list(inputs))
        for key, value in (attrs or {}).items():
            set_attr(node.attrs[key], OPS[op].attrs[key].kind, value)
        self._add(node)
        return name

    def is_used(self, name: str) -> bool:
        return bool(name) and (self.consumers[name] > 0 or name in self.graph_outputs)

    def refuse(self, message: str) -> InvalidArgument:
        assert self.node is not None
        label = node_label(self.node)
        return unsupported(f"node '{label}' ({self.node.op_type}): {message}", label)

    def _add(self, node: graph_pb2.Node) -> None:
        if node.name in self.nodes:
            raise InvalidArgument(f"the model defines '{node.name}' twice", reason="BAD_ONNX_MODEL", subject=node.name)
        self.nodes[node.name] = node


def set_attr(attr: graph_pb2.AttrValue, kind: str, value: Any) -> None:
    if kind == "ints":
        attr.ints.values.extend(int(v) for v in value)
    elif kind == "floats":
        attr.floats.values.extend(float(v) for v in value)
    elif kind == "b":
        attr.b = bool(value)
    elif kind == "i":
        attr.i = int(value)
    elif kind == "f":
        attr.f = float(value)
    else:
        attr.s = str(value)


def unsupported_ops(first_users: Mapping[str, str]) -> InvalidArgument:
    """Every op type first, then the node that first uses each, its name shortened: an error's
    message is cut to what gRPC's trailers carry, and long node names must not push op types out."""
    types = ", ".join(first_users)
    users = ", ".join(f"{op} by node '{shortened(node)}'" for op, node in first_users.items())
    return InvalidArgument(
        f"the model uses {len(first_users)} ONNX op(s) chainrule does not cover: {types}; first used: {users}",
        reason="UNSUPPORTED_ONNX_OP",
        subject=next(iter(first_users.values())),
    )


def shortened(name: str) -> str:
    """A name as error messages quote it: at most NAME_SHOWN_CHARACTERS, the cut marked."""
    return name if len(name) <= NAME_SHOWN_CHARACTERS else name[: NAME_SHOWN_CHARACTERS - 3] + "..."
