"""Measurements 13 and 14: training jobs on Ray, and what a step on Ray costs besides computing.

A private Ray head is started for them (2 CPUs, 127.0.0.1 only, as `--ray-address local` starts
one) and a `chainrule serve --ray-address` joins it. Row 13 is the bench MLP's job (the job of row
11: 784-256-10, float32, batch 128, SGD, the same eight batches in order) at one replica on Ray
against the same job in the server's own process; row 14 is two replicas against one. Every
process runs one BLAS thread, as a replica holding one CPU does, so the in-process job computes
what a replica computes. Rates are the job's steps against the time while it runs, polled from
GetJob, so a run's start (its Ray driver joining the cluster and its replicas compiling the graph,
seconds here) is not spread over its steps; the details give the start apart. On a 2-core
machine two replicas cannot be faster than one: the server, the job's Ray driver and both
replicas share the two cores, and every step moves the gradients and parameters twice as often;
bench/scaling.py predicts where more machines pay off.

In the same rounds, this process times what a step on Ray moves, computing nothing (Exchange):
the server's hop to its job's driver (a step's message carrying the parameters, pickled through a
socket to a process of its own, and the gradients back), and the driver's part as a Ray driver of
the same cluster: the parameters put in the object store, one call per replica on actors that
read them and return gradients of the same size, gathered and combined as the driver combines
them. Ray is not in `--quick`: starting a head and the first job's workers takes seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

import chainrule.client as cr
from bench.jobs import workload_columns
from bench.machine import THREAD_VARIABLES
from bench.measure import Measurement, Target, interleaved
from bench.mlp import BATCH, LEARNING_RATE, SETTLE_SECONDS, Workload, mlp_graph
from bench.server import ChildServer
from chainrule.server.graph import Limits
from chainrule.server.jobs.ray_cluster import LOOPBACK_ENVIRONMENT, LocalRayHead
from chainrule.server.jobs.ray_driver import Opening
from chainrule.server.jobs.replicas import Reduction, ShardResult, combine, split_rows

Parameters = dict[str, np.ndarray]
CALLS = 25
"""Exchanges timed per sample, of which the sample is the median."""
EXCHANGE_REPLICAS = (1, 2, 4)
POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Exchange:
    """What a step on Ray costs besides computing, for one model's parameters: medians, in seconds."""

    payload_bytes: int
    empty: float
    """A call on an actor with nothing to move: Ray's own latency."""
    hop: float
    """The server's step message to its driver, carrying the parameters, and the answer with the gradients."""
    ray: dict[int, float]
    """The driver's part at N replicas: one put, N calls each reading the parameters and returning
    gradients of their size, the results gathered and combined."""
    ray_cpu: dict[int, float]
    """The CPU time the driver's process (its threads and Ray's in it) spends on that part."""

    @property
    def next_replica_here(self) -> float:
        """What a second replica adds to the driver's part on this machine, whose cores the replicas share."""
        return self.ray[2] - self.ray[1]

    @property
    def next_replica(self) -> float:
        """The driver's own CPU time per replica (the slope over 1, 2 and 4): what each replica adds to a
        step when the replicas run elsewhere, in parallel, besides its bytes on the wire."""
        counts = list(self.ray_cpu)
        return float(np.polyfit(counts, [self.ray_cpu[count] for count in counts], 1)[0])

    def to_json(self) -> dict[str, Any]:
        return {
            "payload_bytes": self.payload_bytes,
            "empty_ms": self.empty * 1e3,
            "hop_ms": self.hop * 1e3,
            "ray_ms": {str(replicas): seconds * 1e3 for replicas, seconds in self.ray.items()},
            "ray_driver_cpu_ms": {str(replicas): seconds * 1e3 for replicas, seconds in self.ray_cpu.items()},
        }


@dataclass
class RayMeasurements:
    """Rows 13 and 14, and what they are made of (medians over the rounds, seconds)."""

    one: Measurement
    two: Measurement
    step: dict[int, float]
    """Seconds per step at 0 (in the server's process), 1 and 2 replicas."""
    start: dict[int, float]
    """Seconds of a run's start beyond its steps."""
    exchanges: dict[str, Exchange]
    driver: dict[int, float]
    """Seconds of a step of the MLP's own job driver at 1 and 2 replicas, sent as the server sends it."""
    alongside: dict[str, float] = field(default_factory=dict)
    """The medians of the contenders the caller timed in the same rounds."""

    @property
    def rows(self) -> tuple[Measurement, Measurement]:
        return self.one, self.two


