"""`python -m bench [--quick] [--out PATH] [--chart PATH] [--threads N]`: run the measurements, report them.

Exit status 0 means the bench ran, whatever the results: the pass/fail column is information
for whoever optimizes, not a gate (a shared, noisy machine would make it a flaky one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import chainrule.client as cr
from bench import report
from bench.chain import measure_per_node
from bench.cnn import measure_lenet_step, measure_resnet_forward
from bench.graph_cost import measure_graph_cost
from bench.jobs import WATCHERS, measure_job_throughput, measure_watchers
from bench.machine import blas_threads, describe, limit_threads, load_torch
from bench.measure import Measurement
from bench.memory import measure_memory
from bench.mlp import Workload, measure_engine_step, measure_remote_training
from bench.ray_replicas import measure_ray_jobs
from bench.server import ChainruleServer
from bench.store_forward import measure_store_forward, postgres_missing
from bench.transfer import measure_large_gradient
from bench.upload import measure_upload

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Settings:
    """Sizes and repeat counts of one mode."""

    chain_lengths: tuple[int, ...]
    chain_repeats: int
    train_steps: int
    train_repeats: int
    engine_steps: int
    large_elements: int
    large_repeats: int
    upload_bytes: int
    upload_repeats: int
    memory_length: int
    memory_width: int
    memory_repeats: int
    graph_sizes: tuple[int, ...]
    lenet_steps: int
    resnet_batch: int
    resnet_image: int
    resnet_repeats: int


FULL = Settings(
    chain_lengths=(1_000, 5_000, 20_000),
    chain_repeats=5,
    train_steps=300,
    train_repeats=3,
    engine_steps=200,
    large_elements=8 * 2**20,  # 64 MiB of float64
    large_repeats=5,
    upload_bytes=256 * 2**20,
    upload_repeats=5,
    memory_length=20_000,
    memory_width=1_000,
    memory_repeats=3,
    graph_sizes=(100_000, 1_000_000),
    lenet_steps=100,
    resnet_batch=8,
    resnet_image=224,
    resnet_repeats=5,
)
QUICK = Settings(
    chain_lengths=(250, 1_000, 2_000),
    chain_repeats=3,
    train_steps=40,
    train_repeats=2,
    engine_steps=30,
    large_elements=2 * 2**20,  # 16 MiB of float64
    large_repeats=3,
    upload_bytes=32 * 2**20,
    upload_repeats=2,
    memory_length=2_000,
    memory_width=1_000,
    memory_repeats=1,
    graph_sizes=(5_000, 20_000),
    lenet_steps=10,
    resnet_batch=1,
    resnet_image=32,
    resnet_repeats=2,
)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI (under a minute on 2 cores)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "results.json", help="JSON results file (default: %(default)s)"
    )
    parser.add_argument(
        "--chart", type=Path, default=RESULTS / "per_node.png", help="per-node cost chart, PNG (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="BLAS and PyTorch threads in every process (default: numpy's BLAS default); "
        "1 gives steadier ratios on a machine other work shares",
    )
    arguments = parser.parse_args(argv)
    if arguments.threads is not None and arguments.threads < 1:
        parser.error(f"--threads must be at least 1, got {arguments.threads}")
    return arguments


def progress(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def run_one(label: str, measure: Callable[[], Measurement]) -> Measurement:
    """Run one measurement, noting how long it took so the quick mode's budget can be checked."""
    progress(label)
    start = time.perf_counter()
    measurement = measure()
    measurement.details["elapsed_seconds"] = time.perf_counter() - start
    return measurement


