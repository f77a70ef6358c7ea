"""Reading an ONNX model for import: parse, refuse what chainrule cannot run, check, bring to the import opset.

Everything about the format is onnx's own: the protobuf parser, the checker, the inliner, the
version converter and shape inference. What is refused here is refused for the whole model,
before any node is mapped: external data, reduced-precision floats, control flow, sequences.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import onnx.inliner
import onnx.shape_inference
import onnx.version_converter
from google.protobuf.message import DecodeError
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto

from chainrule.server.errors import InvalidArgument

IMPORT_OPSET = 21
"""The opset the importer's table is written for; older models (opset 9 on) are converted to it first."""
OLDEST_OPSET = 9
BROADCASTING_PRELU_OPSET = 7
"""The first opset whose PRelu broadcasts its slope as numpy does (see per_channel_prelu_slopes)."""
ONNX_DOMAINS = ("", "ai.onnx")
CONTROL_FLOW = ("If", "Loop", "Scan")
SEQUENCE_OPS = (
    "SequenceConstruct",
    "SequenceEmpty",
    "SequenceAt",
    "SequenceInsert",
    "SequenceErase",
    "SequenceLength",
    "SequenceMap",
    "SplitToSequence",
    "ConcatFromSequence",
    "Optional",
    "OptionalGetElement",
    "OptionalHasElement",
)
REDUCED_FLOATS: dict[int, str] = {
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.FLOAT8E4M3FN: "float8e4m3fn",
    TensorProto.FLOAT8E4M3FNUZ: "float8e4m3fnuz",
    TensorProto.FLOAT8E5M2: "float8e5m2",
    TensorProto.FLOAT8E5M2FNUZ: "float8e5m2fnuz",
}
DTYPE_ATTRS = ("to", "dtype")
"""Node attributes that name an element type (Cast's `to`, EyeLike's and the random ops' `dtype`)."""
MODEL_SUBJECT = "model"


def element_type_name(elem_type: int) -> str:
    """TensorProto.DataType's name of an element type, or the number when it names none."""
    return TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else str(elem_type)


def unsupported(message: str, subject: str = MODEL_SUBJECT) -> InvalidArgument:
    return InvalidArgument(message, reason="UNSUPPORTED_ONNX_FEATURE", subject=subject)


def load_model(data: bytes) -> ModelProto:
    """The model parsed, checked, with its local functions inlined, and nothing in it chainrule refuses."""
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError) as error:
        raise InvalidArgument(
            f"model is not a serialized ONNX ModelProto: {error}", reason="BAD_ONNX_MODEL", subject=MODEL_SUBJECT
        ) from None
    refuse_external_data(model)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as error:
        raise InvalidArgument(
            f"model fails onnx.checker: {_first_line(error)}", reason="BAD_ONNX_MODEL", subject=MODEL_SUBJECT
        ) from None
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    refuse_unsupported_features(model)
    return model


def infer_types(model: ModelProto) -> ModelProto:
    """The model with onnx's inferred dtypes and shapes of its intermediate values in value_info."""
    return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)


def onnx_opset(model: ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ONNX_DOMAINS:
            return int(opset.version)
    raise InvalidArgument(
        "model imports no version of the ONNX operator set (opset_import has no entry for the default domain)",
        reason="BAD_ONNX_MODEL",
        subject=MODEL_SUBJECT,
    )


def convert_opset(model: ModelProto) -> ModelProto:
    """The model at IMPORT_OPSET, converted by onnx's version_converter when it is older."""
    version = onnx_opset(model)
    if version >= IMPORT_OPSET:
        return model
    if version < BROADCASTING_PRELU_OPSET:
        model = per_channel_prelu_slopes(model)
    try:
        return onnx.version_converter.convert_version(model, IMPORT_OPSET)
    except Exception as error:  # the converter raises bare RuntimeErrors and C++ assertion texts
        oldest = f" (models of opset {OLDEST_OPSET} or later are supported)" if version < OLDEST_OPSET else ""
        raise InvalidArgument(
            f"onnx.version_converter cannot bring this opset {version} model to opset {IMPORT_OPSET}{oldest}: "
            f"{_first_line(error)}",
            reason="BAD_ONNX_MODEL",
            subject=MODEL_SUBJECT,
        ) from None


def per_channel_prelu_slopes(model: ModelProto) -> ModelProto:
    """Before opset 7, PRelu applied a 1-D slope of C values per channel (axis 1 of an NCHW input),
    as the early PyTorch exporters wrote it; from opset 7 the slope broadcasts as numpy's does,
    against the last axis, and onnx's version converter leaves it as it is. So each such slope
    gets an Unsqueeze in front that shapes it (C, 1, ..., 1) before the model is converted; the
    slope itself, a parameter, keeps its shape."""
    shapes: dict[str, list[int | None]] = {}
    inferred = infer_types(model).graph
    for value in (*inferred.input, *inferred.value_info, *inferred.output):
        tensor = value.type.tensor_type
        if value.type.WhichOneof("value") == "tensor_type" and tensor.HasField("shape"):
            shapes[value.name] = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim]
    for initializer in model.graph.initializer:
        shapes[initializer.name] = list(initializer.dims)
    taken = set(shapes) | {name for node in model.graph.node for name in (*node.input, *node.output)}
    nodes: list[NodeProto] = []
    for node in model.graph.node:
        if node.op_type == "PRelu" and node.domain in ONNX_DOMAINS and len(node.input) == 2:
            data, slope = shapes.get(node.input[0]), shapes.get(node.input[1])
            if (
                data is not None
                and len(data) > 2
                and slope is not None
                and len(slope) == 1
                and slope[0] not in (None, 1)
                and data[1] in (None, slope[0])
            ):
                shaped = f"{node.input[1]}#per_channel"
                while shaped in taken:
                    shaped += "_"
                taken.add(shaped)
                axes = list(range(1, len(data) - 1))
                nodes.append(onnx.helper.make_node("Unsqueeze", [node.input[1]], [shaped], axes=axes))
                node.input[1] = shaped
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------- whole-model refusals
def refuse_external_data(model: ModelProto) -> None:
    for tensor, where in _tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL or tensor.external_data:
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "?")
            raise unsupported(
                f"{where} keeps its data in the external file '{location}'; chainrule imports self-contained "
                "models only (save with onnx.save_model(model, path, save_as_external_data=False))",
                tensor.name or where,
            )