class EchoReplica:
    """A replica that computes nothing: it answers at once, or with gradients of zeros the size of
    the parameters it read, as a replica's shard result."""

    def empty(self) -> None:
        return None

    def step(self, step: int, rows: slice, parameters: Parameters) -> ShardResult:
        gradients = {name: np.zeros_like(value) for name, value in parameters.items()}
        return ShardResult(0.0, float(rows.stop - rows.start), gradients, {})


def _echo_driver(connection: Connection) -> None:
    """A job's driver that computes nothing: each step's message answered with zero gradients."""
    while (message := connection.recv())[0] == "step":
        updates = message[3]
        connection.send(("result", 0.0, {name: np.zeros_like(value) for name, value in updates.items()}, {}))


def _median_of_calls(call: Callable[[], object], cpu: list[float] | None = None) -> float:
    """The median wall time of CALLS calls; with `cpu`, the median CPU time of this process is added to it."""
    samples, used = [], []
    for _ in range(CALLS):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        samples.append(time.perf_counter() - start)
        used.append(time.process_time() - start_cpu)
    if cpu is not None:
        cpu.append(statistics.median(used))
    return statistics.median(samples)


class Exchanges:
    """This process as a server's hop to a driver (a child process) and as a Ray driver (echo actors)."""

    def __init__(self, head: LocalRayHead) -> None:
        import ray

        self.ray = ray
        context = multiprocessing.get_context("spawn")
        self.connection, theirs = context.Pipe()
        self.driver = context.Process(target=_echo_driver, args=(theirs,), daemon=True)
        self.driver.start()
        theirs.close()
        ray.init(address=head.address, logging_level="ERROR", log_to_driver=False)
        echo = ray.remote(EchoReplica).options(num_cpus=0)
        self.actors = [echo.remote() for _ in range(max(EXCHANGE_REPLICAS))]
        ray.get([actor.empty.remote() for actor in self.actors])
        self.cpu: dict[tuple[str, int], list[float]] = {}
        """The driver's CPU time of each sample of `on_ray`, by (payload, replicas)."""

    def empty(self) -> float:
        return _median_of_calls(lambda: self.ray.get(self.actors[0].empty.remote()))

    def hop(self, parameters: Parameters) -> float:
        def call() -> None:
            self.connection.send(("step", 0, split_rows(slice(0, BATCH), 1), parameters))
            self.connection.recv()

        return _median_of_calls(call)

    def on_ray(self, name: str, parameters: Parameters, replicas: int) -> float:
        ray = self.ray

        def call() -> None:
            ref = ray.put(parameters)
            shards = split_rows(slice(0, BATCH), replicas)
            refs = [actor.step.remote(0, rows, ref) for actor, rows in zip(self.actors, shards, strict=False)]
            combine(ray.get(refs), Reduction(True))

        return _median_of_calls(call, self.cpu.setdefault((name, replicas), []))

    def contenders(self, payloads: Mapping[str, Parameters]) -> dict[str, Callable[[], float]]:
        """The hop and the driver's part at each of EXCHANGE_REPLICAS, for each payload."""
        runs: dict[str, Callable[[], float]] = {}
        for name, parameters in payloads.items():
            runs[f"hop {name}"] = lambda parameters=parameters: self.hop(parameters)
            for replicas in EXCHANGE_REPLICAS:
                runs[f"ray {name} {replicas}"] = lambda name=name, parameters=parameters, replicas=replicas: (
                    self.on_ray(name, parameters, replicas)
                )
        return runs

    def close(self) -> None:
        self.ray.shutdown()
        self.connection.send(("close",))
        self.driver.join(10)
        self.connection.close()


