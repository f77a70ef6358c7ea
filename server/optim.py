"""PyTorch's torch.optim.SGD and torch.optim.Adam as pure functions over numpy arrays.

`step` never mutates its arguments: a training step touches several parameters, and if a
later one fails the caller keeps every old parameter and state; checkpoints also hold on to
the arrays they snapshot. It returns the update rather than the new value so the caller can
stream it; the new value is `param + update`.

Fixed choices of torch's options: dampening 0, amsgrad off, maximize off, and Adam's
weight decay is the L2 term added to the gradient (not AdamW's decoupled decay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class Sgd:
    learning_rate: float
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass(frozen=True)
class Adam:
    learning_rate: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    weight_decay: float = 0.0


Optimizer = Sgd | Adam


def validate(optimizer: Optimizer) -> None:
    """Reject hyperparameters torch would reject, and those that would silently train to NaN."""
    if not isinstance(optimizer, Sgd | Adam):
        raise TypeError(f"unknown optimizer {optimizer!r}")
    _require(optimizer, "learning_rate", math.isfinite(optimizer.learning_rate) and optimizer.learning_rate > 0, "> 0")
    _require(optimizer, "weight_decay", math.isfinite(optimizer.weight_decay) and optimizer.weight_decay >= 0, ">= 0")
    if isinstance(optimizer, Sgd):
        _require(optimizer, "momentum", math.isfinite(optimizer.momentum) and optimizer.momentum >= 0, ">= 0")
        # torch: "Nesterov momentum requires a momentum and zero dampening"; dampening is always 0 here.
        if optimizer.nesterov and optimizer.momentum == 0:
            raise ValueError("Sgd.nesterov requires momentum > 0")
    else:
        _require(optimizer, "beta1", 0 <= optimizer.beta1 < 1, "in [0, 1)")
        _require(optimizer, "beta2", 0 <= optimizer.beta2 < 1, "in [0, 1)")
        _require(optimizer, "epsilon", math.isfinite(optimizer.epsilon) and optimizer.epsilon > 0, "> 0")


def _require(optimizer: Optimizer, field: str, ok: bool, rule: str) -> None:
    if not ok:
        value = getattr(optimizer, field)
        raise ValueError(f"{type(optimizer).__name__}.{field} must be finite and {rule}, got {value!r}")


def state_keys(optimizer: Optimizer) -> tuple[str, ...]:
    """The arrays a parameter's state holds once it has taken a step; plain SGD keeps none, as in torch."""
    match optimizer:
        case Sgd(momentum=momentum):
            return ("momentum_buffer",) if momentum != 0 else ()
        case Adam():
            return ("exp_avg", "exp_avg_sq", "step")
        case _:
            raise TypeError(f"unknown optimizer {optimizer!r}")


def step(optimizer: Optimizer, param: np.ndarray, grad: np.ndarray, state: State) -> tuple[np.ndarray, State]:
    """Return (update, new_state) for one parameter; `state` is {} before its first step.

    The optimizer is trusted to have passed `validate`. The update and the state's arrays are
    in the parameter's dtype, as torch keeps them, so float32 parameters stay float32.
    """
    if param.dtype.kind != "f":
        raise ValueError(f"only floating-point parameters can be optimized, got dtype {param.dtype}")
    if grad.shape != param.shape:
        raise ValueError(f"gradient shape {grad.shape} does not match parameter shape {param.shape}")
    if state and set(state) != set(state_keys(optimizer)):
        raise ValueError(
            f"optimizer state has keys {sorted(state)}, {type(optimizer).__name__} "
            f"expects {sorted(state_keys(optimizer))}"
        )
    if grad.dtype != param.dtype:
        grad = grad.astype(param.dtype)
    match optimizer:
        case Sgd():
            return _sgd_step(optimizer, param, grad, state)
        case Adam():
            return _adam_step(optimizer, param, grad, state)
        case _:
            raise TypeError(f"unknown optimizer {optimizer!r}")


def _sgd_step(sgd: Sgd, param: np.ndarray, grad: np.ndarray, state: State) -> tuple[np.ndarray, State]:
    # Python floats keep numpy in the parameter's dtype (a float64 scalar would promote float32 arrays).
    d_p = grad + sgd.weight_decay * param if sgd.weight_decay != 0 else grad
    new_state: State = {}
    if sgd.momentum != 0:
        if "momentum_buffer" in state:
            previous = np.asarray(state["momentum_buffer"], dtype=param.dtype)
            buffer = sgd.momentum * previous + d_p
        else:
            # torch starts the buffer at d_p itself; copy so it never aliases the caller's gradient.
            buffer = np.array(d_p, copy=True)
        new_state["momentum_buffer"] = buffer
        d_p = d_p + sgd.momentum * buffer if sgd.nesterov else buffer
    update = -sgd.learning_rate * d_p
    return update, new_state


def _adam_step(adam: Adam, param: np.ndarray, grad: np.ndarray, state: State) -> tuple[np.ndarray, State]:
    if state:
        exp_avg = np.asarray(state["exp_avg"], dtype=param.dtype)
        exp_avg_sq = np.asarray(state["exp_avg_sq"], dtype=param.dtype)
        count = int(state["step"]) + 1
    else:
        exp_avg = np.zeros_like(param)
        exp_avg_sq = np.zeros_like(param)
        count = 1
    if adam.weight_decay != 0:
        grad = grad + adam.weight_decay * param
    # torch updates exp_avg with lerp(grad, 1 - beta1), i.e. exp_avg + (1 - beta1) * (grad - exp_avg).
    exp_avg = exp_avg + (1 - adam.beta1) * (grad - exp_avg)
    exp_avg_sq = adam.beta2 * exp_avg_sq + (1 - adam.beta2) * grad * grad
    # torch computes the bias corrections as Python floats, so only the arrays are in the parameter's dtype.
    step_size = adam.learning_rate / (1 - adam.beta1**count)
    bias_correction2_sqrt = math.sqrt(1 - adam.beta2**count)
    denom = np.sqrt(exp_avg_sq) / bias_correction2_sqrt + adam.epsilon
    update = -step_size * exp_avg / denom
    new_state: State = {
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
        "step": np.array(count, dtype=np.int64),
    }
    return update, new_state


def apply(param: np.ndarray, update: np.ndarray, keep_update: bool = True) -> np.ndarray:
    """The new value `param + update`, bit for bit, as an array. Without `keep_update` the sum
    is written into the update's buffer, which `step` always allocates fresh: one large
    allocation less per step. (The update of a 0-d parameter is a numpy scalar, with no buffer.)"""
    if keep_update or not isinstance(update, np.ndarray):
        return np.asarray(param + update)
    return np.add(param, update, out=update)
