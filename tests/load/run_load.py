"""Load: concurrent clients mixing Forward, Backward and Train on shared and separate graphs.

    python -m tests.load.run_load --seconds 60 --clients 16
    python -m tests.load.run_load --mode heavy-forward --seconds 30 --clients 70

starts a `chainrule serve` process of its own on 127.0.0.1 (an ephemeral port, a temporary
database), runs the clients until the time is up or the request budget is spent, and prints what
was served: requests and errors per method, p50/p99/max latencies, and the latencies of the
grpc.health.v1 Check a separate thread sends every 50 ms throughout (target: p99 under 100 ms),
each with the compose health check's deadline of 5 s (--health-deadline; the report counts the
checks slower than 5 s whatever the deadline). In `--mode heavy-forward` every client
sends only Forward calls on one shared graph that keeps the server's cores and the GIL busy (a
chain of matmul and tanh nodes), which is what once delayed health checks by seconds. With more
clients than the server's --max-concurrent-rpcs (60), the calls beyond it are refused with
TOO_MANY_CALLS: those are counted apart, not as errors, and their client retries 0.1 s later.
It exits 1 when any request failed or any health check was not answered SERVING, 0 otherwise;
latencies are reported, not judged, unless --strict-latency is given.

The clients are threads spread over --processes worker processes, so the load generator's own GIL
does not queue the requests it times; the health thread runs in the main process, which sends
nothing else.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chainrule import tensors
from chainrule.v1 import graph_pb2, graph_service_pb2_grpc
from chainrule.v1 import graph_service_pb2 as pb
from tests.server_process import ServerProcess
from tests.test_service import mlp_graph, node

METHODS = ("Forward", "Backward", "Train")
MIX = {"Forward": 0.45, "Backward": 0.35, "Train": 0.20}
MODES = ("mixed", "heavy-forward")
TRAIN_BATCHES = 4
HEAVY_DEPTH = 5000
HEAVY_WIDTH = 8
HEALTH_PERIOD = 0.05
COMPOSE_HEALTH_DEADLINE = 5.0
"""The compose file's health check gives `chainrule health` 5 s."""
HEALTH_TARGET_P99_MS = 100.0
RPC_TIMEOUT = 120.0
REFUSED_BACKOFF = 0.1
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


@dataclass
class ClientResult:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    errors: list[str] = field(default_factory=list)
    refused: int = 0
    """Calls the server refused with TOO_MANY_CALLS (more clients than --max-concurrent-rpcs): not errors."""