class JobDriver:
    """A job's own Ray driver and replicas (server/jobs/ray_driver.py) for the MLP, started as a server
    starts them but holding no CPUs (the jobs' replicas need the cluster's two), and driven from this
    process as the server drives them: a step from sending its message to reading the answer."""

    def __init__(self, head: LocalRayHead, workload: Workload, replicas: int) -> None:
        opening = Opening(
            address=head.address,
            job_id=f"bench-driver-{replicas}",
            definition=mlp_graph(workload.initial).to_proto().SerializeToString(),
            limits=Limits(),
            loss="loss",
            names=tuple(workload.initial),
            reduction=Reduction(True),
            seed=0,
            replicas=replicas,
            replica_cpus=0.0,
            columns=workload_columns(workload),
            parameters=dict(workload.initial),
        )
        self.replicas = replicas
        self.parameters = workload.initial
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "chainrule.server.jobs.ray_driver", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            self.connection = Connection(ours.detach())
        self.connection.send(opening)
        while (answer := self.connection.recv())[0] != "ready":
            assert answer[0] in ("joined", "waiting"), f"the job's driver answered {answer}"

    def step(self) -> float:
        def call() -> None:
            self.connection.send(("step", 0, split_rows(slice(0, BATCH), self.replicas), self.parameters))
            answer = self.connection.recv()
            assert answer[0] == "result", f"the job's driver answered {answer}"

        return _median_of_calls(call)

    def close(self) -> None:
        self.connection.send(("close",))
        self.process.wait(30)
        self.connection.close()


class RayJobs:
    """The MLP's job on a server, at a number of replicas (0: the server's own process)."""

    def __init__(self, servers: dict[str, ChildServer], workload: Workload, steps: int) -> None:
        self.workload = workload
        self.steps = steps
        self.clients = {kind: cr.Client(server.address) for kind, server in servers.items()}
        self.graphs = {kind: c.create_graph(mlp_graph(workload.initial)).graph_id for kind, c in self.clients.items()}
        columns = workload_columns(workload)
        self.datasets = {
            kind: c.upload_dataset("bench mlp", columns, progress=False).dataset_id for kind, c in self.clients.items()
        }
        self.final_loss: dict[int, float] = {}
        self.starts: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def run(self, replicas: int) -> float:
        """Seconds per step while the job runs: the slope of its step against the time over the GetJob
        polls that saw it running, so a run's start (the job's first step waits for its driver to join
        the cluster and its replicas to compile the graph) is not spread over its steps. What the run
        took beyond its steps by the server's clock goes to `starts`."""
        kind = "ray" if replicas else "local"
        client, graph_id = self.clients[kind], self.graphs[kind]
        client.set_parameters(graph_id, self.workload.initial)
        time.sleep(SETTLE_SECONDS)
        job = client.create_job(
            graph_id,
            self.datasets[kind],
            loss="loss",
            optimizer=cr.Sgd(LEARNING_RATE),
            feeds={"x": "x", "y": "y"},
            batch_size=len(self.workload.batches[0]["x"]),
            max_steps=self.steps,
            shuffle=False,
            replicas=max(replicas, 1),
        )
        seen: list[tuple[float, int]] = []
        while True:
            before = time.perf_counter()
            info = job.info()
            if info.ended:
                break
            if info.step > 0:
                seen.append(((before + time.perf_counter()) / 2, info.step))
            time.sleep(POLL_SECONDS)
        assert info.state == "succeeded", f"the job ended {info.state}: {info.error}"
        assert info.start_time is not None and info.end_time is not None
        assert len(seen) >= 3, f"{len(seen)} polls saw the job running: too few for its rate (more steps)"
        self.final_loss[replicas] = info.loss
        times, steps = np.array(seen).T
        per_step = 1 / float(np.polyfit(times, steps, 1)[0])
        self.starts[replicas].append((info.end_time - info.start_time).total_seconds() - self.steps * per_step)
        return per_step

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def serve(database: Path, *extra: str) -> ChildServer:
    command = ["serve", "--host", "127.0.0.1", "--port", "0", "--db", str(database), *extra]
    return ChildServer([sys.executable, "-m", "chainrule.server.cli", *command]).start(timeout=120)


