"""Measurement 4: a large gradient received through Backward by a default-configured client.

The gradient is far over gRPC's default 4 MiB receive limit, so the server sends it in 1 MiB
chunks that the client reassembles. The loss, sum(p * c), costs two cheap passes over p, so
the time is mostly encoding, chunking, transport and reassembly. The baseline is the same
number of bytes in the same 1 MiB messages from a bare gRPC server (bench.raw_stream).
"""

from __future__ import annotations

import sys
import time

import grpc
import numpy as np

import chainrule.client as cr
from bench import raw_stream
from bench.measure import Measurement, Target, interleaved, median
from bench.server import ChildServer

SCALE = 0.5


def large_graph(elements: int) -> cr.GraphBuilder:
    g = cr.GraphBuilder(f"large-{elements}")
    p = g.parameter("p", np.linspace(-1.0, 1.0, elements))
    cr.sum(p * SCALE).named("loss")
    return g


def measure_large_gradient(address: str, elements: int, repeats: int) -> Measurement:
    size = elements * np.dtype(np.float64).itemsize
    with (
        cr.Client(address) as client,
        ChildServer([sys.executable, "-m", "bench.raw_stream"]).start() as raw,
        grpc.insecure_channel(raw.address) as channel,
    ):
        graph = client.create_graph(large_graph(elements))

        def chainrule_backward() -> float:
            start = time.perf_counter()
            _, gradients = client.gradients(graph.graph_id, {}, "loss", ["p"])
            elapsed = time.perf_counter() - start
            assert gradients["p"].nbytes == size and gradients["p"][0] == SCALE, "wrong gradient"
            return elapsed

        def bare_grpc() -> float:
            start = time.perf_counter()
            received = raw_stream.receive(channel, size)
            elapsed = time.perf_counter() - start
            assert len(received) == size
            return elapsed

        runs = {"chainrule": chainrule_backward, "raw_grpc": bare_grpc}
        interleaved(runs, 1)  # warm-up: connections, allocator growth
        samples = interleaved(runs, repeats)
        client.delete_graph(graph.graph_id)
    gigabytes = size / 1e9
    return Measurement(
        key="large_gradient",
        title=f"4 large gradient via Backward, {size / 2**20:g} MiB",
        unit="GB/s",
        chainrule=gigabytes / median(samples["chainrule"]),  # type: ignore[operator]
        baselines={"raw_grpc": gigabytes / median(samples["raw_grpc"])},  # type: ignore[operator]
        ratio_baseline="raw_grpc",
        target=Target(">=", 0.3, on="value"),
        details={"bytes": size, "repeats": repeats, "seconds": {name: median(s) for name, s in samples.items()}},
    )
