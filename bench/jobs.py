"""Measurements 11 and 12: a training job's steps/s, and what watching it costs.

The job trains the bench MLP (784-256-10, float32, batch 128, SGD) on the same eight batches as
measurements 2 and 3, uploaded once as a dataset and read in order, so each of its steps is the
step the others take. Its rate comes from the server's own clock (the job's start and end times),
so the client's polling is not part of it (but its CPU is: each GetJob costs both processes some).
The baselines are the same steps in-process through the engine (a TrainingSession committing to
a SQLite file where the job commits, at the server's default interval) and PyTorch's in-process
loop. With watchers, eight WatchJob streams follow the job live, each read to the end by a thread
of the bench; without, the bench polls GetJob. The watched row also reports what a watcher costs
per event in CPU, the server's (from /proc) and the bench's (whose threads read the watches), as
the watched runs' CPU time less the unwatched runs', and the floor under it: what the same events
cost both sides with a bare gRPC server at the job's pace (bench.raw_watch).
"""

from __future__ import annotations

import itertools
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np

import chainrule.client as cr
from bench import raw_watch
from bench.graph_cost import cpu_seconds
from bench.measure import Measurement, Target, interleaved
from bench.mlp import LEARNING_RATE, SETTLE_SECONDS, TorchTrainer, Workload, mlp_graph
from bench.server import ChildServer
from chainrule.server import optim
from chainrule.server.engine import DEFAULT_CHECKPOINT_EVERY, Engine
from chainrule.server.jobs.runner import NO_AUTOMATIC_COMMITS
from chainrule.server.store import SqliteStore

WATCHERS = 8
POLL_SECONDS = 0.5
"""How often the bench asks whether the job ended. The rate comes from the server's clock, so a slow
poll costs the figure nothing, where a fast one would: a GetJob takes about 1 ms of the server's
CPU here, and at 20 polls a second that was 2% of the job's time, which its baselines do not pay."""
FLOOR_REPEATS = 3


def workload_columns(workload: Workload) -> dict[str, np.ndarray]:
    """The workload's batches end to end: a dataset whose in-order batches are exactly them."""
    return {name: np.concatenate([batch[name] for batch in workload.batches]) for name in ("x", "y")}


class JobRunner:
    """Runs the MLP job on one graph of the server, its parameters reset before each run."""

    def __init__(self, client: cr.Client, workload: Workload, steps: int) -> None:
        self.client = client
        self.workload = workload
        self.steps = steps
        self.graph_id = client.create_graph(mlp_graph(workload.initial)).graph_id
        self.dataset_id = client.upload_dataset("bench mlp", workload_columns(workload), progress=False).dataset_id
        self.final_loss = float("nan")

    def run(self, watchers: int = 0) -> float:
        """Seconds per step by the server's clock."""
        self.client.set_parameters(self.graph_id, self.workload.initial)
        time.sleep(SETTLE_SECONDS)
        job = self.client.create_job(
            self.graph_id,
            self.dataset_id,
            loss="loss",
            optimizer=cr.Sgd(LEARNING_RATE),
            feeds={"x": "x", "y": "y"},
            batch_size=len(self.workload.batches[0]["x"]),
            max_steps=self.steps,
            shuffle=False,
        )
        threads = [threading.Thread(target=lambda: list(job.watch()), daemon=True) for _ in range(watchers)]
        for thread in threads:
            thread.start()
        info = job.info()
        while not info.ended:
            time.sleep(POLL_SECONDS)
            info = job.info()
        for thread in threads:
            thread.join()
        assert info.state == "succeeded" and info.step == self.steps, f"the job ended {info.state}: {info.error}"
        assert info.start_time is not None and info.end_time is not None
        self.final_loss = info.loss
        return (info.end_time - info.start_time).total_seconds() / self.steps

    def close(self) -> None:
        self.client.delete_graph(self.graph_id)
        self.client.delete_dataset(self.dataset_id)


class EngineRunner:
    """The same steps through the engine in-process: a TrainingSession on a SQLite file store."""

    def __init__(self, workload: Workload, steps: int, directory: Path) -> None:
        self.workload = workload
        self.steps = steps
        self.engine = Engine(SqliteStore(str(directory / "engine.db")))
        self.graph_id = self.engine.create_graph(mlp_graph(workload.initial).to_proto()).graph_id
        self.final_loss = float("nan")

    def run(self) -> float:
        """Seconds per step, committing where the job commits: every DEFAULT_CHECKPOINT_EVERY steps
        on the clock, and the last steps after it stops, as the job's end time is taken before its
        last commit."""
        self.engine.set_parameters(self.graph_id, self.workload.initial)
        session = self.engine.start_training(
            self.graph_id, "loss", optim.Sgd(LEARNING_RATE), checkpoint_every=NO_AUTOMATIC_COMMITS, keep_updates=False
        )
        store = self.engine.store
        time.sleep(SETTLE_SECONDS)
        start = time.perf_counter()
        for step in range(1, self.steps + 1):
            self.final_loss = session.step(self.workload.batch(step - 1)).loss
            if step % DEFAULT_CHECKPOINT_EVERY == 0 and step < self.steps:
                session.commit(lambda checkpoint, fence: store.save_checkpoint(self.graph_id, checkpoint, fence))
        elapsed = time.perf_counter() - start
        session.finish()
        return elapsed / self.steps

    def close(self) -> None:
        self.engine.store.close()


