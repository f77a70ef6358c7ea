"""Training what PyTorch exports: the exported LeNet-5 (with its cross-entropy) over Train.

Two graphs imported from one model and trained on the same batches with the same seed, dropout
and batch norm active, end bit for bit alike; running statistics update as torch.nn.BatchNorm's
do; a trained graph exported back to ONNX runs in onnxruntime with Forward's outputs; and the
example trains the digits to a good held-out accuracy in a short run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime
import pytest
import torch

import chainrule.client as cr
from tests.onnx_models import exported_lenet5_with_loss, module
from tests.server_process import ServerProcess

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BATCHES = 3
BATCH = 8


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[cr.Client]:
    with cr.Client(server.address, timeout=120) as connected:
        yield connected


def batches(count: int = BATCHES, seed: int = 5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.standard_normal((BATCH, 1, 28, 28)).astype(np.float32),
            "labels": rng.integers(0, 10, BATCH).astype(np.int64),
        }
        for _ in range(count)
    ]


def train(client: cr.Client, graph_id: str, loss: str, seed: int) -> None:
    steps = list(client.train(graph_id, batches(), loss=loss, optimizer=cr.Sgd(0.05, momentum=0.9), seed=seed))
    assert len(steps) == BATCHES


def test_two_graphs_trained_alike_end_bit_for_bit_alike(client: cr.Client) -> None:
    model = exported_lenet5_with_loss()
    first, second, reseeded = (client.import_onnx(model) for _ in range(3))
    loss = first.outputs[0]
    before = client.get_parameters(first.graph_id)
    for imported, seed in ((first, 7), (second, 7), (reseeded, 8)):
        train(client, imported.graph_id, loss, seed)
    after, again, other = (client.get_parameters(imported.graph_id) for imported in (first, second, reseeded))
    assert set(after) == set(first.graph.parameters) | set(first.graph.state) and first.graph.state
    for name in after:
        assert after[name].tobytes() == again[name].tobytes(), f"{name} differs between the two runs"
    for name in (*first.graph.state, "model.fc1.weight", "model.conv1.weight"):
        assert not np.array_equal(after[name], before[name]), f"{name} did not change in training"
    changed_by_dropout = [name for name in first.graph.parameters if not np.array_equal(after[name], other[name])]
    assert "model.fc1.weight" in changed_by_dropout, "another training seed draws other dropout masks"


def test_running_statistics_update_as_pytorch(client: cr.Client) -> None:
    """One training step's running mean and variance are torch.nn.BatchNorm2d's after the same batch
    (its momentum, and the unbiased batch variance), whatever ONNX's convention says."""
    imported = client.import_onnx(exported_lenet5_with_loss())
    (batch,) = batches(count=1)
    steps = client.train(imported.graph_id, [batch], loss=imported.outputs[0], optimizer=cr.Sgd(0.1))
    assert len(list(steps)) == 1
    statistics = client.get_parameters(imported.graph_id, list(imported.graph.state))
    reference = module("lenet5").train()
    with torch.no_grad():
        reference(torch.from_numpy(batch["x"]))
    buffers = {f"model.{key}": value.numpy() for key, value in reference.state_dict().items()}
    for name, value in statistics.items():
        np.testing.assert_allclose(value, buffers[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_trained_graph_exports_and_runs_in_onnxruntime(client: cr.Client, tmp_path: Path) -> None:
    imported = client.import_onnx(exported_lenet5_with_loss())
    loss, logits = imported.outputs
    train(client, imported.graph_id, loss, seed=3)
    path = tmp_path / "trained.onnx"
    client.export_onnx(imported.graph_id, path, outputs=[logits])
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [output.name for output in model.graph.output] == [logits]
    trained = client.get_parameters(imported.graph_id)
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    for name, value in trained.items():
        np.testing.assert_array_equal(initializers[name], value, err_msg=f"{name} as trained")

    images = np.random.default_rng(9).standard_normal((5, 1, 28, 28)).astype(np.float32)
    want = client.forward(imported.graph_id, {"x": images}, [logits])[logits]
    (got,) = onnxruntime.InferenceSession(str(path)).run([logits], {"x": images})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))

    unread = onnx.load_from_string(client.export_onnx(imported.graph_id))
    assert [output.name for output in unread.graph.output] == [loss], "every node no other node reads"


def test_digits_example_learns_in_a_short_run(server: ServerProcess, tmp_path: Path) -> None:
    """examples/train_cnn_digits.py, 3 epochs instead of 12 (which reach 98%)."""
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "train_cnn_digits.py"),
            "--address",
            server.address,
            "--epochs",
            "3",
            "--export",
            str(tmp_path / "digits.onnx"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (accuracy,) = re.findall(r"^held-out accuracy ([\d.]+)%", result.stdout, re.MULTILINE)
    (runtime_accuracy,) = re.findall(r"onnxruntime's held-out accuracy ([\d.]+)%", result.stdout)
    assert float(accuracy) >= 90.0, result.stdout
    assert runtime_accuracy == accuracy, result.stdout
