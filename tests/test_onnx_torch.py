"""PyTorch modules exported with torch.onnx.export(dynamo=True), imported into a real server.

For an MLP, a LeNet-5 with batch norm and dropout, a ResNet basic block and a
TransformerEncoderLayer: Forward equals the module in eval mode, and Backward with a random
loss_grad gives torch.autograd's gradients for the input and for every parameter, matched by
name (so these use optimize=False exports, which keep PyTorch's names); and the model ExportOnnx
writes back gives Forward's outputs in onnxruntime. The optimized exports,
which fold batch norm and rename weights, must import and run too. The batch axis is exported
symbolic and fed a batch size other than the traced one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime
import pytest
import torch

import chainrule.client as cr
from tests.onnx_models import MODULES, example, exported, module
from tests.server_process import ServerProcess

BATCH = 3
FORWARD_RTOL = 1e-4
GRADIENT_RTOL = 1e-4


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address, timeout=120) as connected:
        yield connected


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    """Within rtol of the largest magnitude, as float32 sums in another order allow."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.dtype, want.shape)
    scale = float(np.abs(want).max()) or 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_forward_and_gradients_match_pytorch_by_name(name: str, client: cr.Client) -> None:
    imported = client.import_onnx(exported(name), name=name)
    graph = imported.graph
    model = module(name).eval()
    parameters = dict(model.named_parameters())
    running = {key for key, _ in model.named_buffers() if key.endswith(("running_mean", "running_var"))}
    assert set(graph.parameters) == set(parameters), "every PyTorch parameter, by its own name"
    assert set(graph.state) == running, "batch norm's running statistics are state nodes"
    (output,) = imported.outputs

    x = example(name, batch=BATCH, seed=1)
    inputs = torch.from_numpy(x).requires_grad_(True)
    want = model(inputs)
    got = client.forward(graph.graph_id, {"x": x}, [output])[output]
    assert_close(got, want.detach().numpy(), FORWARD_RTOL, f"{name}: Forward")

    loss_grad = np.random.default_rng(2).standard_normal(want.shape).astype(np.float32)
    want.backward(torch.from_numpy(loss_grad))
    _, gradients = client.gradients(graph.graph_id, {"x": x}, output, ["x", *parameters], loss_grad)
    assert_close(gradients["x"], inputs.grad.numpy(), GRADIENT_RTOL, f"{name}: d/dx")  # type: ignore[union-attr]
    for key, parameter in parameters.items():
        assert_close(gradients[key], parameter.grad.numpy(), GRADIENT_RTOL, f"{name}: d/d{key}")  # type: ignore[union-attr]

    (ran,) = onnxruntime.InferenceSession(client.export_onnx(graph.graph_id)).run([output], {"x": x})
    assert_close(ran, got, FORWARD_RTOL, f"{name}: onnxruntime on the model ExportOnnx writes")

    stored = client.get_parameters(graph.graph_id)
    for key, value in model.state_dict().items():
        if key in stored:
            np.testing.assert_array_equal(stored[key], value.numpy(), err_msg=f"{name}: {key} as imported")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_optimized_export_imports_and_runs(name: str, client: cr.Client) -> None:
    imported = client.import_onnx(exported(name, optimize=True), name=f"{name}-optimized")
    (output,) = imported.outputs
    x = example(name, batch=BATCH, seed=3)
    got = client.forward(imported.graph_id, {"x": x}, [output])[output]
    with torch.no_grad():
        want = module(name).eval()(torch.from_numpy(x)).numpy()
    assert_close(got, want, FORWARD_RTOL, f"{name} (optimized export): Forward")
    _, gradients = client.gradients(imported.graph_id, {"x": x}, output, ["x"], np.ones_like(want))
    assert gradients["x"].shape == x.shape and np.isfinite(gradients["x"]).all()
