"""Measurements 2 and 3: training a 784-256-10 MLP, through a Train stream and in-process.

Remote training (2) is what a user sees: steps/s of one Train stream, the client sending
batches ahead while the server steps. The in-process engine step (3) takes gRPC away and
compares chainrule's plan interpreter and optimizer with the same step written by hand in
numpy, so a gap there is interpreter overhead, not transport.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from types import ModuleType

import numpy as np

import chainrule.client as cr
from bench.measure import Measurement, Target, interleaved, median, scaled
from chainrule.server import optim
from chainrule.server.graph import build_graph
from chainrule.server.plan import Plan

INPUTS, HIDDEN, CLASSES = 784, 256, 10
BATCH = 128
LEARNING_RATE = 0.1
DISTINCT_BATCHES = 8
"""Batches are drawn once and cycled: generating data must not be part of the step time."""
SETTLE_SECONDS = 0.3
"""Pause before each timed run of a training comparison. The other contender's threads do not stop
when its run ends: the server's OpenBLAS workers spin for up to ~0.1 s after its last step, PyTorch's
OpenMP workers briefly too. A run started inside that window shares the cores with them, which cost
the PyTorch baseline most (its two threads meet at a barrier after every op)."""
PARAMETER_NAMES = ("w1", "b1", "w2", "b2")

Parameters = dict[str, np.ndarray]
Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Workload:
    """The model's initial parameters and the batches every contender trains on, all float32."""

    initial: Parameters
    batches: list[Batch]

    @classmethod
    def synthetic(cls, seed: int = 0) -> Workload:
        rng = np.random.default_rng(seed)
        initial = {
            "w1": (rng.standard_normal((INPUTS, HIDDEN)) / np.sqrt(INPUTS)).astype(np.float32),
            "b1": np.zeros(HIDDEN, dtype=np.float32),
            "w2": (rng.standard_normal((HIDDEN, CLASSES)) / np.sqrt(HIDDEN)).astype(np.float32),
            "b2": np.zeros(CLASSES, dtype=np.float32),
        }
        batches = []
        for _ in range(DISTINCT_BATCHES):
            x = rng.standard_normal((BATCH, INPUTS), dtype=np.float32)
            y = np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, BATCH)]
            batches.append({"x": x, "y": y})
        return cls(initial, batches)

    def batch(self, step: int) -> Batch:
        return self.batches[step % len(self.batches)]

    def stream(self, steps: int) -> list[Batch]:
        return [self.batch(step) for step in range(steps)]


def mlp_graph(initial: Parameters) -> cr.GraphBuilder:
    """sigmoid(x @ w1 + b1) @ w2 + b2, scored by softmax_cross_entropy against one-hot y."""
    g = cr.GraphBuilder("mlp-784-256-10", default_dtype="float32")
    x = g.input("x", dtype="float32", shape=[-1, INPUTS])
    y = g.input("y", dtype="float32", shape=[-1, CLASSES])
    w1, b1, w2, b2 = (g.parameter(name, initial[name]) for name in PARAMETER_NAMES)
    hidden = cr.sigmoid(x @ w1 + b1)
    cr.softmax_cross_entropy(hidden @ w2 + b2, y).named("loss")
    return g


# ---------------------------------------------------------------- hand-written numpy
def numpy_step(parameters: Parameters, batch: Batch) -> float:
    """One SGD step of the MLP by hand, updating `parameters` in place; returns the loss before it."""
    x, y = batch["x"], batch["y"]
    w1, b1, w2, b2 = (parameters[name] for name in PARAMETER_NAMES)
    hidden = 1.0 / (1.0 + np.exp(-(x @ w1 + b1)))
    logits = hidden @ w2 + b2
    shifted = logits - logits.max(axis=1, keepdims=True)
    exps = np.exp(shifted)
    sums = exps.sum(axis=1, keepdims=True)
    loss = -float(np.sum(y * (shifted - np.log(sums)))) / len(x)
    d_logits = (exps / sums - y) / np.float32(len(x))
    d_hidden = d_logits @ w2.T
    d_pre = d_hidden * hidden * (1.0 - hidden)
    lr = np.float32(LEARNING_RATE)
    w2 -= lr * (hidden.T @ d_logits)
    b2 -= lr * d_logits.sum(axis=0)
    w1 -= lr * (x.T @ d_pre)
    b1 -= lr * d_pre.sum(axis=0)
    return loss


# ---------------------------------------------------------------- chainrule in-process
class EngineTrainer:
    """chainrule's compiled plan and optimizer without gRPC: what a TrainingSession step does
    minus the lock, the feed checks and the checkpoints."""

    def __init__(self, initial: Parameters) -> None:
        self.plan = Plan(build_graph(mlp_graph(initial).to_proto()))
        self.parameters = {name: value.copy() for name, value in initial.items()}
        self.optimizer = optim.Sgd(LEARNING_RATE)

    def step(self, batch: Batch) -> float:
        loss, reverse = self.plan.backward(batch, self.parameters, "loss", PARAMETER_NAMES)
        gradients = dict(reverse)
        for name in PARAMETER_NAMES:
            update, _ = optim.step(self.optimizer, self.parameters[name], gradients[name], {})
            self.parameters[name] = optim.apply(self.parameters[name], update, keep_update=False)
        return float(loss)


