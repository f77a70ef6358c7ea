"""The scaling model of data-parallel jobs on Ray: predicted steps/s against replicas (1 to 64) and
batch size (128 to 8,192), for the bench MLP and LeNet-5, from what is measured on this machine.

`python -m bench.scaling [--chart PATH] [--out PATH] [--steps N] [--repeats N]` runs rows 13 and 14
(bench/ray_replicas.py) and, in the same interleaved rounds, times every input below; it prints them,
checks the model against the steps/s measured at 1 and 2 replicas, prints the predicted table and the
best replica count at each network rate (markdown), writes it all as JSON and draws the chart. Every
process runs one BLAS thread, as a replica holding one CPU does. A step at N replicas on a batch of B
examples takes

    T(N, B) = C(ceil(B / N)) + S + O + (N - 1) * e + 2 * (N - 1) * G / R

and steps/s = 1 / T. The terms, medians over the rounds, all measured here but R:

- C(n): one replica's forward and reverse pass (Plan.backward) on a shard of n examples, timed in
  this process at every shard size from 2 to 2,048 the table needs, and beyond 2,048 extended at the
  cost per example between 1,024 and 2,048 (c1). Its CPU time: a replica on a core of its own
  computes for that long, where wall time here also counts the waits for a core others hold.
- S: the server's own work per step, whatever computes the step: the in-process job's time per step
  (row 13's baseline) minus its compute, C(128) in wall time. It is the job's batch, optimizer step,
  event, history and its share of the commits every 100 steps. Measured on the MLP, and taken as the
  same for LeNet-5, whose inputs are the same size and whose optimizer step moves a third of the bytes.
- O: what one replica on Ray adds to a step, row 13's time per step minus its baseline's, made of
  - H: the server's hop to the job's Ray driver, a process of its own: a step's message carrying
    the parameters, pickled through a socket, and the answer carrying the gradients;
  - E1: the driver's part with one replica: the parameters put in Ray's object store, an actor call
    that reads them and returns gradients of the same size, its result gathered and combined;
  - W: the rest, which H and E1 timed apart from the job do not account for (the server process's
    own waits; the job's own driver, timed too, takes about H + E1 + C(128)). Both H and E1 are
    measured for each graph's parameters; W is the MLP's, taken as the same for LeNet-5.
- e: what each further replica adds to the driver's part: the driver process's own CPU time per
  replica (the slope of its CPU time over 1, 2 and 4 replicas), since on a cluster the replicas' own
  work runs elsewhere, in parallel, and their bytes are the network term's.
- G: the gradient's bytes (= the parameters' bytes, float32).

Assumed, since one machine cannot measure them:

- Each replica has a core of its own, and the server and the driver have theirs.
- Replica 0 runs on the driver's node and the others on other machines, which exchange through the
  driver's network link at R: 10 Gb/s in the table, and 1 and 25 Gb/s to show what the link does.
  Every step the driver sends the parameters to each of the others, then receives a gradient from
  each: two phases of (N - 1) * G bytes through one link (a star, not the ring all-reduce of PyTorch's
  DistributedDataParallel, whose traffic per node does not grow with N).
- The shards are ceil(B / N) examples, the largest setting the pace.

The check: on this machine nothing crosses a network, the replicas' work shares the two cores with
the driver's, and the jobs compute in wall time; so with R infinite, C in wall time and e = E(2) - E(1)
as timed here, T(2, 128) should be the time row 14's steps take (T(1, 128) is row 13's by the
definition of W). The output gives the model's steps/s over the measured ones.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.cnn import LENET_CLASSES, LenetWorkload, lenet_graph
from bench.machine import describe, limit_threads
from bench.mlp import BATCH, CLASSES, INPUTS, Workload, mlp_graph
from bench.ray_replicas import RayMeasurements, measure_ray_jobs
from chainrule.server.graph import build_graph
from chainrule.server.plan import Plan

REPLICAS = (1, 2, 4, 8, 16, 32, 64)
BATCHES = (128, 512, 2048, 8192)
GIGABIT = 1e9 / 8
"""Bytes per second of 1 Gb/s."""
RATES = {"1 Gb/s": 1 * GIGABIT, "10 Gb/s": 10 * GIGABIT, "25 Gb/s": 25 * GIGABIT}
TABLE_RATE = "10 Gb/s"
LARGEST_TIMED = 2048
SHARD_SIZES = tuple(2**power for power in range(1, 12))
"""Every shard size the table needs up to LARGEST_TIMED (B / N, both powers of two)."""


@dataclass(frozen=True)
class Model:
    """One graph's terms of T(N, B), in seconds and bytes."""

    name: str
    compute: dict[int, float]
    """C(n) at each timed shard size n."""
    gradient_bytes: int
    server: float
    """S"""
    ray: float
    """O = H + E1 + W"""
    per_replica: float
    """e"""

    @property
    def per_example(self) -> float:
        """c1: the cost of an example in large shards, which extends C beyond LARGEST_TIMED."""
        return (self.compute[LARGEST_TIMED] - self.compute[LARGEST_TIMED // 2]) / (LARGEST_TIMED // 2)

    def compute_seconds(self, examples: int) -> float:
        if examples in self.compute:
            return self.compute[examples]
        assert examples > LARGEST_TIMED, f"shard size {examples} was not timed"
        return self.compute[LARGEST_TIMED] + self.per_example * (examples - LARGEST_TIMED)

    def step_seconds(self, replicas: int, batch: int, rate: float = RATES[TABLE_RATE]) -> float:
        network = 2 * (replicas - 1) * self.gradient_bytes / rate
        exchange = self.ray + (replicas - 1) * self.per_replica
        return self.compute_seconds(math.ceil(batch / replicas)) + self.server + exchange + network

    def best(self, batch: int, rate: float) -> tuple[int, float]:
        """The replica count (of REPLICAS) with the most steps/s, and its steps/s."""
        replicas = min(REPLICAS, key=lambda count: self.step_seconds(count, batch, rate))
        return replicas, 1 / self.step_seconds(replicas, batch, rate)


class Graph:
    """A graph's plan, parameters and a batch of each shard size, for timing its compute."""

    def __init__(self, plan: Plan, parameters: dict[str, np.ndarray], batch: Callable[[int], dict]) -> None:
        self.plan = plan
        self.parameters = parameters
        self.feeds = {size: batch(size) for size in SHARD_SIZES}
        self.cpu: dict[int, list[float]] = {size: [] for size in SHARD_SIZES}
        """The CPU time of each sample, beside the wall time `compute` returns."""

    def compute(self, size: int) -> float:
        """The median wall time of a few forward and reverse passes on a shard of `size` examples."""
        names = list(self.parameters)
        wall, cpu = [], []
        for _ in range(3 if size >= 512 else 7):
            start, start_cpu = time.perf_counter(), time.thread_time()
            _, reverse = self.plan.backward(self.feeds[size], self.parameters, "loss", names)
            for _ in reverse:
                pass
            wall.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
        self.cpu[size].append(statistics.median(cpu))
        return statistics.median(wall)


def graphs() -> dict[str, Graph]:
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

    return {
        "MLP": Graph(Plan(build_graph(mlp_graph(mlp.initial).to_proto())), mlp.initial, mlp_batch),
        "LeNet-5": Graph(Plan(build_graph(lenet_graph(lenet.initial).to_proto())), lenet.initial, lenet_batch),
    }


def models(measured: RayMeasurements, timed: dict[str, Graph]) -> tuple[list[Model], Model]:
    """Each graph's model with its compute in CPU time (a replica on a core of its own), and the MLP's
    with its compute in wall time and e as a second replica costs here (the cores shared), for the check."""
    wall = {name: {size: measured.alongside[f"compute {name} {size}"] for size in SHARD_SIZES} for name in timed}
    server = measured.step[0] - wall["MLP"][BATCH]
    rest = unexplained(measured)
    found = []
    for name, graph in timed.items():
        exchange = measured.exchanges[name]
        cpu = {size: statistics.median(samples[1:]) for size, samples in graph.cpu.items()}  # [0]: the warm-up
        ray = exchange.hop + exchange.ray[1] + rest
        found.append(Model(name, cpu, exchange.payload_bytes, server, ray, exchange.next_replica))
    here = replace(found[0], compute=wall["MLP"], per_replica=measured.exchanges["MLP"].next_replica_here)
    return found, here


def unexplained(measured: RayMeasurements) -> float:
    """W: what a step of the MLP's job on one replica costs over the in-process job's, beyond H and E1."""
    mlp = measured.exchanges["MLP"]
    return measured.step[1] - measured.step[0] - mlp.hop - mlp.ray[1]


def table(models: list[Model]) -> str:
    """Markdown: predicted steps/s at TABLE_RATE, a row per replica count, a column per model and batch size."""
    header = "| replicas | " + " | ".join(f"{m.name} B={b:,}" for m in models for b in BATCHES) + " |"
    lines = [header, "|" + "---:|" * (1 + len(models) * len(BATCHES))]
    for replicas in REPLICAS:
        cells = [f"{1 / m.step_seconds(replicas, b):,.1f}" for m in models for b in BATCHES]
        lines.append(f"| {replicas} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sensitivity(models: list[Model]) -> str:
    """Markdown: the best replica count and its steps/s at each network rate."""
    header = "| link | " + " | ".join(f"{m.name} B={b:,}" for m in models for b in BATCHES) + " |"
    lines = [header, "|---|" + "---:|" * (len(models) * len(BATCHES))]
    for label, rate in RATES.items():
        cells = []
        for model in models:
            for batch in BATCHES:
                replicas, steps = model.best(batch, rate)
                cells.append(f"{replicas}: {steps:,.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(models: list[Model], path: Path, measured: dict[int, float], note: str) -> str | None:
    """Predicted steps/s against replicas: a row of panels per model, a column per network rate, a line
    per batch size; the MLP's measured points (batch 128, this 2-core machine, loopback) as markers.
    None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    figure, axes = plt.subplots(len(models), len(RATES), figsize=(13, 8), sharey="row", squeeze=False)
    for row, model in zip(axes, models, strict=True):
        for axis, (link, rate) in zip(row, RATES.items(), strict=True):
            for batch in BATCHES:
                rates = [1 / model.step_seconds(replicas, batch, rate) for replicas in REPLICAS]
                axis.plot(REPLICAS, rates, marker="o", markersize=3, label=f"batch {batch:,}")
            if model.name == "MLP":
                label = "measured here (one machine), 128"
                axis.plot(list(measured), list(measured.values()), "kx", markersize=9, label=label)
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(REPLICAS, [str(r) for r in REPLICAS])
            axis.set_title(f"{model.name} ({model.gradient_bytes / 1e6:.2f} MB of gradients), {link} links")
            axis.grid(True, which="both", alpha=0.3)
            if axis is row[0]:
                axis.set_ylabel("predicted steps/s")
                axis.legend(fontsize=8)
            if model is models[-1]:
                axis.set_xlabel("replicas")
    figure.suptitle("Data-parallel jobs on Ray: steps/s predicted from terms measured here (bench/scaling.py)")
    figure.text(0.01, 0.005, note, fontsize=7, alpha=0.7)
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=Path("bench/results/scaling.png"), help="PNG to draw")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaling.json"), help="JSON results")
    parser.add_argument("--steps", type=int, default=200, help="steps of each long job run (rows 13 and 14)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, after one warm-up round")
    arguments = parser.parse_args(argv)
    limit_threads(1)
    machine = describe(None)
    started, load_before = datetime.datetime.now(datetime.UTC), os.getloadavg()
    timed = graphs()
    alongside = {
        f"compute {name} {size}": (lambda graph=graph, size=size: graph.compute(size))
        for name, graph in timed.items()
        for size in SHARD_SIZES
    }
    payloads = {name: graph.parameters for name, graph in timed.items()}
    measured = measure_ray_jobs(Workload.synthetic(), arguments.steps, arguments.repeats, payloads, alongside)
    load_after = os.getloadavg()
    found, here_model = models(measured, timed)
    mlp, exchange, rest = found[0], measured.exchanges["MLP"], unexplained(measured)
    here = {replicas: 1 / here_model.step_seconds(replicas, BATCH, math.inf) for replicas in (1, 2)}
    rates = {replicas: 1 / measured.step[replicas] for replicas in (1, 2)}
    ms = 1e3

    print(f"machine: {machine['cpu']}, {machine['cores']} cores; {started:%Y-%m-%d %H:%M} UTC")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(
        f"MLP job, batch {BATCH}, steps/s: in the server {1 / measured.step[0]:.1f}; on Ray 1 replica "
        f"{rates[1]:.1f}, 2 replicas {rates[2]:.1f} (a run's start beyond its steps: "
        + ", ".join(f"{measured.start[replicas]:.2f} s" for replicas in (0, 1, 2))
        + ")"
    )
    print(
        f"S {mlp.server * ms:.2f} ms: the in-process job's {measured.step[0] * ms:.2f} ms a step minus C(128) "
        f"{here_model.compute[BATCH] * ms:.2f} ms in wall time"
    )
    print(
        f"O {(measured.step[1] - measured.step[0]) * ms:.2f} ms: a step on one replica over the in-process one; "
        f"H {exchange.hop * ms:.2f} + E1 {exchange.ray[1] * ms:.2f} + W {rest * ms:.2f} ms"
    )
    print(
        "the job's own driver and replicas, a step as a server sends it: "
        + ", ".join(f"{replicas} replica(s) {seconds * ms:.2f} ms" for replicas, seconds in measured.driver.items())
        + f" (H + E1 + C(128) = {(exchange.hop + exchange.ray[1] + here_model.compute[BATCH]) * ms:.2f} ms)"
    )
    print(f"a Ray call with nothing to move: {exchange.empty * ms:.2f} ms")
    for model in found:
        parts = measured.exchanges[model.name]
        print(
            f"{model.name}: G {model.gradient_bytes / 1e6:.3f} MB, C(128) {model.compute[BATCH] * ms:.2f} ms CPU, "
            f"c1 {model.per_example * 1e6:.1f} us/example, H {parts.hop * ms:.2f} ms, E(1, 2, 4) "
            + ", ".join(f"{seconds * ms:.2f}" for seconds in parts.ray.values())
            + " ms, the driver's CPU in them "
            + ", ".join(f"{seconds * ms:.2f}" for seconds in parts.ray_cpu.values())
            + f" ms: O {model.ray * ms:.2f} ms, e {model.per_replica * ms:.2f} ms "
            f"(on this machine, E(2) - E(1) = {parts.next_replica_here * ms:.2f} ms)"
        )
    print(
        f"check, this machine (R infinite, C in wall time, e = E(2) - E(1)): at 1 replica {here[1]:.1f} steps/s "
        f"(W makes it the measured {rates[1]:.1f}); at 2 replicas {here[2]:.1f} against {rates[2]:.1f} measured "
        f"({here[2] / rates[2]:.2f})"
    )
    print()
    print(table(found))
    print()
    print(sensitivity(found))
    note = (
        f"{machine['cpu']}, {machine['cores']} cores, {started:%Y-%m-%d}, load average "
        f"{load_before[0]:.1f} to {load_after[0]:.1f}; terms timed on one BLAS thread"
    )
    skipped = chart(found, arguments.chart, rates, note)
    print(skipped or f"chart: {arguments.chart}")
    document: dict[str, Any] = {
        "machine": machine,
        "started": started.isoformat(),
        "load_average": {"before": load_before, "after": load_after},
        "measured": {
            "steps_per_second": {str(replicas): 1 / seconds for replicas, seconds in measured.step.items()},
            "start_seconds": {str(replicas): seconds for replicas, seconds in measured.start.items()},
            "exchanges": {name: exchange.to_json() for name, exchange in measured.exchanges.items()},
            "rows": [measurement.to_json() for measurement in measured.rows],
        },
        "models": [{**asdict(model), "per_example": model.per_example} for model in found],
        "mlp_compute_wall": here_model.compute,
        "server_ms": mlp.server * ms,
        "unexplained_ms": rest * ms,
        "driver_step_ms": {str(replicas): seconds * ms for replicas, seconds in measured.driver.items()},
        "here": {str(replicas): {"model": here[replicas], "measured": rates[replicas]} for replicas in (1, 2)},
        "predicted": {
            label: {
                model.name: {
                    str(batch): {str(n): 1 / model.step_seconds(n, batch, rate) for n in REPLICAS} for batch in BATCHES
                }
                for model in found
            }
            for label, rate in RATES.items()
        },
    }
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
