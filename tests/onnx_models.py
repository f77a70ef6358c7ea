"""PyTorch modules exported to ONNX with torch.onnx.export(dynamo=True), and the digits data set,
shared by the ONNX tests and examples/train_cnn_digits.py.

Exports are slow (seconds each), so each (module, options) pair is exported once per process.
Modules are built under a fixed seed and exported in training mode, so the ONNX graphs keep
their Dropout nodes (an eval-mode export drops them) and chainrule's Train has them to drop.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
BATCH = 4
"""The batch size of the example inputs the exporter traces; the batch axis is exported symbolic."""


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


class LeNet5(nn.Module):
    """LeNet-5 on 1x28x28 images, with batch norm after each convolution and dropout before the last layers."""

    def __init__(self, dropout: float = 0.25) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = self.dropout(F.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc3(F.relu(self.fc2(x)))


class ResNetBlock(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with batch norm and a residual connection."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class WithLoss(nn.Module):
    """A classifier and its cross-entropy: (x, labels) -> (loss, logits), so Train has a loss to minimize."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return F.cross_entropy(logits, labels), logits


def transformer() -> nn.Module:
    return nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True)


MODULES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (Mlp, (6,)),
    "lenet5": (LeNet5, (1, 28, 28)),
    "resnet_block": (ResNetBlock, (8, 6, 6)),
    "transformer": (transformer, (5, 16)),
}
"""Each module's constructor and the shape of one example (the batch axis comes first)."""


def module(name: str) -> nn.Module:
    """The module, built under SEED, with running statistics moved away from their (0, 1) start so that
    inference-mode batch norm is not the identity."""
    build, _ = MODULES[name]
    torch.manual_seed(SEED)
    built = build().float()  # float32 whatever torch's default dtype is (another test module may change it)
    with torch.no_grad():
        for layer in built.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 1.5)
    return built


def example(name: str, batch: int = BATCH, seed: int = SEED) -> np.ndarray:
    _, shape = MODULES[name]
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def export(model: nn.Module, examples: tuple[torch.Tensor, ...], *, optimize: bool, names: list[str]) -> bytes:
    """torch.onnx.export(dynamo=True) in training mode with the batch axis of every input symbolic."""
    batch = torch.export.Dim("batch")
    model.train()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its steps
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # and logs each missing optional package
        try:
            program = torch.onnx.export(
                model,
                examples,
                dynamo=True,
                optimize=optimize,
                verbose=False,
                input_names=names,
                dynamic_shapes=tuple({0: batch} for _ in examples),
            )
        finally:
            logging.disable(logging.NOTSET)
    assert program is not None
    return program.model_proto.SerializeToString()


@functools.cache
def exported(name: str, optimize: bool = False) -> bytes:
    """MODULES[name] exported once per process: `optimize` False keeps PyTorch's parameter names
    (the default True folds batch norm into the convolutions and renames weights)."""
    return export(module(name), (torch.from_numpy(example(name)),), optimize=optimize, names=["x"])


@functools.cache
def exported_lenet5_with_loss(optimize: bool = False) -> bytes:
    """LeNet-5 with its cross-entropy: inputs x (N, 1, 28, 28) and labels (N,), outputs (loss, logits)."""
    images = torch.from_numpy(example("lenet5"))
    labels = torch.arange(BATCH) % 10
    return export(WithLoss(module("lenet5")), (images, labels), optimize=optimize, names=["x", "labels"])