def refuse_unsupported_features(model: ModelProto) -> None:
    """Reduced-precision floats, control flow and sequences, each named with where it is."""
    graph = model.graph
    for node in _nodes(graph):
        if node.op_type in CONTROL_FLOW and node.domain in ONNX_DOMAINS:
            raise unsupported(
                f"control flow is not supported: node '{_label(node)}' is an {node.op_type}", _label(node)
            )
        if any(attribute.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for attribute in node.attribute):
            raise unsupported(
                f"control flow is not supported: node '{_label(node)}' ({node.op_type}) has a subgraph", _label(node)
            )
        if node.op_type in SEQUENCE_OPS and node.domain in ONNX_DOMAINS:
            raise unsupported(
                f"sequences and optionals are not supported: node '{_label(node)}' is a {node.op_type}", _label(node)
            )
    for value, role in _value_infos(graph):
        kind = value.type.WhichOneof("value")
        if kind in ("sequence_type", "optional_type", "map_type", "sparse_tensor_type"):
            what = kind.removesuffix("_type").replace("_", " ")
            raise unsupported(f"{role} '{value.name}' is a {what}; chainrule imports dense tensors only", value.name)
        if kind == "tensor_type" and value.type.tensor_type.elem_type in REDUCED_FLOATS:
            dtype = REDUCED_FLOATS[value.type.tensor_type.elem_type]
            raise unsupported(_reduced_float_message(f"{role} '{value.name}'", dtype), value.name)
    for tensor, where in _tensors(model):
        if tensor.data_type in REDUCED_FLOATS:
            raise unsupported(_reduced_float_message(where, REDUCED_FLOATS[tensor.data_type]), tensor.name or where)
    for node in _nodes(graph):
        for attribute in node.attribute:
            if attribute.name in DTYPE_ATTRS and attribute.type == AttributeProto.INT and attribute.i in REDUCED_FLOATS:
                where = f"node '{_label(node)}' ({node.op_type}) attribute '{attribute.name}'"
                raise unsupported(_reduced_float_message(where, REDUCED_FLOATS[attribute.i]), _label(node))


def _reduced_float_message(where: str, dtype: str) -> str:
    return (
        f"{dtype} tensors are not supported: {where} is {dtype}; convert the model to float32 "
        "(e.g. export it from a float32 PyTorch module)"
    )


def _label(node: NodeProto) -> str:
    """How messages name an ONNX node: its name, else its first output."""
    return node.name or next((output for output in node.output if output), node.op_type)


def _nodes(graph: GraphProto) -> Iterator[NodeProto]:
    yield from graph.node


def _value_infos(graph: GraphProto) -> Iterator[tuple[onnx.ValueInfoProto, str]]:
    for value in graph.input:
        yield value, "graph input"
    for value in graph.output:
        yield value, "graph output"
    for value in graph.value_info:
        yield value, "value"


def _tensors(model: ModelProto) -> Iterator[tuple[TensorProto, str]]:
    graph = model.graph
    for tensor in graph.initializer:
        yield tensor, f"initializer '{tensor.name}'"
    for sparse in graph.sparse_initializer:
        yield sparse.values, f"sparse initializer '{sparse.values.name}'"
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: NodeProto) -> Iterator[tuple[TensorProto, str]]:
    for attribute in node.attribute:
        where = f"node '{_label(node)}' ({node.op_type}) attribute '{attribute.name}'"
        if attribute.type == AttributeProto.TENSOR:
            yield attribute.t, where
        elif attribute.type == AttributeProto.TENSORS:
            for tensor in attribute.tensors:
                yield tensor, where
        elif attribute.type == AttributeProto.SPARSE_TENSOR:
            yield attribute.sparse_tensor.values, where
