"""The scaling model of data-parallel jobs on Ray: predicted steps/s against replicas (1 to 64) and
batch size (128 to 8,192), for the bench MLP and LeNet-5, from what is measured on this machine.

`python -m bench.scaling [--chart docs/scaling.png] [--markdown]` measures its inputs (a few
seconds each), prints the table and draws the chart. The inputs, all measured here:

- c0, c1: one replica's compute per step, `c0 + c1 * examples`: the forward and reverse pass of
  the graph (Plan.backward, one BLAS thread, as a replica on one CPU runs it) timed at two batch
  sizes.
- G: the gradient's bytes (= the parameters' bytes, float32).
- O: chainrule's fixed cost per step on Ray, one replica on this machine: row 13's time per
  step minus the in-process job's (server to driver and back, the object store, Ray's call,
  combining, the optimizer step's share beyond the in-process one).
- L, R_local: Ray's round trip with nothing to move, and the rate at which a replica's payload
  moves through the object store on one machine.

And assumed, since one machine cannot measure them:

- Each replica has CPUs of its own (no sharing with other replicas, the server or the driver).
- Replicas beyond one sit on other machines and exchange through the driver's network link at
  R_net = 1.25 GB/s (10 Gb/s Ethernet): every step the driver's node sends the parameters to and
  receives a gradient from each replica, 2 * N * G bytes through one link (a star, not the ring
  all-reduce of DistributedDataParallel, whose traffic per node does not grow with N).
- The shards are ceil(B / N) examples, the largest shard setting the pace.

So the step time is T(N, B) = c0 + c1 * ceil(B / N) + O + 2 * N * G / R_net (the last term 0 at
N = 1, whose exchange is in O), and steps/s = 1 / T. Compute falls as 1/N and traffic grows as
N: the curve bends near N* = sqrt(c1 * B * R_net / (2 G)), past which replicas slow a step down.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from bench.cnn import LENET_CLASSES, LenetWorkload, lenet_graph
from bench.mlp import CLASSES, INPUTS, Workload, mlp_graph
from chainrule.server.graph import build_graph
from chainrule.server.plan import Plan

REPLICAS = (1, 2, 4, 8, 16, 32, 64)
BATCHES = (128, 512, 2048, 8192)
NETWORK_BYTES_PER_SECOND = 1.25e9
SMALL, LARGE = 64, 512
"""The batch sizes compute is timed at."""
REPEATS = 7


@dataclass(frozen=True)
class Model:
    name: str
    c0: float
    """Seconds of a replica's step that do not grow with its examples."""
    c1: float
    """Seconds per example."""
    gradient_bytes: int

    def step_seconds(self, replicas: int, batch: int, overhead: float, rate: float = NETWORK_BYTES_PER_SECOND) -> float:
        traffic = 0.0 if replicas == 1 else 2 * replicas * self.gradient_bytes / rate
        return self.c0 + self.c1 * math.ceil(batch / replicas) + overhead + traffic

    def best_replicas(self, batch: int, rate: float = NETWORK_BYTES_PER_SECOND) -> float:
        return math.sqrt(self.c1 * batch * rate / (2 * self.gradient_bytes))


def _compute(name: str, graph: Plan, parameters: dict[str, np.ndarray], batch: Callable[[int], dict]) -> Model:
    names = list(parameters)

    def seconds(size: int) -> float:
        feeds = batch(size)
        samples = []
        for _ in range(REPEATS + 1):
            start = time.perf_counter()
            _, reverse = graph.backward(feeds, parameters, "loss", names)
            for _ in reverse:
                pass
            samples.append(time.perf_counter() - start)
        return statistics.median(samples[1:])

    with threadpool_limits(1):
        small, large = seconds(SMALL), seconds(LARGE)
    c1 = max((large - small) / (LARGE - SMALL), 0.0)
    return Model(name, max(small - c1 * SMALL, 0.0), c1, sum(value.nbytes for value in parameters.values()))