def measure_job_throughput(
    client: cr.Client, torch: ModuleType | None, workload: Workload, steps: int, repeats: int
) -> tuple[Measurement, Measurement]:
    """Steps/s of a job against the engine in-process (row 11a) and against PyTorch's loop (row 11b)."""
    job = JobRunner(client, workload, steps)
    trainer = TorchTrainer(torch, workload) if torch is not None else None
    losses: dict[str, float] = {}

    def local_torch() -> float:
        assert trainer is not None
        trainer.reset(workload.initial)
        time.sleep(SETTLE_SECONDS)
        start = time.perf_counter()
        losses["pytorch"] = trainer.train(steps)[-1]
        return (time.perf_counter() - start) / steps

    with tempfile.TemporaryDirectory(prefix="chainrule-bench-engine-") as directory:
        engine = EngineRunner(workload, steps, Path(directory))
        runs: dict[str, Callable[[], float] | None] = {
            "job": job.run,
            "engine": engine.run,
            "pytorch": local_torch if trainer is not None else None,
        }
        interleaved(runs, 1)  # warm-up: plans, caches, allocator pools, PyTorch's lazy initialization
        samples = interleaved(runs, repeats)
        engine.close()
    job.close()
    losses.update(job=job.final_loss, engine=engine.final_loss)
    rates = {name: 1 / statistics.median(samples[name]) if name in samples else None for name in runs}
    details = {"steps": steps, "repeats": repeats, "final_loss": losses, "poll_seconds": POLL_SECONDS}
    assert rates["job"] is not None and rates["engine"] is not None
    against_engine = Measurement(
        key="job_throughput",
        title=f"11a job steps/s vs the engine in-process, MLP, {steps} steps",
        unit="steps/s",
        chainrule=rates["job"],
        baselines={"engine": rates["engine"]},
        ratio_baseline="engine",
        target=Target(">=", 0.95),
        details=details,
    )
    against_torch = Measurement(
        key="job_vs_pytorch",
        title=f"11b job steps/s vs PyTorch in-process, MLP, {steps} steps",
        unit="steps/s",
        chainrule=rates["job"],
        baselines={"pytorch": rates["pytorch"]},
        ratio_baseline="pytorch",
        target=Target(">=", 0.9),
        details=details,
    )
    return against_engine, against_torch


def measure_watchers(client: cr.Client, workload: Workload, steps: int, repeats: int, server: Path) -> Measurement:
    """A job's steps/s with eight watchers attached, against the same job with none; `server` is the
    server's /proc directory."""
    job = JobRunner(client, workload, steps)
    cpu: dict[str, list[tuple[float, float]]] = {"watched": [], "unwatched": []}

    def run(name: str, watchers: int) -> float:
        before = cpu_seconds(server), cpu_seconds(Path("/proc/self"))
        seconds = job.run(watchers)
        cpu[name].append((cpu_seconds(server) - before[0], cpu_seconds(Path("/proc/self")) - before[1]))
        return seconds

    runs: dict[str, Callable[[], float] | None] = {
        "watched": lambda: run("watched", WATCHERS),
        "unwatched": lambda: run("unwatched", 0),
    }
    interleaved(runs, 1)
    for warm_up in cpu.values():
        warm_up.clear()
    samples = interleaved(runs, repeats)
    job.close()
    events = steps * WATCHERS
    unwatched_rate = 1 / statistics.median(samples["unwatched"])
    floor_server, floor_client = watch_floor(unwatched_rate, steps)

    def per_event(side: int) -> float:
        """Microseconds of CPU per event and watcher, the median watched run's less the median unwatched's."""
        watched = statistics.median(sample[side] for sample in cpu["watched"])
        unwatched = statistics.median(sample[side] for sample in cpu["unwatched"])
        return (watched - unwatched) / events * 1e6

    return Measurement(
        key="job_watchers",
        title=f"12 job steps/s with {WATCHERS} watchers vs none, MLP, {steps} steps",
        unit="steps/s",
        chainrule=1 / statistics.median(samples["watched"]),
        baselines={"unwatched": unwatched_rate},
        ratio_baseline="unwatched",
        target=Target(">=", 0.95),
        details={
            "steps": steps,
            "repeats": repeats,
            "watchers": WATCHERS,
            "poll_seconds": POLL_SECONDS,
            "server_cpu_us_per_event_per_watcher": per_event(0),
            "bench_cpu_us_per_event_per_watcher": per_event(1),
            "raw_grpc_server_cpu_us_per_event": floor_server,
            "raw_grpc_client_cpu_us_per_event": floor_client,
            "raw_grpc_watchers_cores": (floor_server + floor_client) * WATCHERS * unwatched_rate / 1e6,
        },
    )


def watch_floor(rate: float, steps: int) -> tuple[float, float]:
    """Microseconds of CPU per event, the server's and the watching threads', of WATCHERS watches of
    a bare gRPC server sending `steps` events at `rate` a second (medians of FLOOR_REPEATS runs)."""
    server_samples, client_samples = [], []
    runs = itertools.count(1)
    with (
        ChildServer([sys.executable, "-m", "bench.raw_watch"]).start() as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        raw_watch.watch(channel, next(runs), rate, 10)  # warm-up
        server_stat = Path(f"/proc/{server.pid}")
        for _ in range(FLOOR_REPEATS):
            run_id = next(runs)
            threads = [
                threading.Thread(target=raw_watch.watch, args=(channel, run_id, rate, steps)) for _ in range(WATCHERS)
            ]
            before = cpu_seconds(server_stat), cpu_seconds(Path("/proc/self"))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            server_samples.append(cpu_seconds(server_stat) - before[0])
            client_samples.append(cpu_seconds(Path("/proc/self")) - before[1])
    events = steps * WATCHERS
    return statistics.median(server_samples) / events * 1e6, statistics.median(client_samples) / events * 1e6
