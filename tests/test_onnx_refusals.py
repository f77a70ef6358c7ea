"""What ImportOnnx and ExportOnnx refuse, and how: every refusal is INVALID_ARGUMENT (or
RESOURCE_EXHAUSTED for size) naming what is not supported, and the server keeps serving.
Also the names the importer gives, `frozen`, and the command line and Node.js clients."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnx.external_data_helper
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import chainrule.client as cr
from chainrule.v1 import graph_pb2
from chainrule.v1 import graph_service_pb2 as pb
from tests.server_process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def onnx_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    opset: int = 21,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def tensor(name: str, shape: list[int], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def linear(weight: np.ndarray, name: str = "linear") -> onnx.ModelProto:
    """y = x @ w + b, w and b initializers."""
    inputs, outputs = weight.shape
    return onnx_model(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        [tensor("x", ["batch", inputs])],
        [tensor("y", ["batch", outputs])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.zeros(outputs, np.float32), "b")],
    )


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address, timeout=60) as connected:
        yield connected


def refused(client: cr.Client, model: bytes | onnx.ModelProto, *fragments: str, **options: object) -> cr.ChainruleError:
    with pytest.raises(cr.ChainruleError) as raised:
        client.import_onnx(model, **options)  # type: ignore[arg-type]
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    for fragment in fragments:
        assert fragment in error.message, (fragment, error.message)
    return error


# ---------------------------------------------------------------- refusals
def test_every_unsupported_op_is_listed_with_its_first_node_in_one_answer(client: cr.Client) -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="fine"),
        helper.make_node("Mod", ["r", "x"], ["m1"], name="first_mod"),
        helper.make_node("Hardmax", ["m1"], ["h"], name="first_hardmax"),
        helper.make_node("Mod", ["h", "x"], ["m2"], name="second_mod"),
        helper.make_node("TopK", ["m2", "k"], ["values", "indices"], name="first_topk"),
    ]
    k = numpy_helper.from_array(np.array([1], np.int64), "k")
    model = onnx_model(nodes, [tensor("x", [2, 3])], [tensor("values", [2, 1])], [k])
    error = refused(
        client,
        model,
        "3 ONNX op(s) chainrule does not cover: Mod, Hardmax, TopK;",
        "Mod by node 'first_mod'",
        "Hardmax by node 'first_hardmax'",
        "TopK by node 'first_topk'",
    )
    assert error.reason == "UNSUPPORTED_ONNX_OP"
    assert "second_mod" not in error.message


UNCOVERED_UNARY_OPS = (
    *("Acos", "Asin", "Atan", "Tan", "Sinh", "Cosh"),
    *("Asinh", "Acosh", "Atanh", "Mish", "Celu", "Hardmax"),
)


def test_twelve_unsupported_ops_with_long_node_names_are_all_listed(client: cr.Client) -> None:
    """Node names of 250 four-byte characters: the op types come first and the quoted names are
    shortened, so that all twelve types fit within what gRPC lets an error carry."""
    nodes = []
    for index, op in enumerate(UNCOVERED_UNARY_OPS):
        name = f"{index:02d}" + "\U0001d52b" * 248  # 𝔫
        nodes.append(helper.make_node(op, [f"v{index}" if index else "x"], [f"v{index + 1}"], name=name))
    model = onnx_model(nodes, [tensor("x", [2, 3])], [tensor(f"v{len(nodes)}", [2, 3])])
    error = refused(client, model, f"{len(UNCOVERED_UNARY_OPS)} ONNX op(s) chainrule does not cover: ")
    assert error.reason == "UNSUPPORTED_ONNX_OP"
    listed = error.message.split("does not cover: ", 1)[1].split(";", 1)[0]
    assert listed.split(", ") == list(UNCOVERED_UNARY_OPS), error.message
    assert "Acos by node '00" + "\U0001d52b" * 10 in error.message


def test_external_data_is_refused_naming_the_file(client: cr.Client) -> None:
    model = linear(np.ones((3, 2), np.float32))
    onnx.external_data_helper.convert_model_to_external_data(model, location="weights.bin", size_threshold=0)
    error = refused(client, model, "external file 'weights.bin'", "self-contained")
    assert error.reason == "UNSUPPORTED_ONNX_FEATURE"


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_reduced_precision_floats_are_refused(client: cr.Client, dtype: object) -> None:
    model = linear(np.ones((3, 2), np.float32))
    if dtype == "bfloat16":
        half = helper.make_tensor("w", TensorProto.BFLOAT16, [3, 2], [1.0] * 6)
    else:
        half = numpy_helper.from_array(np.ones((3, 2), np.float16), "w")
    model.graph.initializer[0].CopyFrom(half)
    name = "float16" if dtype is np.float16 else "bfloat16"
    refused(client, model, f"{name} tensors are not supported", "initializer 'w'")


def test_control_flow_is_refused(client: cr.Client) -> None:
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "branch", [], [tensor("out", [2])])
    node = helper.make_node("If", ["condition"], ["y"], name="choose", then_branch=branch, else_branch=branch)
    model = onnx_model([node], [tensor("condition", [], TensorProto.BOOL), tensor("x", [2])], [tensor("y", [2])])
    refused(client, model, "control flow is not supported", "'choose'", "If")


def test_sequences_are_refused(client: cr.Client) -> None:
    node = helper.make_node("SequenceConstruct", ["x", "x"], ["both"], name="pack")
    output = helper.make_tensor_sequence_value_info("both", TensorProto.FLOAT, [2])
    model = onnx_model([node], [tensor("x", [2])], [output])
    refused(client, model, "sequence")


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).bytes(2048),
        b"",
        b"\x08\x07",
        linear(np.ones((3, 2), np.float32)).SerializeToString()[:40],
    ],
    ids=["random", "empty", "no-graph", "truncated"],
)
def test_malformed_bytes_are_invalid_argument_and_the_server_keeps_serving(
    client: cr.Client, server: ServerProcess, data: bytes
) -> None:
    error = refused(client, data)
    assert error.reason == "BAD_ONNX_MODEL"
    imported = client.import_onnx(linear(np.ones((3, 2), np.float32)))
    assert imported.outputs == ("y",)
    assert server.process is not None and server.process.poll() is None


def test_a_model_that_crashes_onnx_is_refused_and_the_server_keeps_serving(
    client: cr.Client, server: ServerProcess
) -> None:
    """onnx's version converter fails a C++ assertion (SIGABRT) on this opset 18 Split, which the checker
    passes; it runs in a worker process, so only the worker dies."""
    split = helper.make_node("Split", ["x"], ["a", "b", "c", "d"], num_outputs=1)
    outputs = [tensor(name, [2]) for name in "abcd"]
    model = onnx_model([split], [tensor("x", [7])], outputs, opset=18)
    error = refused(client, model, "onnx itself crashed")
    assert error.reason == "BAD_ONNX_MODEL"
    assert client.import_onnx(linear(np.ones((3, 2), np.float32))).outputs == ("y",)
    assert server.process is not None and server.process.poll() is None


def test_models_over_grpcs_default_4_mib_go_in_whole_and_come_out_in_1_mib_chunks(
    client: cr.Client, server: ServerProcess
) -> None:
    model = linear(np.arange(1024 * 2048, dtype=np.float32).reshape(1024, 2048))
    imported = client.import_onnx(model)
    chunks = [response.chunk for response in server.stub().ExportOnnx(pb.ExportOnnxRequest(graph_id=imported.graph_id))]
    assert len(chunks) > 4 and all(len(chunk) <= MIB for chunk in chunks)
    exported = onnx.load_from_string(b"".join(chunks))
    weight = next(tensor for tensor in exported.graph.initializer if tensor.name == "w")
    np.testing.assert_array_equal(numpy_helper.to_array(weight), numpy_helper.to_array(model.graph.initializer[0]))


def test_models_over_max_message_mb_are_resource_exhausted_naming_the_flag(tmp_path: Path) -> None:
    """Just over the limit the server's own check answers; far over it gRPC's, which the client names."""
    process = ServerProcess(tmp_path / "chainrule.db", ["--max-message-mb", "1"]).start()
    try:
        with cr.Client(process.address, timeout=60) as small:
            assert small.import_onnx(linear(np.ones((64, 64), np.float32))).outputs == ("y",)
            for megabytes in (1.5, 3.0):
                columns = int(megabytes * MIB / 4 / 256)
                with pytest.raises(cr.ChainruleError) as raised:
                    small.import_onnx(linear(np.ones((256, columns), np.float32)))
                error = raised.value
                assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                assert "--max-message-mb" in error.message and error.reason == "MODEL_TOO_LARGE", error.message
    finally:
        process.kill()


def test_a_constant_too_large_to_compute_at_import_is_resource_exhausted(client: cr.Client) -> None:
    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "shape")
    fill = helper.make_node("ConstantOfShape", ["shape"], ["huge"], name="fill")
    model = onnx_model([fill], [], [tensor("huge", [1 << 20, 1 << 20])], [shape])
    with pytest.raises(cr.ChainruleError) as raised:
        client.import_onnx(model)
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "'fill'" in raised.value.message


def test_export_refuses_a_node_with_no_onnx_equivalent(client: cr.Client) -> None:
    """layer_norm without a scale over sizes not known statically: ONNX's LayerNormalization needs a scale of
    the normalized shape."""
    x = graph_pb2.Node(name="x", op="input")
    x.attrs["dtype"].s = "float32"
    norm = graph_pb2.Node(name="normalized", op="layer_norm", inputs=["x"])
    info = client.create_graph(graph_pb2.Graph(name="no-onnx", nodes=[x, norm]))
    with pytest.raises(cr.ChainruleError) as raised:
        client.export_onnx(info.graph_id)
    error = raised.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "NO_ONNX_EQUIVALENT"
    assert "'normalized'" in error.message
    with pytest.raises(cr.ChainruleError) as raised:
        client.export_onnx(info.graph_id, outputs=["nowhere"])
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and "'nowhere'" in raised.value.message


# ---------------------------------------------------------------- names and sources
def test_frozen_initializers_are_constants_and_unknown_ones_are_refused(client: cr.Client) -> None:
    model = linear(np.ones((3, 2), np.float32))
    assert set(client.import_onnx(model).graph.parameters) == {"w", "b"}
    assert client.import_onnx(model, frozen=["w"]).graph.parameters == ("b",)
    error = refused(client, model, "'nowhere'", frozen=["nowhere"])
    assert error.metadata.get("subject") == "nowhere"


def test_sources_inputs_parameters_and_configuration_constants(client: cr.Client) -> None:
    """Inputs keep their dtype and shape (symbolic sizes -1); float initializers read as data are
    parameters, those read only as configuration (clip bounds, a dropout ratio, a shape) constants."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Clip", ["xw", "low", "high"], ["clipped"]),
        helper.make_node("Dropout", ["clipped", "ratio"], ["dropped"]),
        helper.make_node("Reshape", ["dropped", "shape"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(np.ones((3, 4), np.float32), "w"),
        numpy_helper.from_array(np.array(-1.0, np.float32), "low"),
        numpy_helper.from_array(np.array(1.0, np.float32), "high"),
        numpy_helper.from_array(np.array(0.25, np.float32), "ratio"),
        numpy_helper.from_array(np.array([-1, 2, 2], np.int64), "shape"),
    ]
    model = onnx_model(nodes, [tensor("x", ["batch", 3])], [tensor("y", ["batch", 2, 2])], initializers)
    imported = client.import_onnx(model)
    assert imported.graph.parameters == ("w",) and imported.graph.inputs == ("x",)
    definition = client.get_graph(imported.graph_id, include_definition=True).definition
    assert definition is not None
    nodes_by_name = {node.name: node for node in definition.nodes}
    assert nodes_by_name["x"].attrs["dtype"].s == "float32"
    assert list(nodes_by_name["x"].attrs["shape"].ints.values) == [-1, 3]
    assert {name: nodes_by_name[name].op for name in ("low", "high", "ratio", "shape")} == dict.fromkeys(
        ("low", "high", "ratio", "shape"), "constant"
    )
    y = client.forward(imported.graph_id, {"x": np.full((5, 3), 0.2, np.float32)}, ["y"])["y"]
    np.testing.assert_allclose(y, np.full((5, 2, 2), 0.6), rtol=1e-6)


def test_shape_computations_known_at_import_are_folded(client: cr.Client) -> None:
    """Shape -> Gather -> Concat -> Reshape of a static input, and ConstantOfShape of a constant shape:
    the imported definition (GetGraph, full view) keeps a reshape with a constant shape attr and a
    constant, and no shape, gather or concat node; the folded values stay fetchable as constants."""
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "first"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node(
            "ConstantOfShape", ["fill_shape"], ["filled"], value=numpy_helper.from_array(np.array([1.5], np.float32))
        ),
        helper.make_node("Add", ["flat", "filled"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([0], np.int64), "first"),
        numpy_helper.from_array(np.array([-1], np.int64), "rest"),
        numpy_helper.from_array(np.array([2, 12], np.int64), "fill_shape"),
    ]
    model = onnx_model(nodes, [tensor("x", [2, 3, 4])], [tensor("y", [2, 12])], initializers)
    imported = client.import_onnx(model)
    info = client.get_graph(imported.graph_id, include_definition=True, view="full")
    assert info.definition is not None
    ops = {node.name: node for node in info.definition.nodes}
    assert not {"shape", "gather", "concat", "expand"} & {node.op for node in ops.values()}, ops
    assert ops["flat"].op == "reshape" and list(ops["flat"].inputs) == ["x"]
    assert list(ops["flat"].attrs["shape"].ints.values) == [2, -1]
    assert ops["filled"].op == "constant"
    assert {ops[name].op for name in ("x_shape", "batch", "target")} == {"constant"}
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    got = client.forward(imported.graph_id, {"x": x}, ["y", "target"])
    np.testing.assert_array_equal(got["y"], x.reshape(2, 12) + 1.5)
    np.testing.assert_array_equal(got["target"], [2, -1])


def test_importer_names_never_clash_with_onnx_names(client: cr.Client) -> None:
    """A Gemm with transB becomes transpose, matmul and add; their names hold '#' and avoid any the model has."""
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, alpha=2.0),
        helper.make_node("Relu", ["x"], ["y#matmul"]),
    ]
    initializers = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.ones(2, np.float32), "c")]
    model = onnx_model(nodes, [tensor("x", [1, 3])], [tensor("y", [1, 2]), tensor("y#matmul", [1, 3])], initializers)
    imported = client.import_onnx(model)
    order = client.get_graph(imported.graph_id, view="full").topological_order
    assert {"x", "w", "c", "y", "y#matmul"} <= set(order)
    added = set(order) - {"x", "w", "c", "y", "y#matmul"}
    assert added and all("#" in name for name in added)
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    got = client.forward(imported.graph_id, {"x": x}, ["y", "y#matmul"])
    np.testing.assert_allclose(got["y"], 2 * x @ weight.T + 1)
    np.testing.assert_array_equal(got["y#matmul"], np.maximum(x, 0))


