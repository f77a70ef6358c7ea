"""Losses: scalar means of per-example losses, stable for logits of any size."""

from __future__ import annotations

import numpy as np

from chainrule.server.ops.elementwise import as_float, floatbinary_type, joint_dtype, sigmoid, softplus
from chainrule.server.ops.norm import log_softmax
from chainrule.server.ops.registry import Array, defop, unbroadcast
from chainrule.server.shapes import ShapeError, TensorType, float_result, same_shape


def _rows(logits: Array) -> int:
    return max(1, logits.size // max(1, logits.shape[-1]))


def softmax_cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Mean over rows (every axis but the last) of -sum(labels * log_softmax(logits)),
    saving the log-softmax for the VJPs."""
    log_probabilities = log_softmax(logits)
    return -(labels * log_probabilities).sum() / _rows(logits), log_probabilities


def _sce_logits(g: Array, log_probabilities: Array, logits: Array, labels: Array) -> Array:
    mass = labels.sum(axis=-1, keepdims=True)
    return (np.exp(log_probabilities) * mass - labels) * (g / _rows(logits))


def _sce_labels(g: Array, log_probabilities: Array, logits: Array, labels: Array) -> Array:
    return -log_probabilities * (g / _rows(logits))


def _sce_type(logits: TensorType, labels: TensorType) -> TensorType:
    if logits.shape is not None and len(logits.shape) == 0:
        raise ShapeError("logits must have at least one axis (the classes)")
    same_shape(logits.shape, labels.shape, "logits", "labels")
    return TensorType(float_result(joint_dtype(logits, labels)), ())


def sigmoid_cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean of softplus(x) - x * t, the binary cross-entropy of sigmoid(x) against t, stable for any x."""
    return np.mean(softplus(logits) - logits * targets)


def _bce_count(logits: Array, targets: Array) -> int:
    return int(np.prod(np.broadcast_shapes(np.shape(logits), np.shape(targets)), dtype=np.int64))


def _bce_logits(g: Array, ans: Array, logits: Array, targets: Array) -> Array:
    grad = (sigmoid(logits) - targets) * (g / _bce_count(logits, targets))
    return unbroadcast(grad, np.shape(logits))


def _bce_targets(g: Array, ans: Array, logits: Array, targets: Array) -> Array:
    grad = np.broadcast_to(-as_float(logits), np.broadcast_shapes(np.shape(logits), np.shape(targets)))
    return unbroadcast(grad * (g / _bce_count(logits, targets)), np.shape(targets))


def _scalar_loss_type(x: TensorType, y: TensorType) -> TensorType:
    return TensorType(floatbinary_type(x, y).dtype, ())


defop(
    "softmax_cross_entropy",
    softmax_cross_entropy,
    _sce_logits,
    _sce_labels,
    infer=_sce_type,
    reads=("ans y", "ans"),
    saves=True,
)
defop(
    "sigmoid_cross_entropy",
    sigmoid_cross_entropy,
    _bce_logits,
    _bce_targets,
    infer=_scalar_loss_type,
    reads=("x y", "x"),
)
