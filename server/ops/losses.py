"""Losses: scalar means of per-example losses, stable for logits of any size."""

from __future__ import annotations

import numpy as np

from chainrule.server.ops.elementwise import as_float, floatbinary_type, joint_dtype, sigmoid, softplus
from chainrule.server.ops.norm import log_softmax
from chainrule.server.ops.registry import Array, Attr, defop, unbroadcast
from chainrule.server.shapes import ShapeError, TensorType, describe, float_result, same_shape


def _rows(logits: Array) -> int:
    return max(1, logits.size // max(1, logits.shape[-1]))


def _class_labels(labels: Array) -> bool:
    """Integer labels are class indices; float (and bool) labels are probabilities over the classes."""
    return labels.dtype.kind in "iu"


def _kept_rows(logits: Array, labels: Array, ignore_index: int) -> tuple[Array, Array, int]:
    """The rows whose label is not `ignore_index`, the labels with ignored ones replaced by class 0
    (so they can index), and how many rows are kept."""
    if labels.shape != logits.shape[:-1]:
        raise ShapeError(
            f"class labels have shape {list(labels.shape)}; logits of shape {list(logits.shape)} need "
            f"{list(logits.shape[:-1])} (one class index per row)"
        )
    kept = labels != ignore_index
    classes = logits.shape[-1]
    out_of_range = kept & ((labels < 0) | (labels >= classes))
    if out_of_range.any():
        label = labels[out_of_range].flat[0]
        raise ValueError(
            f"label {label} is out of range for {classes} classes (valid: 0 to {classes - 1}, or ignore_index "
            f"{ignore_index})"
        )
    return kept, np.where(kept, labels, 0)[..., None], int(np.count_nonzero(kept))


def softmax_cross_entropy(logits: Array, labels: Array, ignore_index: int = -100) -> tuple[Array, Array]:
    """Soft labels: mean over rows (every axis but the last) of -sum(labels * log_softmax(logits)).
    Class labels: mean over the rows not labelled `ignore_index` of -log_softmax(logits)[label], as
    torch.nn.functional.cross_entropy (NaN when every row is ignored). Saves the log-softmax for the VJPs."""
    if _class_labels(labels):
        kept, indices, count = _kept_rows(logits, labels, ignore_index)
        log_probabilities = log_softmax(as_float(logits))
        picked = np.take_along_axis(log_probabilities, indices, axis=-1)[..., 0]
        return -np.where(kept, picked, 0).sum() / count, log_probabilities
    log_probabilities = log_softmax(logits)
    return -(labels * log_probabilities).sum() / _rows(logits), log_probabilities


def _sce_logits(g: Array, log_probabilities: Array, logits: Array, labels: Array, ignore_index: int = -100) -> Array:
    if _class_labels(labels):
        kept, indices, count = _kept_rows(logits, labels, ignore_index)
        grad = np.exp(log_probabilities)
        np.put_along_axis(grad, indices, np.take_along_axis(grad, indices, axis=-1) - 1, axis=-1)
        return grad * (kept[..., None] * (g / count))
    mass = labels.sum(axis=-1, keepdims=True)
    return (np.exp(log_probabilities) * mass - labels) * (g / _rows(logits))


def _sce_labels(g: Array, log_probabilities: Array, logits: Array, labels: Array, ignore_index: int = -100) -> Array:
    if _class_labels(labels):
        return np.zeros(labels.shape, labels.dtype)
    return -log_probabilities * (g / _rows(logits))


def _sce_type(logits: TensorType, labels: TensorType, ignore_index: int = -100) -> TensorType:
    if logits.shape is not None and len(logits.shape) == 0:
        raise ShapeError("logits must have at least one axis (the classes)")
    if labels.dtype is not None and labels.dtype.kind in "iu":
        rows = None if logits.shape is None else logits.shape[:-1]
        try:
            same_shape(rows, labels.shape, "", "")
        except ShapeError:
            raise ShapeError(
                f"class labels have shape {describe(labels.shape)}; logits of shape {describe(logits.shape)} "
                f"need {describe(rows)} (one class index per row)"
            ) from None
        return TensorType(float_result(logits.dtype), ())
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
    attrs={"ignore_index": Attr("i", default=-100)},
    saves=True,
    inputs="logits, labels",
    convention=(
        "scalar; float labels: mean over rows of `-sum(labels * log_softmax(logits))`; int labels: class indices "
        "of shape logits.shape[:-1], mean over rows not labelled ignore_index, as torch cross_entropy"
    ),
)
defop(
    "sigmoid_cross_entropy",
    sigmoid_cross_entropy,
    _bce_logits,
    _bce_targets,
    infer=_scalar_loss_type,
    reads=("x y", "x"),
    inputs="logits, targets",
    convention="scalar: mean binary cross-entropy with logits, stable for ±1000",
)