def test_an_opset_13_model_is_converted_and_matches_onnxruntime(client: cr.Client) -> None:
    weight = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Softmax", ["xw"], ["p"], axis=1),
        helper.make_node("ReduceSum", ["p", "axes"], ["total"], keepdims=0),
    ]
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    model = onnx_model(
        nodes, [tensor("x", [2, 4])], [tensor("total", [3])], [numpy_helper.from_array(weight, "w"), axes], opset=13
    )
    imported = client.import_onnx(model)
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    (want,) = onnxruntime.InferenceSession(model.SerializeToString()).run(["total"], {"x": x})
    np.testing.assert_allclose(client.forward(imported.graph_id, {"x": x}, ["total"])["total"], want, rtol=1e-5)


# ---------------------------------------------------------------- other clients
def test_command_line_imports_and_exports(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "linear.onnx"
    onnx.save(linear(np.full((3, 2), 0.5, np.float32)), path)
    command = [sys.executable, "-m", "chainrule.server.cli"]
    connection = ["--address", server.address]
    result = subprocess.run(
        [*command, "import-onnx", str(path), "--name", "cli", *connection], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    graph_id = result.stdout.split()[1]
    assert "outputs: y" in result.stdout
    exported = tmp_path / "out.onnx"
    result = subprocess.run(
        [*command, "export-onnx", graph_id, "-o", str(exported), *connection],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (y,) = onnxruntime.InferenceSession(str(exported)).run(["y"], {"x": np.ones((2, 3), np.float32)})
    np.testing.assert_allclose(y, np.full((2, 2), 1.5))
    result = subprocess.run(
        [*command, "import-onnx", str(tmp_path / "missing.onnx"), *connection],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "missing.onnx" in result.stderr


def test_node_client_imports_onnx(server: ServerProcess, tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node is not None, "Node.js is needed (tools/setup-dev.sh installs it)"
    path = tmp_path / "linear.onnx"
    onnx.save(linear(np.full((3, 2), 0.5, np.float32)), path)
    script = """
const fs = require('node:fs');
const { Client } = require(process.argv[1]);
(async () => {
  const client = new Client(process.argv[2]);
  const { graph, outputs } = await client.importOnnx(fs.readFileSync(process.argv[3]), { name: 'node', frozen: ['b'] });
  let refused = null;
  try { await client.importOnnx(Buffer.from('not a model')); } catch (error) { refused = error.reason; }
  console.log(JSON.stringify({ outputs, parameters: graph.parameters, name: graph.name, refused }));
  client.close();
})().catch((error) => { console.error(error); process.exit(1); });
"""
    result = subprocess.run(
        [node, "-e", script, str(ROOT / "client" / "node"), server.address, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer == {"outputs": ["y"], "parameters": ["w"], "name": "node", "refused": "BAD_ONNX_MODEL"}


def test_export_without_outputs_gives_every_unread_computed_node(client: cr.Client) -> None:
    model = linear(np.ones((3, 2), np.float32))
    imported = client.import_onnx(model)
    exported = onnx.load_from_string(client.export_onnx(imported.graph_id))
    assert [output.name for output in exported.graph.output] == ["y"]
    assert {tensor.name for tensor in exported.graph.initializer} == {"w", "b"}