def run_both(label: str, measure: Callable[[], tuple[Measurement, Measurement]]) -> tuple[Measurement, Measurement]:
    """As run_one, for a measurement that makes two rows (they share their details)."""
    progress(label)
    start = time.perf_counter()
    first, second = measure()
    first.details["elapsed_seconds"] = time.perf_counter() - start
    return first, second


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    mode, settings = ("quick", QUICK) if arguments.quick else ("full", FULL)
    started, load_before = time.perf_counter(), os.getloadavg()
    torch = load_torch()
    if arguments.threads is not None:
        limit_threads(arguments.threads)
    threads = blas_threads() or arguments.threads or os.cpu_count() or 1
    if torch is not None:
        torch.set_num_threads(threads)  # the same parallelism as numpy's BLAS, on both sides of every ratio
    machine = describe(torch)
    progress(f"{mode} mode on " + ", ".join(f"{key} {value}" for key, value in machine.items()))
    if torch is None:
        progress("PyTorch is not installed (pip install -e '.[bench]'): its columns read n/a")

    workload = Workload.synthetic()
    with ChainruleServer().start() as server, cr.Client(server.address) as client:
        per_node = run_one(
            f"1/5 per-node cost, chain lengths {settings.chain_lengths}",
            lambda: measure_per_node(client, torch, settings.chain_lengths, settings.chain_repeats),
        )
        training = run_one(
            f"2/5 remote training, {settings.train_steps} steps x {settings.train_repeats}",
            lambda: measure_remote_training(client, torch, workload, settings.train_steps, settings.train_repeats),
        )
        engine = run_one(
            f"3/5 in-process engine step, {settings.engine_steps} steps",
            lambda: measure_engine_step(workload, settings.engine_steps),
        )
        large = run_one(
            f"4/5 large gradient, {settings.large_elements * 8 / 2**20:g} MiB x {settings.large_repeats}",
            lambda: measure_large_gradient(server.address, settings.large_elements, settings.large_repeats),
        )
        upload = run_one(
            f"10 dataset upload, {settings.upload_bytes / 2**20:g} MiB x {settings.upload_repeats}",
            lambda: measure_upload(server.address, settings.upload_bytes, settings.upload_repeats),
        )
        job_vs_engine, job_vs_torch = run_both(
            f"11 training job, {settings.train_steps} steps x {settings.train_repeats}",
            lambda: measure_job_throughput(client, torch, workload, settings.train_steps, settings.train_repeats),
        )
        watched = run_one(
            f"12 a job and {WATCHERS} watchers, {settings.train_steps} steps x {settings.train_repeats}",
            lambda: measure_watchers(
                client, workload, settings.train_steps, settings.train_repeats, Path(f"/proc/{server.pid}")
            ),
        )
    memory = run_one(
        f"5/5 memory, chain {settings.memory_length:,} x {settings.memory_width:,}, fresh processes",
        lambda: measure_memory(
            settings.memory_length, settings.memory_width, settings.memory_repeats, torch is not None, threads
        ),
    )

    graph_create, graph_memory = run_both(
        f"6-7 graph cost, chains of {settings.graph_sizes} nodes, fresh servers",
        lambda: measure_graph_cost(settings.graph_sizes),
    )

    lenet = run_one(
        f"8 LeNet-5 training step in-process, {settings.lenet_steps} steps",
        lambda: measure_lenet_step(torch, settings.lenet_steps),
    )
    resnet = run_one(
        f"9 ResNet-18 forward in-process, batch {settings.resnet_batch} of {settings.resnet_image}x"
        f"{settings.resnet_image}, {settings.resnet_repeats} runs",
        lambda: measure_resnet_forward(torch, settings.resnet_batch, settings.resnet_image, settings.resnet_repeats),
    )

    measurements = [per_node, training, engine, large, memory, graph_create, graph_memory, lenet, resnet, upload]
    measurements += [job_vs_engine, job_vs_torch, watched]
    if not arguments.quick:  # a Ray head and its first workers, a private PostgreSQL: seconds to start
        measurements += run_both(
            f"13-14 jobs on Ray, 1 and 2 replicas, {settings.train_steps} steps x {settings.train_repeats}",
            lambda: measure_ray_jobs(workload, settings.train_steps, settings.train_repeats).rows,
        )
        missing = postgres_missing()
        if missing is None:
            measurements.append(run_one("15 Forward on PostgreSQL vs on SQLite", measure_store_forward))
        else:
            progress(f"15 skipped: {missing}")
    elapsed, load_after = time.perf_counter() - started, os.getloadavg()
    print()
    print(report.table(measurements))
    print()
    # A load average near or above the core count means other work shared the machine: trust ratios over times.
    progress(f"took {elapsed:.0f} s; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    run = {
        "settings": asdict(settings),
        "elapsed_seconds": elapsed,
        "load_average": {"before": load_before, "after": load_after},
    }
    report.write_json(arguments.out, mode, machine, measurements, run)
    progress(f"results: {arguments.out}")
    skipped = report.write_chart(arguments.chart, per_node, machine)
    progress(skipped or f"chart: {arguments.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
