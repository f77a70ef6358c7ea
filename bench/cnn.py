"""Measurements of convolutional networks in-process, against PyTorch eager on the same CPU threads.

(8) One LeNet-5 training step on 28x28 float32 batches of 64: conv 6@5x5 (pad 2), relu, 2x2 max
    pool, conv 16@5x5, relu, 2x2 max pool, then 400-120-84-10 fully connected with relu, softmax
    cross-entropy, SGD. chainrule's step is `Plan.backward` and the optimizer, as a Train step runs
    them without gRPC; PyTorch's is autograd and torch.optim.SGD. The two alternate step by step.
(9) One ResNet-18 forward pass (inference: batch norm with running statistics): 7x7/2 conv, 3x3/2
    max pool, four stages of two basic blocks (64, 128, 256, 512 channels, 1x1/2 shortcuts), global
    average pool, 1000-way linear layer. PyTorch runs the same functional graph with the same
    weights; both alternate call by call, under torch.no_grad() for PyTorch.

Before timing, each checks that chainrule and PyTorch agree (the first loss; the logits). Each first
sets glibc's allocator as `chainrule serve` does at startup (chainrule.server.app.keep_freed_memory):
the process-wide setting holds for PyTorch's arrays too. Besides the wall-clock medians of the table,
the details hold each side's median CPU time (the process's, every thread's), which other work on a
shared machine distorts far less.

`python -m bench.cnn [--threads N] [--quick] [--runs K]` runs only these two rows, K times.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

import chainrule.client as cr
from bench import report
from bench.machine import blas_threads, describe, limit_threads, load_torch
from bench.measure import Measurement, Target, interleaved, median, scaled
from chainrule.server import optim
from chainrule.server.app import keep_freed_memory
from chainrule.server.graph import build_graph
from chainrule.server.plan import Plan

Arrays = dict[str, np.ndarray]
LENET_BATCH = 64
LENET_CLASSES = 10
LEARNING_RATE = 0.05
DISTINCT_BATCHES = 4
RESNET_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
"""(channels, stride of the first block) of ResNet-18's four stages of two basic blocks."""
RESNET_CLASSES = 1000