def measure_ray_jobs(
    workload: Workload,
    steps: int,
    repeats: int,
    payloads: Mapping[str, Parameters] | None = None,
    alongside: Mapping[str, Callable[[], float]] | None = None,
) -> RayMeasurements:
    """Rows 13 (one replica on Ray vs in-process) and 14 (two replicas vs one), the exchanges of each
    of `payloads` (default: the MLP's parameters), and the caller's `alongside` contenders, all
    timed in the same interleaved rounds after one warm-up round."""
    payloads = payloads or {"MLP": workload.initial}
    with tempfile.TemporaryDirectory(prefix="cr-bench-ray-") as directory:
        saved = dict(os.environ)
        os.environ.update({variable: "1" for variable in THREAD_VARIABLES})
        head = LocalRayHead(Path(directory), num_cpus=2)
        servers: dict[str, ChildServer] = {}
        exchanges: Exchanges | None = None
        drivers: dict[int, JobDriver] = {}
        try:
            head.start()
            os.environ.update({**LOOPBACK_ENVIRONMENT, **head.environment})
            exchanges = Exchanges(head)
            for replicas in (1, 2):
                drivers[replicas] = JobDriver(head, workload, replicas)
            servers["local"] = serve(Path(directory) / "local.db")
            servers["ray"] = serve(Path(directory) / "ray.db", "--ray-address", head.address)
            jobs = RayJobs(servers, workload, steps)
            runs: dict[str, Callable[[], float]] = {
                f"job {replicas}": (lambda replicas=replicas: jobs.run(replicas)) for replicas in (0, 1, 2)
            }
            runs["empty"] = exchanges.empty
            runs.update({f"driver {replicas}": driver.step for replicas, driver in drivers.items()})
            runs.update(exchanges.contenders(payloads))
            runs.update(alongside or {})
            interleaved(runs, 1)  # warm-up: the replicas' workers, plans, caches
            for starts in jobs.starts.values():
                starts.clear()
            rounds = interleaved(runs, repeats)
            samples = {name: statistics.median(values) for name, values in rounds.items()}
            jobs.close()
        finally:
            for driver in drivers.values():
                driver.close()
            if exchanges is not None:
                cpu = exchanges.cpu
                exchanges.close()
            for server in servers.values():
                server.stop()
            os.environ.clear()
            os.environ.update(saved)
            head.stop()
    step = {replicas: samples[f"job {replicas}"] for replicas in (0, 1, 2)}
    start = {replicas: statistics.median(values) for replicas, values in jobs.starts.items()}
    found = {
        name: Exchange(
            payload_bytes=sum(value.nbytes for value in parameters.values()),
            empty=samples["empty"],
            hop=samples[f"hop {name}"],
            ray={replicas: samples[f"ray {name} {replicas}"] for replicas in EXCHANGE_REPLICAS},
            ray_cpu={
                replicas: statistics.median(cpu[(name, replicas)][1:])  # [0]: the warm-up round
                for replicas in EXCHANGE_REPLICAS
            },
        )
        for name, parameters in payloads.items()
    }
    details = {
        "steps": steps,
        "repeats": repeats,
        "step_ms": {str(replicas): seconds * 1e3 for replicas, seconds in step.items()},
        "start_seconds": {str(replicas): seconds for replicas, seconds in start.items()},
        "final_loss": {str(replicas): loss for replicas, loss in jobs.final_loss.items()},
        "exchanges": {name: exchange.to_json() for name, exchange in found.items()},
        "per_step_overhead_ms": 1e3 * (step[1] - step[0]),
        "driver_step_ms": {str(replicas): 1e3 * samples[f"driver {replicas}"] for replicas in (1, 2)},
        "rounds_ms": {name: [1e3 * value for value in values] for name, values in rounds.items()},
    }
    one = Measurement(
        key="ray_one_replica",
        title=f"13 job steps/s, 1 replica on Ray vs in the server, MLP, {steps} steps",
        unit="steps/s",
        chainrule=1 / step[1],
        baselines={"in-process": 1 / step[0]},
        ratio_baseline="in-process",
        target=Target(">=", 0.5),
        details=details,
    )
    two = Measurement(
        key="ray_two_replicas",
        title=f"14 job steps/s, 2 replicas vs 1 on Ray (2 cores), MLP, {steps} steps",
        unit="steps/s",
        chainrule=1 / step[2],
        baselines={"1 replica": 1 / step[1]},
        ratio_baseline="1 replica",
        target=Target(">=", 0.5),
        details=details,
    )
    alongside_medians = {name: samples[name] for name in alongside or {}}
    driver = {replicas: samples[f"driver {replicas}"] for replicas in (1, 2)}
    return RayMeasurements(one, two, step, start, found, driver, alongside_medians)
