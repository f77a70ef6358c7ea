"""Training settings as the wire gives them, shared by Train streams and jobs: the optimizer and
the learning-rate schedule.

A schedule is a pure function of the step (0-based, the step whose update the rate scales), so a
job resumed after a crash takes the same rates as one never interrupted. The formulas are the
closed forms of PyTorch's schedulers, which compute the same rates step by step: linear warmup
as LinearLR(start_factor=1 / warmup_steps, total_iters=warmup_steps - 1), then StepLR or
CosineAnnealingLR (held at its minimum after the period, where PyTorch's would rise again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from chainrule.server import optim
from chainrule.server.errors import InvalidArgument
from chainrule.v1 import graph_service_pb2 as pb


def optimizer_from_proto(message: pb.Optimizer) -> optim.Optimizer:
    kind = message.WhichOneof("kind")
    if kind == "sgd":
        sgd = message.sgd
        return optim.Sgd(sgd.learning_rate, sgd.momentum, sgd.nesterov, sgd.weight_decay)
    if kind == "adam":
        adam = message.adam
        return optim.Adam(
            adam.learning_rate,
            adam.beta1 or 0.9,
            adam.beta2 or 0.999,
            adam.epsilon or 1e-8,
            adam.weight_decay,
        )
    raise InvalidArgument("optimizer is unset; choose sgd or adam", reason="BAD_OPTIMIZER", subject="optimizer")


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each step from the optimizer's `learning_rate`."""

    learning_rate: float
    warmup_steps: int = 0
    kind: Literal["constant", "step_decay", "cosine"] = "constant"
    step_size: int = 1
    gamma: float = 1.0
    period_steps: int = 1
    min_learning_rate: float = 0.0

    def rate(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.learning_rate * ((step + 1) / self.warmup_steps)  # exactly lr at the warmup's end
        t = step - self.warmup_steps
        if self.kind == "step_decay":
            return self.learning_rate * self.gamma ** (t // self.step_size)
        if self.kind == "cosine":
            low = self.min_learning_rate
            return (
                low
                + (self.learning_rate - low)
                * (1 + math.cos(math.pi * min(t, self.period_steps) / self.period_steps))
                / 2
            )
        return self.learning_rate


def schedule_from_proto(message: pb.LearningRateSchedule, optimizer: optim.Optimizer) -> Schedule | None:
    """The schedule a request asks for; None when it asks for none (the optimizer's rate throughout)."""
    kind = message.WhichOneof("kind")
    warmup = message.warmup_steps
    if warmup < 0:
        raise _bad("warmup_steps", f"is {warmup}; it must not be negative")
    if kind is None:
        return Schedule(optimizer.learning_rate, warmup) if warmup else None
    if kind == "step_decay":
        decay = message.step_decay
        if decay.step_size < 1:
            raise _bad("step_decay.step_size", f"is {decay.step_size}; it must be at least 1")
        if not (math.isfinite(decay.gamma) and decay.gamma > 0):
            raise _bad("step_decay.gamma", f"is {decay.gamma}; it must be finite and greater than 0")
        return Schedule(optimizer.learning_rate, warmup, "step_decay", step_size=decay.step_size, gamma=decay.gamma)
    cosine = message.cosine
    if cosine.period_steps < 1:
        raise _bad("cosine.period_steps", f"is {cosine.period_steps}; it must be at least 1")
    if not (math.isfinite(cosine.min_learning_rate) and cosine.min_learning_rate >= 0):
        raise _bad("cosine.min_learning_rate", f"is {cosine.min_learning_rate}; it must be finite and not negative")
    return Schedule(
        optimizer.learning_rate,
        warmup,
        "cosine",
        period_steps=cosine.period_steps,
        min_learning_rate=cosine.min_learning_rate,
    )


def _bad(field: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"schedule.{field} {problem}", reason="BAD_SCHEDULE", subject=f"schedule.{field}")