def _he(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """He initialization: convolutions (out, in, kernel...) and matrices (in, out) alike."""
    fan_in = shape[0] if len(shape) == 2 else math.prod(shape[1:])
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


# ---------------------------------------------------------------- LeNet-5 training step
LENET_SHAPES = {
    "c1w": (6, 1, 5, 5), "c1b": (6,), "c2w": (16, 6, 5, 5), "c2b": (16,),
    "f1w": (400, 120), "f1b": (120,), "f2w": (120, 84), "f2b": (84,), "f3w": (84, 10), "f3b": (10,),
}  # fmt: skip


@dataclass(frozen=True)
class LenetWorkload:
    initial: Arrays
    batches: list[Arrays]

    @classmethod
    def synthetic(cls, seed: int = 0) -> LenetWorkload:
        rng = np.random.default_rng(seed)
        initial = {
            name: np.zeros(shape, np.float32) if len(shape) == 1 else _he(rng, shape)
            for name, shape in LENET_SHAPES.items()
        }
        batches = [
            {
                "x": rng.standard_normal((LENET_BATCH, 1, 28, 28), dtype=np.float32),
                "y": np.eye(LENET_CLASSES, dtype=np.float32)[rng.integers(0, LENET_CLASSES, LENET_BATCH)],
            }
            for _ in range(DISTINCT_BATCHES)
        ]
        return cls(initial, batches)


def lenet_graph(initial: Arrays) -> cr.GraphBuilder:
    g = cr.GraphBuilder("lenet-5", default_dtype="float32")
    x = g.input("x", dtype="float32", shape=[-1, 1, 28, 28])
    y = g.input("y", dtype="float32", shape=[-1, LENET_CLASSES])
    p = {name: g.parameter(name, value) for name, value in initial.items()}
    h = cr.max_pool(cr.relu(cr.conv(x, p["c1w"], p["c1b"], pads=[2, 2, 2, 2])), [2, 2], strides=[2, 2])
    h = cr.max_pool(cr.relu(cr.conv(h, p["c2w"], p["c2b"])), [2, 2], strides=[2, 2])
    h = cr.relu(cr.reshape(h, [-1, 400]) @ p["f1w"] + p["f1b"])
    h = cr.relu(h @ p["f2w"] + p["f2b"])
    cr.softmax_cross_entropy(h @ p["f3w"] + p["f3b"], y, name="loss")
    return g


class EngineTrainer:
    """chainrule's plan and optimizer without gRPC: what a Train step computes."""

    def __init__(self, graph: cr.GraphBuilder, initial: Arrays, learning_rate: float) -> None:
        self.plan = Plan(build_graph(graph.to_proto()))
        self.parameters = {name: value.copy() for name, value in initial.items()}
        self.names = list(initial)
        self.optimizer = optim.Sgd(learning_rate)

    def step(self, batch: Arrays) -> float:
        loss, reverse = self.plan.backward(batch, self.parameters, "loss", self.names)
        for name, gradient in reverse:
            update, _ = optim.step(self.optimizer, self.parameters[name], gradient, {})
            self.parameters[name] = optim.apply(self.parameters[name], update, keep_update=False)
        return float(loss)


class TorchLenet:
    def __init__(self, torch: ModuleType, workload: LenetWorkload) -> None:
        self.torch = torch
        self.parameters = {name: torch.tensor(value, requires_grad=True) for name, value in workload.initial.items()}
        self.optimizer = torch.optim.SGD(list(self.parameters.values()), lr=LEARNING_RATE)

    def step(self, batch: Arrays) -> float:
        functional = self.torch.nn.functional
        p = self.parameters
        x, y = self.torch.from_numpy(batch["x"]), self.torch.from_numpy(batch["y"])
        self.optimizer.zero_grad(set_to_none=True)
        h = functional.max_pool2d(functional.relu(functional.conv2d(x, p["c1w"], p["c1b"], padding=2)), 2, 2)
        h = functional.max_pool2d(functional.relu(functional.conv2d(h, p["c2w"], p["c2b"])), 2, 2)
        h = functional.relu(h.reshape(-1, 400) @ p["f1w"] + p["f1b"])
        h = functional.relu(h @ p["f2w"] + p["f2b"])
        loss = functional.cross_entropy(h @ p["f3w"] + p["f3b"], y)
        loss.backward()
        self.optimizer.step()
        return float(loss.item())


def measure_lenet_step(torch: ModuleType | None, steps: int) -> Measurement:
    """Median ms of one training step, chainrule's engine and PyTorch alternating step by step."""
    keep_freed_memory()
    workload = LenetWorkload.synthetic()
    engine = EngineTrainer(lenet_graph(workload.initial), workload.initial, LEARNING_RATE)
    losses: dict[str, list[float]] = {"chainrule": [], "pytorch": []}
    cpu: dict[str, list[float]] = {"chainrule": [], "pytorch": []}
    contenders: dict[str, Callable[[Arrays], float]] = {"chainrule": engine.step}
    if torch is not None:
        contenders["pytorch"] = TorchLenet(torch, workload).step

    def timed_step(name: str) -> Callable[[], float]:
        batches = itertools.cycle(workload.batches)

        def run() -> float:
            batch = next(batches)
            start, start_cpu = time.perf_counter(), time.process_time()
            losses[name].append(contenders[name](batch))
            cpu[name].append(time.process_time() - start_cpu)
            return time.perf_counter() - start

        return run

    runs = {name: timed_step(name) if name in contenders else None for name in ("chainrule", "pytorch")}
    interleaved(runs, 3)  # warm-up: schedules, BLAS threads, allocator pools
    _agree("LeNet-5 first loss", losses["chainrule"][0], losses["pytorch"][0] if losses["pytorch"] else None)
    cpu = {name: [] for name in cpu}
    samples = interleaved(runs, steps)
    seconds = {name: median(samples.get(name)) for name in runs}
    return Measurement(
        key="lenet_step",
        title=f"8 LeNet-5 training step in-process, batch {LENET_BATCH} of 28x28",
        unit="ms/step",
        chainrule=seconds["chainrule"] * 1e3,  # type: ignore[operator]
        baselines={"pytorch": scaled(seconds["pytorch"], 1e3)},
        ratio_baseline="pytorch",
        target=Target("<=", 1.0),
        details={
            "steps": steps,
            "final_loss": {name: values[-1] for name, values in losses.items() if values},
            "cpu_ms": _cpu_ms(cpu),
        },
    )


# ---------------------------------------------------------------- ResNet-18 forward
def resnet_parameters(seed: int = 0) -> Arrays:
    """He-initialized convolutions, batch norms with non-trivial statistics, one linear layer."""
    rng = np.random.default_rng(seed)
    p: Arrays = {}

    def conv(name: str, shape: tuple[int, ...]) -> None:
        p[f"{name}.w"] = _he(rng, shape)

    def norm(name: str, channels: int) -> None:
        p[f"{name}.scale"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        p[f"{name}.bias"] = (0.1 * rng.standard_normal(channels)).astype(np.float32)
        p[f"{name}.mean"] = (0.1 * rng.standard_normal(channels)).astype(np.float32)
        p[f"{name}.var"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)

    conv("stem", (64, 3, 7, 7))
    norm("stem.bn", 64)
    inputs = 64
    for stage, (channels, _) in enumerate(RESNET_STAGES):
        for block in range(2):
            prefix = f"s{stage}.b{block}"
            conv(f"{prefix}.c1", (channels, inputs if block == 0 else channels, 3, 3))
            norm(f"{prefix}.bn1", channels)
            conv(f"{prefix}.c2", (channels, channels, 3, 3))
            norm(f"{prefix}.bn2", channels)
            if block == 0 and inputs != channels:
                conv(f"{prefix}.down", (channels, inputs, 1, 1))
                norm(f"{prefix}.down.bn", channels)
        inputs = channels
    p["fc.w"] = (rng.standard_normal((512, RESNET_CLASSES)) / np.sqrt(512)).astype(np.float32)
    p["fc.b"] = np.zeros(RESNET_CLASSES, np.float32)
    return p


def resnet18(ops: Any, p: dict[str, Any], x: Any) -> Any:
    """ResNet-18's forward pass written once over `ops` (chainrule's builder or PyTorch's functions)."""
    h = ops.relu(ops.norm(ops.conv(x, p["stem.w"], 2, 3), p, "stem.bn"))
    h = ops.max_pool(h)
    inputs = 64
    for stage, (channels, stride) in enumerate(RESNET_STAGES):
        for block in range(2):
            prefix, step = f"s{stage}.b{block}", stride if block == 0 else 1
            out = ops.relu(ops.norm(ops.conv(h, p[f"{prefix}.c1.w"], step, 1), p, f"{prefix}.bn1"))
            out = ops.norm(ops.conv(out, p[f"{prefix}.c2.w"], 1, 1), p, f"{prefix}.bn2")
            if block == 0 and inputs != channels:
                h = ops.norm(ops.conv(h, p[f"{prefix}.down.w"], step, 0), p, f"{prefix}.down.bn")
            h = ops.relu(out + h)
        inputs = channels
    return ops.linear(ops.global_pool(h), p["fc.w"], p["fc.b"])


class ChainruleOps:
    relu = staticmethod(cr.relu)

    @staticmethod
    def conv(x: cr.Node, w: cr.Node, stride: int, pad: int) -> cr.Node:
        return cr.conv(x, w, strides=[stride, stride], pads=[pad] * 4)

    @staticmethod
    def norm(x: cr.Node, p: dict[str, cr.Node], name: str) -> cr.Node:
        return cr.batch_norm(x, *(p[f"{name}.{part}"] for part in ("scale", "bias", "mean", "var")))

    @staticmethod
    def max_pool(x: cr.Node) -> cr.Node:
        return cr.max_pool(x, [3, 3], strides=[2, 2], pads=[1, 1, 1, 1])

    @staticmethod
    def global_pool(x: cr.Node) -> cr.Node:
        return cr.reshape(cr.global_average_pool(x), [-1, 512])

    @staticmethod
    def linear(x: cr.Node, w: cr.Node, b: cr.Node) -> cr.Node:
        return x @ w + b


class TorchOps:
    def __init__(self, torch: ModuleType) -> None:
        self.functional = torch.nn.functional
        self.relu = self.functional.relu

    def conv(self, x: Any, w: Any, stride: int, pad: int) -> Any:
        return self.functional.conv2d(x, w, None, stride, pad)

    def norm(self, x: Any, p: dict[str, Any], name: str) -> Any:
        return self.functional.batch_norm(
            x, p[f"{name}.mean"], p[f"{name}.var"], p[f"{name}.scale"], p[f"{name}.bias"], False, 0.0, 1e-5
        )

    def max_pool(self, x: Any) -> Any:
        return self.functional.max_pool2d(x, 3, 2, 1)

    def global_pool(self, x: Any) -> Any:
        return x.mean(dim=(2, 3))

    def linear(self, x: Any, w: Any, b: Any) -> Any:
        return x @ w + b


def resnet_graph(parameters: Arrays, image: int) -> cr.GraphBuilder:
    """Running statistics are `state` nodes, as an imported model's are; the rest are parameters."""
    g = cr.GraphBuilder("resnet-18", default_dtype="float32")
    x = g.input("x", dtype="float32", shape=[-1, 3, image, image])
    nodes = {
        name: g.state(name, value) if name.endswith((".mean", ".var")) else g.parameter(name, value)
        for name, value in parameters.items()
    }
    resnet18(ChainruleOps, nodes, x).named("logits")
    return g


def measure_resnet_forward(torch: ModuleType | None, batch: int, image: int, repeats: int) -> Measurement:
    """Median ms of one forward pass, chainrule's plan and PyTorch alternating call by call."""
    keep_freed_memory()
    parameters = resnet_parameters()
    x = np.random.default_rng(1).standard_normal((batch, 3, image, image), dtype=np.float32)
    plan = Plan(build_graph(resnet_graph(parameters, image).to_proto()))
    outputs: dict[str, np.ndarray] = {}
    cpu: dict[str, list[float]] = {"chainrule": [], "pytorch": []}

    def chainrule_forward() -> float:
        start, start_cpu = time.perf_counter(), time.process_time()
        [outputs["chainrule"]] = plan.forward({"x": x}, parameters, ["logits"])
        cpu["chainrule"].append(time.process_time() - start_cpu)
        return time.perf_counter() - start

    runs: dict[str, Callable[[], float] | None] = {"chainrule": chainrule_forward, "pytorch": None}
    if torch is not None:
        weights = {name: torch.from_numpy(value) for name, value in parameters.items()}
        ops, image_tensor = TorchOps(torch), torch.from_numpy(x)

        def torch_forward() -> float:
            with torch.no_grad():
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs["pytorch"] = resnet18(ops, weights, image_tensor).numpy()
                cpu["pytorch"].append(time.process_time() - start_cpu)
                return time.perf_counter() - start

        runs["pytorch"] = torch_forward
    interleaved(runs, 1)  # warm-up
    if "pytorch" in outputs:
        scale = float(np.abs(outputs["pytorch"]).max())
        error = float(np.abs(outputs["chainrule"] - outputs["pytorch"]).max())
        if not error <= 1e-3 * scale:
            raise AssertionError(f"ResNet-18 logits differ from PyTorch's by {error:.3g} (largest {scale:.3g})")
    cpu = {name: [] for name in cpu}
    samples = interleaved(runs, repeats)
    seconds = {name: median(samples.get(name)) for name in runs}
    return Measurement(
        key="resnet_forward",
        title=f"9 ResNet-18 forward in-process, batch {batch} of {image}x{image}",
        unit="ms",
        chainrule=seconds["chainrule"] * 1e3,  # type: ignore[operator]
        baselines={"pytorch": scaled(seconds["pytorch"], 1e3)},
        ratio_baseline="pytorch",
        target=Target("<=", 1.0),
        details={"batch": batch, "image": image, "repeats": repeats, "cpu_ms": _cpu_ms(cpu)},
    )


def _agree(what: str, ours: float, theirs: float | None) -> None:
    if theirs is not None and abs(ours - theirs) > 1e-4 * max(1.0, abs(theirs)):
        raise AssertionError(f"{what}: chainrule {ours}, PyTorch {theirs}")


def _cpu_ms(cpu: dict[str, list[float]]) -> dict[str, float]:
    """Each side's median CPU time per call, ms, and chainrule's over PyTorch's."""
    medians = {name: statistics.median(values) * 1e3 for name, values in cpu.items() if values}
    if "pytorch" in medians:
        medians["ratio"] = medians["chainrule"] / medians["pytorch"]
    return medians


def main(argv: list[str] | None = None) -> int:
    """Rows 8 and 9 alone, `--runs` times over, with the load average around each run."""
    parser = argparse.ArgumentParser(prog="python -m bench.cnn", description="bench rows 8 and 9 only")
    parser.add_argument("--threads", type=int, help="BLAS and PyTorch threads (default: numpy's BLAS default)")
    parser.add_argument("--quick", action="store_true", help="10 LeNet-5 steps and ResNet-18 at batch 1 of 32x32")
    parser.add_argument("--runs", type=int, default=1, help="how many times to run both rows (default 1)")
    arguments = parser.parse_args(argv)
    torch = load_torch()
    if arguments.threads is not None:
        limit_threads(arguments.threads)
    threads = blas_threads() or arguments.threads or os.cpu_count() or 1
    if torch is not None:
        torch.set_num_threads(threads)
    print(", ".join(f"{key} {value}" for key, value in describe(torch).items()), flush=True)
    steps, batch, image, repeats = (10, 1, 32, 2) if arguments.quick else (100, 8, 224, 5)
    for run in range(arguments.runs):
        before = os.getloadavg()[0]
        rows = [measure_lenet_step(torch, steps), measure_resnet_forward(torch, batch, image, repeats)]
        print(f"\nrun {run + 1} of {arguments.runs}, load average {before:.2f} before, {os.getloadavg()[0]:.2f} after")
        print(report.table(rows))
        for row in rows:
            cpu = row.details["cpu_ms"]
            ratio = f", ratio {cpu['ratio']:.3g}" if "ratio" in cpu else ""
            shown = ", ".join(f"{name} {value:.4g} ms" for name, value in cpu.items() if name != "ratio")
            print(f"  CPU time, {row.title.split(' in-process')[0]}: {shown}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