# ---------------------------------------------------------------- PyTorch in-process
class TorchTrainer:
    """The same model and update rule in PyTorch eager mode with torch.optim.SGD, written as plain
    PyTorch code is: a log_softmax cross-entropy on the one-hot labels, zero_grad, backward, step."""

    def __init__(self, torch: ModuleType, workload: Workload) -> None:
        self.torch = torch
        self.parameters = [torch.tensor(workload.initial[name], requires_grad=True) for name in PARAMETER_NAMES]
        self.optimizer = torch.optim.SGD(self.parameters, lr=LEARNING_RATE)
        self.batches = [(torch.from_numpy(b["x"]), torch.from_numpy(b["y"])) for b in workload.batches]

    def reset(self, initial: Parameters) -> None:
        with self.torch.no_grad():
            for tensor, name in zip(self.parameters, PARAMETER_NAMES, strict=True):
                tensor.copy_(self.torch.from_numpy(initial[name]))

    def train(self, steps: int) -> list[float]:
        """`steps` steps, reading each loss as a Train stream's client does."""
        torch = self.torch
        w1, b1, w2, b2 = self.parameters
        losses = []
        for step in range(steps):
            x, y = self.batches[step % len(self.batches)]
            self.optimizer.zero_grad()
            logits = torch.sigmoid(x @ w1 + b1) @ w2 + b2
            loss = -(y * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        return losses


# ---------------------------------------------------------------- measurements
def measure_remote_training(
    client: cr.Client, torch: ModuleType | None, workload: Workload, steps: int, repeats: int
) -> Measurement:
    """Steps/s of one Train stream of `steps` batches, loss-only responses, parameters reset before each run."""
    graph = client.create_graph(mlp_graph(workload.initial))
    batches = workload.stream(steps)
    final_losses: dict[str, float] = {}

    def remote() -> float:
        client.set_parameters(graph.graph_id, workload.initial)
        time.sleep(SETTLE_SECONDS)
        start = time.perf_counter()
        with client.train(graph.graph_id, batches, loss="loss", optimizer=cr.Sgd(LEARNING_RATE)) as stream:
            losses = [step.loss for step in stream]
        elapsed = time.perf_counter() - start
        assert len(losses) == steps, f"the Train stream answered {len(losses)} of {steps} batches"
        final_losses["chainrule"] = losses[-1]
        return elapsed

    trainer = TorchTrainer(torch, workload) if torch is not None else None

    def local_torch() -> float:
        assert trainer is not None
        trainer.reset(workload.initial)
        time.sleep(SETTLE_SECONDS)
        start = time.perf_counter()
        losses = trainer.train(steps)
        elapsed = time.perf_counter() - start
        final_losses["pytorch"] = losses[-1]
        return elapsed

    runs = {"chainrule": remote, "pytorch": local_torch if trainer is not None else None}
    interleaved(runs, 1)  # warm-up: the server plans the step, PyTorch initializes its kernels lazily
    samples = interleaved(runs, repeats)
    client.delete_graph(graph.graph_id)
    seconds = {name: median(samples.get(name)) for name in runs}
    return Measurement(
        key="train_throughput",
        title=f"2 Train stream, MLP 784-256-10, {steps} steps",
        unit="steps/s",
        chainrule=steps / seconds["chainrule"],  # type: ignore[operator]
        baselines={"pytorch": None if seconds["pytorch"] is None else steps / seconds["pytorch"]},
        ratio_baseline="pytorch",
        target=Target(">=", 0.6),
        details={"steps": steps, "repeats": repeats, "final_loss": final_losses},
    )


def measure_engine_step(workload: Workload, steps: int) -> Measurement:
    """Median seconds of one step, chainrule's engine and numpy alternating step by step."""
    engine = EngineTrainer(workload.initial)
    by_hand = {name: value.copy() for name, value in workload.initial.items()}
    losses: dict[str, list[float]] = {"chainrule": [], "numpy": []}
    engine_batches, numpy_batches = itertools.cycle(workload.batches), itertools.cycle(workload.batches)

    def engine_step() -> float:
        batch = next(engine_batches)
        start = time.perf_counter()
        losses["chainrule"].append(engine.step(batch))
        return time.perf_counter() - start

    def numpy_one_step() -> float:
        batch = next(numpy_batches)
        start = time.perf_counter()
        losses["numpy"].append(numpy_step(by_hand, batch))
        return time.perf_counter() - start

    runs = {"chainrule": engine_step, "numpy": numpy_one_step}
    interleaved(runs, 3)  # warm-up: BLAS threads and allocator pools
    samples = interleaved(runs, steps)
    first = losses["chainrule"][0], losses["numpy"][0]
    if abs(first[0] - first[1]) > 1e-4 * abs(first[1]):
        raise AssertionError(f"the engine's first loss is {first[0]}, the hand-written step's {first[1]}")
    return Measurement(
        key="engine_step",
        title="3 engine step in-process, same MLP",
        unit="ms/step",
        chainrule=median(samples["chainrule"]) * 1e3,  # type: ignore[operator]
        baselines={"numpy": scaled(median(samples["numpy"]), 1e3)},
        ratio_baseline="numpy",
        target=Target("<=", 1.15),
        details={
            "steps": steps,
            "final_loss": {name: values[-1] for name, values in losses.items()},
        },
    )