def refused_for_capacity(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent-rpcs" in (error.details() or "")


def feeds(rng: np.random.Generator) -> dict:
    return {"x": tensors.encode(rng.normal(size=(8, 3)))}


def heavy_graph() -> graph_pb2.Graph:
    """HEAVY_DEPTH layers of tanh(h @ w) on a small HEAVY_WIDTH-square input: mostly per-node Python work,
    which holds the GIL (about 0.1 s a Forward on one core)."""
    rng = np.random.default_rng(1)
    weight = rng.normal(scale=HEAVY_WIDTH**-0.5, size=(HEAVY_WIDTH, HEAVY_WIDTH))
    nodes = [
        node("x", "input", dtype="float64", shape=[HEAVY_WIDTH, HEAVY_WIDTH]),
        node("w", "parameter", value=weight),
    ]
    previous = "x"
    for layer in range(HEAVY_DEPTH):
        nodes += [node(f"z{layer}", "matmul", previous, "w"), node(f"h{layer}", "tanh", f"z{layer}")]
        previous = f"h{layer}"
    nodes.append(node("out", "sum", previous))
    return graph_pb2.Graph(name="heavy", nodes=nodes)


def heavy_forward(stub, graph_id: str, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    request = pb.ForwardRequest(graph_id=graph_id, fetches=["out"])
    request.feeds["x"].CopyFrom(tensors.encode(rng.normal(size=(HEAVY_WIDTH, HEAVY_WIDTH))))
    response = stub.Forward(request, timeout=RPC_TIMEOUT)
    if [tuple(output.tensor.shape) for output in response.outputs] != [()]:
        raise AssertionError("heavy Forward returned the wrong shape")


def one_request(stub, method: str, graph_id: str, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    """Send one request of `method` and check what came back; raises on an error or a wrong answer."""
    if method == "Forward":
        response = stub.Forward(
            pb.ForwardRequest(graph_id=graph_id, feeds=feeds(rng), fetches=["out", "loss"]), timeout=RPC_TIMEOUT
        )
        shapes = [tuple(output.tensor.shape) for output in response.outputs]
        if shapes != [(8, 1), ()]:
            raise AssertionError(f"Forward returned shapes {shapes}")
    elif method == "Backward":
        request = pb.BackwardRequest(graph_id=graph_id, feeds=feeds(rng), loss="loss")
        names = sorted(response.name for response in stub.Backward(request, timeout=RPC_TIMEOUT))
        if names != ["b1", "w1", "w2"]:
            raise AssertionError(f"Backward streamed {names}")
    else:
        config = pb.TrainConfig(
            graph_id=graph_id, loss="loss", optimizer=pb.Optimizer(sgd=pb.Sgd(learning_rate=0.01)), stream_updates=True
        )
        requests = [pb.TrainRequest(config=config)]
        requests += [pb.TrainRequest(batch=pb.Batch(feeds=feeds(rng))) for _ in range(TRAIN_BATCHES)]
        steps = [response.step for response in stub.Train(iter(requests), timeout=RPC_TIMEOUT)]
        if len(steps) != TRAIN_BATCHES or steps != sorted(set(steps)):
            raise AssertionError(f"Train answered steps {steps}")


def run_heavy_client(address: str, client: int, graph_id: str, deadline: float, budget: int, seed: int) -> ClientResult:
    """One client sending heavy Forward calls, one at a time, on the shared heavy graph."""
    result = ClientResult()
    rng = np.random.default_rng([seed, client])
    with grpc.insecure_channel(address) as channel:
        stub = graph_service_pb2_grpc.GraphServiceStub(channel)
        for _ in range(budget):
            if time.monotonic() >= deadline:
                break
            started = time.perf_counter()
            try:
                heavy_forward(stub, graph_id, rng)
            except grpc.RpcError as error:
                if refused_for_capacity(error):
                    result.refused += 1
                    time.sleep(REFUSED_BACKOFF)
                else:
                    result.errors.append(f"client {client} Forward: {error.code().name}: {error.details()}")
                continue
            except AssertionError as error:
                result.errors.append(f"client {client} Forward: {error}")
                continue
            result.latencies["Forward"].append(time.perf_counter() - started)
    return result


def run_client(address: str, client: int, shared: list[str], deadline: float, budget: int, seed: int) -> ClientResult:
    """One client: its own channel and graph; every request on its own graph or a shared one, at random."""
    result = ClientResult()
    rng = np.random.default_rng([seed, client])
    choose = random.Random(f"{seed}-{client}")
    with grpc.insecure_channel(address) as channel:
        stub = graph_service_pb2_grpc.GraphServiceStub(channel)
        try:
            own = stub.CreateGraph(pb.CreateGraphRequest(graph=mlp_graph()), timeout=RPC_TIMEOUT).graph.graph_id
        except grpc.RpcError as error:
            result.errors.append(f"client {client} CreateGraph: {error.code().name}: {error.details()}")
            return result
        for _ in range(budget):
            if time.monotonic() >= deadline:
                break
            method = choose.choices(METHODS, weights=[MIX[m] for m in METHODS])[0]
            graph_id = choose.choice(shared) if choose.random() < 0.5 else own
            started = time.perf_counter()
            try:
                one_request(stub, method, graph_id, rng)
            except grpc.RpcError as error:
                result.errors.append(f"client {client} {method}: {error.code().name}: {error.details()}")
                continue
            except AssertionError as error:
                result.errors.append(f"client {client} {method}: {error}")
                continue
            result.latencies[method].append(time.perf_counter() - started)
    return result


def run_worker(
    address: str, clients: list[int], shared: list[str], seconds: float, budget: int, seed: int, mode: str
) -> dict:
    """A worker process: its clients as threads; returns their merged results (picklable)."""
    deadline = time.monotonic() + seconds
    results: list[ClientResult] = []

    def client_run(client: int) -> ClientResult:
        if mode == "heavy-forward":
            return run_heavy_client(address, client, shared[0], deadline, budget, seed)
        return run_client(address, client, shared, deadline, budget, seed)

    threads = [
        threading.Thread(target=lambda c=client: results.append(client_run(c)), name=f"client-{client}")
        for client in clients
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged = ClientResult()
    for result in results:
        for method in METHODS:
            merged.latencies[method] += result.latencies[method]
        merged.errors += result.errors
        merged.refused += result.refused
    return {"latencies": merged.latencies, "errors": merged.errors, "refused": merged.refused}


class HealthProbe(threading.Thread):
    """Calls grpc.health.v1 Check every HEALTH_PERIOD seconds until stopped; records latencies and answers."""

    def __init__(self, address: str, deadline: float = COMPOSE_HEALTH_DEADLINE) -> None:
        super().__init__(name="health", daemon=True)
        self.address = address
        self.deadline = deadline
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            next_at = time.monotonic()
            while not self.halt.is_set():
                started = time.perf_counter()
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=self.deadline)
                    if answer.status != health_pb2.HealthCheckResponse.SERVING:
                        self.failures.append(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
                except grpc.RpcError as error:
                    self.failures.append(f"{error.code().name}: {error.details()}")
                self.latencies.append(time.perf_counter() - started)
                next_at += HEALTH_PERIOD
                self.halt.wait(max(0.0, next_at - time.monotonic()))


def summary(latencies: list[float]) -> dict:
    if not latencies:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(latencies) * 1e3
    return {
        "count": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


def run_load(
    address: str,
    *,
    seconds: float,
    clients: int,
    processes: int,
    max_requests: int,
    seed: int,
    mode: str = "mixed",
    health_deadline: float = COMPOSE_HEALTH_DEADLINE,
) -> dict:
    setup = graph_service_pb2_grpc.GraphServiceStub(grpc.insecure_channel(address))
    graphs = [heavy_graph()] if mode == "heavy-forward" else [mlp_graph(), mlp_graph()]
    shared = [
        setup.CreateGraph(pb.CreateGraphRequest(graph=graph), timeout=RPC_TIMEOUT).graph.graph_id for graph in graphs
    ]
    processes = max(1, min(processes, clients))
    groups = [list(range(clients))[index::processes] for index in range(processes)]
    budget = math.ceil(max_requests / clients)
    probe = HealthProbe(address, health_deadline)
    probe.start()
    started = time.monotonic()
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes) as pool:
        outcomes = pool.starmap(run_worker, [(address, group, shared, seconds, budget, seed, mode) for group in groups])
    elapsed = time.monotonic() - started
    probe.halt.set()
    probe.join()
    latencies: dict[str, list[float]] = {m: [] for m in METHODS}
    errors: list[str] = []
    for outcome in outcomes:
        for method in METHODS:
            latencies[method] += outcome["latencies"][method]
        errors += outcome["errors"]
    served = sum(len(values) for values in latencies.values())
    health = summary(probe.latencies)
    return {
        "mode": mode,
        "seconds": round(elapsed, 2),
        "clients": clients,
        "processes": processes,
        "requests_served": served,
        "requests_per_second": round(served / elapsed, 1) if elapsed else None,
        "errors": len(errors),
        "refused_too_many_calls": sum(outcome["refused"] for outcome in outcomes),
        "error_samples": errors[:20],
        "methods": {method: summary(latencies[method]) for method in METHODS},
        "health": {
            **health,
            "deadline_seconds": health_deadline,
            "over_compose_deadline": sum(latency > COMPOSE_HEALTH_DEADLINE for latency in probe.latencies),
            "not_serving": len(probe.failures),
            "failure_samples": probe.failures[:20],
        },
    }


def print_report(report: dict) -> None:
    print(
        f"{report['requests_served']} requests served in {report['seconds']} s by {report['clients']} clients "
        f"({report['requests_per_second']}/s); errors: {report['errors']}; "
        f"refused for capacity (TOO_MANY_CALLS): {report['refused_too_many_calls']}"
    )
    print(f"{'method':<10}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for method, stats in [*report["methods"].items(), ("health", report["health"])]:
        print(f"{method:<10}{stats['count']:>8}{stats['p50_ms']!s:>10}{stats['p99_ms']!s:>10}{stats['max_ms']!s:>10}")
    health = report["health"]
    verdict = "met" if health["p99_ms"] is not None and health["p99_ms"] < HEALTH_TARGET_P99_MS else "MISSED"
    print(f"health checks not answered SERVING within {health['deadline_seconds']:g} s: {health['not_serving']}")
    slow = health["over_compose_deadline"]
    print(f"health checks slower than the compose check's {COMPOSE_HEALTH_DEADLINE:g} s: {slow}")
    print(f"health p99 target < {HEALTH_TARGET_P99_MS:g} ms: {verdict}")
    for sample in report["error_samples"] + health["failure_samples"]:
        print(f"  error: {sample}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.run_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="mixed", help="the request mix (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the clients run (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes the clients are spread over")
    parser.add_argument(
        "--max-requests", type=int, default=1_000_000, help="requests in all at most (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix and the data (default: 0)")
    parser.add_argument("--address", help="a server already running on loopback (default: start one)")
    parser.add_argument("--json", type=Path, help="also write the report here, as JSON")
    parser.add_argument(
        "--health-deadline",
        type=float,
        default=COMPOSE_HEALTH_DEADLINE,
        help="seconds each health check may take before it counts as not answered (default: %(default)s, the "
        "compose check's)",
    )
    parser.add_argument("--strict-latency", action="store_true", help="exit 1 when health p99 misses its target too")
    args = parser.parse_args(argv)
    if args.address and not args.address.startswith(LOOPBACK):
        parser.error("--address must be on loopback (127.0.0.1, localhost or [::1])")

    with tempfile.TemporaryDirectory(prefix="chainrule-load-") as scratch:
        server = None if args.address else ServerProcess(Path(scratch) / "chainrule.db").start()
        address = args.address or server.address  # type: ignore[union-attr]
        try:
            report = run_load(
                address,
                seconds=args.seconds,
                clients=args.clients,
                processes=args.processes,
                max_requests=args.max_requests,
                seed=args.seed,
                mode=args.mode,
                health_deadline=args.health_deadline,
            )
        finally:
            if server is not None:
                server.kill()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    failed = report["errors"] > 0 or report["health"]["not_serving"] > 0 or report["health"]["count"] == 0
    missed = report["health"]["p99_ms"] is None or report["health"]["p99_ms"] >= HEALTH_TARGET_P99_MS
    return 1 if failed or (args.strict_latency and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