def measure_models() -> list[Model]:
    rng = np.random.default_rng(0)
    mlp = Workload.synthetic()
    lenet = LenetWorkload.synthetic()

    def mlp_batch(size: int) -> dict[str, np.ndarray]:
        return {
            "x": rng.standard_normal((size, INPUTS), dtype=np.float32),
            "y": np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, size)],
        }

    def lenet_batch(size: int) -> dict[str, np.ndarray]:
        return {
            "x": rng.standard_normal((size, 1, 28, 28), dtype=np.float32),
            "y": np.eye(LENET_CLASSES, dtype=np.float32)[rng.integers(0, LENET_CLASSES, size)],
        }

    return [
        _compute("MLP 784-256-10", Plan(build_graph(mlp_graph(mlp.initial).to_proto())), mlp.initial, mlp_batch),
        _compute("LeNet-5", Plan(build_graph(lenet_graph(lenet.initial).to_proto())), lenet.initial, lenet_batch),
    ]


def table(models: list[Model], overhead: float) -> str:
    """Markdown: predicted steps/s, a row per replica count, a column per model and batch size."""
    header = "| replicas | " + " | ".join(f"{m.name.split()[0]} B={b:,}" for m in models for b in BATCHES) + " |"
    lines = [header, "|" + "---:|" * (1 + len(models) * len(BATCHES))]
    for replicas in REPLICAS:
        cells = [f"{1 / m.step_seconds(replicas, b, overhead):,.1f}" for m in models for b in BATCHES]
        lines.append(f"| {replicas} | " + " | ".join(cells) + " |")
    best = [f"{m.best_replicas(b):.1f}" for m in models for b in BATCHES]
    lines.append("| N* (bend) | " + " | ".join(best) + " |")
    return "\n".join(lines)


def chart(models: list[Model], overhead: float, path: Path, measured: dict[int, float] | None = None) -> str | None:
    """Predicted steps/s against replicas, one panel per model, a line per batch size; the
    measured MLP points (batch 128, this 2-core machine) as markers. None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    figure, axes = plt.subplots(1, len(models), figsize=(11, 4.2), sharey=False)
    for axis, model in zip(axes, models, strict=True):
        for batch in BATCHES:
            rates = [1 / model.step_seconds(replicas, batch, overhead) for replicas in REPLICAS]
            axis.plot(REPLICAS, rates, marker="o", markersize=3, label=f"batch {batch:,}")
        if measured and model.name.startswith("MLP"):
            axis.plot(list(measured), list(measured.values()), "kx", markersize=9, label="measured here, batch 128")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(REPLICAS, [str(r) for r in REPLICAS])
        axis.set_xlabel("replicas")
        axis.set_ylabel("predicted steps/s")
        axis.set_title(f"{model.name}: {model.gradient_bytes / 1e6:.2f} MB of gradients")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("Data-parallel jobs on Ray: steps/s predicted from measured compute, overhead and 10 Gb/s links")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=Path("bench/results/scaling.png"), help="PNG to draw")
    parser.add_argument("--steps", type=int, default=200, help="steps of each Ray job timed (rows 13 and 14)")
    arguments = parser.parse_args(argv)
    from bench.ray_replicas import measure_ray_jobs

    one, two, round_trip = measure_ray_jobs(Workload.synthetic(), arguments.steps, 2)
    overhead = one.details["per_step_overhead_ms"] / 1e3
    models = measure_models()
    local = one.baselines["in-process"]
    print(f"steps/s: in the server {local:.1f}; on Ray 1 replica {one.chainrule:.1f}, 2 replicas {two.chainrule:.1f}")
    print(
        f"round trip: {round_trip.empty_ms:.2f} ms empty, {round_trip.payload_ms:.2f} ms with "
        f"{round_trip.payload_bytes / 1e6:.2f} MB each way ({round_trip.bytes_per_second / 1e9:.2f} GB/s); "
        f"chainrule's overhead per step on Ray O = {overhead * 1e3:.2f} ms"
    )
    for model in models:
        print(
            f"{model.name}: c0 {model.c0 * 1e3:.3f} ms, c1 {model.c1 * 1e6:.2f} us/example, "
            f"G {model.gradient_bytes / 1e6:.3f} MB"
        )
    print(table(models, overhead))
    skipped = chart(models, overhead, arguments.chart, {1: one.chainrule, 2: two.chainrule})
    print(skipped or f"chart: {arguments.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
