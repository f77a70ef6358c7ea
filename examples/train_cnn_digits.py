"""A PyTorch LeNet-5 trained remotely: torch.onnx.export -> ImportOnnx -> Train -> ExportOnnx.

The model (two convolutions with batch norm, max pooling, three linear layers, dropout) and its
cross-entropy are written in PyTorch and exported to ONNX; chainrule imports the model, trains
it over a Train stream on scikit-learn's 8x8 digits (each pixel grown to 3x3 and padded to
28x28), reports the held-out accuracy with Forward, and hands the trained model back as ONNX.
Needs torch and onnxscript (for the export), scikit-learn (the data) and, for the last check,
onnxruntime: `pip install -e '.[dev]'`.

    python examples/train_cnn_digits.py                     # 12 epochs, >= 97% held-out accuracy
    python examples/train_cnn_digits.py --epochs 2 --export lenet5.onnx
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import chainrule.client as cr

SEED = 0


class LeNet5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = self.dropout(F.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc3(F.relu(self.fc2(x)))


class WithLoss(nn.Module):
    """(images, labels) -> (mean cross-entropy, logits): the exported graph carries its own loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        return F.cross_entropy(logits, labels), logits


def digits() -> tuple[np.ndarray, np.ndarray]:
    """1,797 digits as (N, 1, 28, 28) float32 images in [0, 1] and int64 labels."""
    data = load_digits()
    grown = np.kron(data.images / 16.0, np.ones((3, 3))).astype(np.float32)  # 24 x 24
    return np.pad(grown, ((0, 0), (2, 2), (2, 2)))[:, np.newaxis], data.target.astype(np.int64)


def export_onnx() -> bytes:
    """The model with its loss, exported in training mode (so its Dropout is kept) with a symbolic batch axis."""
    torch.manual_seed(SEED)
    model = WithLoss(LeNet5()).train()
    batch = torch.export.Dim("batch")
    examples = (torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.int64))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its steps
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        program = torch.onnx.export(
            model,
            examples,
            dynamo=True,
            optimize=False,  # keep batch norm (the optimizer folds it into the convolutions) and PyTorch's names
            input_names=["images", "labels"],
            dynamic_shapes=({0: batch}, {0: batch}),
        )
        logging.disable(logging.NOTSET)
    assert program is not None
    return program.model_proto.SerializeToString()


def accuracy(client: cr.Client, graph_id: str, logits: str, images: np.ndarray, labels: np.ndarray) -> float:
    """Forward runs in inference mode: running statistics, no dropout."""
    scores = client.forward(graph_id, {"images": images}, [logits])[logits]
    return float(np.mean(scores.argmax(axis=1) == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=os.environ.get("CHAINRULE_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--export", metavar="PATH", help="also write the trained model as ONNX and check it")
    args = parser.parse_args()

    images, labels = digits()
    order = np.random.default_rng(SEED).permutation(len(labels))
    held_out, train = order[:360], order[360:]
    with cr.Client(args.address, timeout=300) as client:
        imported = client.import_onnx(export_onnx(), name="lenet5-digits")
        loss, logits = imported.outputs
        graph = imported.graph
        print(f"imported {graph.graph_id}: {len(graph.parameters)} parameters, {len(graph.state)} state nodes")
        started = time.perf_counter()
        history = client.fit(
            graph.graph_id,
            {"images": images[train], "labels": labels[train]},
            loss=loss,
            optimizer=cr.Adam(0.002),
            batch_size=args.batch_size,
            epochs=args.epochs,
            seed=SEED,
        )
        steps = len(history.losses)
        seconds = time.perf_counter() - started
        print(f"trained {steps} steps in {seconds:.1f} s: loss {history.losses[0]:.3f} -> {history.losses[-1]:.3f}")
        score = accuracy(client, graph.graph_id, logits, images[held_out], labels[held_out])
        print(f"held-out accuracy {100 * score:.1f}% ({len(held_out)} digits)")
        if args.export:
            client.export_onnx(graph.graph_id, args.export, outputs=[logits])
            import onnxruntime

            session = onnxruntime.InferenceSession(args.export)
            (scores,) = session.run([logits], {"images": images[held_out]})
            agreement = float(np.mean(scores.argmax(axis=1) == labels[held_out]))
            print(f"wrote {args.export}; onnxruntime's held-out accuracy {100 * agreement:.1f}%")


if __name__ == "__main__":
    main()
