"""Measurements 13 and 14: training jobs on Ray, and what a replica's round trip costs.

A private Ray head is started for them (2 CPUs, 127.0.0.1 only, as `--ray-address local` starts
one) and a `chainrule serve --ray-address` joins it. Row 13 is the bench MLP's job (the job of row
11: 784-256-10, float32, batch 128, SGD, the same eight batches in order) at one replica on Ray
against the same job in the server's own process; row 14 is two replicas against one. Both rates
come from the server's clock. On a 2-core machine two replicas cannot be faster than one: the
server, the job's Ray driver and both replicas share the two cores, and every step moves the
gradients and parameters twice as often; bench/scaling.py predicts where more machines pay off.

The round trip is measured apart, from this process as a Ray driver, on an actor of the same
cluster: a call with no payload (Ray's own latency per step), and a call that takes the MLP's
parameters from the object store and returns its gradients (what a replica's step moves, without
computing). Ray is not in `--quick`: starting a head and the first job's workers takes seconds.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import chainrule.client as cr
from bench.jobs import workload_columns
from bench.measure import Measurement, Target, interleaved
from bench.mlp import LEARNING_RATE, SETTLE_SECONDS, Workload, mlp_graph
from bench.server import ChildServer
from chainrule.server.jobs.ray_cluster import LOOPBACK_ENVIRONMENT, LocalRayHead

ROUND_TRIPS = 200
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class RoundTrip:
    """What one step's exchange with one replica costs on this cluster."""

    empty_ms: float
    """A call with nothing to move: Ray's latency."""
    payload_ms: float
    """A call taking the parameters from the object store and returning gradients of the same size."""
    payload_bytes: int

    @property
    def bytes_per_second(self) -> float:
        """What the payload adds, as a rate: both directions' bytes over the time beyond the empty call."""
        return 2 * self.payload_bytes / max((self.payload_ms - self.empty_ms) / 1e3, 1e-9)


class Echo:
    """An actor that answers at once, or with arrays the size of what it was sent."""

    def empty(self) -> None:
        return None

    def gradients(self, parameters: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: np.empty_like(value) for name, value in parameters.items()}


def measure_round_trip(head: LocalRayHead, parameters: dict[str, np.ndarray]) -> RoundTrip:
    import ray

    ray.init(address=head.address, logging_level="ERROR", log_to_driver=False)
    try:
        actor = ray.remote(Echo).options(num_cpus=0).remote()
        ray.get(actor.empty.remote())

        def timed(call: Any) -> float:
            for _ in range(10):  # warm-up
                call()
            samples = []
            for _ in range(ROUND_TRIPS):
                start = time.perf_counter()
                call()
                samples.append(time.perf_counter() - start)
            return statistics.median(samples) * 1e3

        empty = timed(lambda: ray.get(actor.empty.remote()))
        payload = timed(lambda: ray.get(actor.gradients.remote(ray.put(parameters))))
    finally:
        ray.shutdown()
    return RoundTrip(empty, payload, sum(value.nbytes for value in parameters.values()))


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

    def run(self, replicas: int) -> float:
        """Seconds per step by the server's clock."""
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
        info = job.info()
        while not info.ended:
            time.sleep(POLL_SECONDS)
            info = job.info()
        assert info.state == "succeeded", f"the job ended {info.state}: {info.error}"
        assert info.start_time is not None and info.end_time is not None
        self.final_loss[replicas] = info.loss
        return (info.end_time - info.start_time).total_seconds() / self.steps

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def serve(database: Path, *extra: str) -> ChildServer:
    command = ["serve", "--host", "127.0.0.1", "--port", "0", "--db", str(database), *extra]
    return ChildServer([sys.executable, "-m", "chainrule.server.cli", *command]).start(timeout=120)


def measure_ray_jobs(workload: Workload, steps: int, repeats: int) -> tuple[Measurement, Measurement, RoundTrip]:
    """Rows 13 (one replica on Ray vs in-process) and 14 (two replicas vs one), and the round trip."""
    with tempfile.TemporaryDirectory(prefix="cr-bench-ray-") as directory:
        head = LocalRayHead(Path(directory), num_cpus=2)
        head.start()
        saved = dict(os.environ)
        os.environ.update({**LOOPBACK_ENVIRONMENT, **head.environment})
        servers: dict[str, ChildServer] = {}
        try:
            round_trip = measure_round_trip(head, workload.initial)
            servers["local"] = serve(Path(directory) / "local.db")
            servers["ray"] = serve(Path(directory) / "ray.db", "--ray-address", head.address)
            jobs = RayJobs(servers, workload, steps)
            runs = {f"{replicas}": (lambda replicas=replicas: jobs.run(replicas)) for replicas in (0, 1, 2)}
            interleaved(runs, 1)  # warm-up: the replicas' workers, plans, caches
            samples = interleaved(runs, repeats)
            jobs.close()
        finally:
            for server in servers.values():
                server.stop()
            os.environ.clear()
            os.environ.update(saved)
            head.stop()
    rate = {replicas: 1 / statistics.median(samples[f"{replicas}"]) for replicas in (0, 1, 2)}
    details = {
        "steps": steps,
        "repeats": repeats,
        "final_loss": {str(replicas): loss for replicas, loss in jobs.final_loss.items()},
        "round_trip_ms": {"empty": round_trip.empty_ms, "mlp_payload": round_trip.payload_ms},
        "payload_bytes": round_trip.payload_bytes,
        "per_step_overhead_ms": 1e3 * (1 / rate[1] - 1 / rate[0]),
    }
    one = Measurement(
        key="ray_one_replica",
        title=f"13 job steps/s, 1 replica on Ray vs in the server, MLP, {steps} steps",
        unit="steps/s",
        chainrule=rate[1],
        baselines={"in-process": rate[0]},
        ratio_baseline="in-process",
        target=Target(">=", 0.5),
        details=details,
    )
    two = Measurement(
        key="ray_two_replicas",
        title=f"14 job steps/s, 2 replicas vs 1 on Ray (2 cores), MLP, {steps} steps",
        unit="steps/s",
        chainrule=rate[2],
        baselines={"1 replica": rate[1]},
        ratio_baseline="1 replica",
        target=Target(">=", 0.5),
        details=details,
    )
    return one, two, round_trip
