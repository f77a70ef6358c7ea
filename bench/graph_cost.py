"""Measurement 6: what one node of a large graph costs the server to create, to compile and to keep.

The graph is measurement 1's scalar chain at 100,000 and 1,000,000 nodes. Each size gets a
fresh server: the bench times `CreateGraph` and the first `Backward` right after it (which
plans that kind of pass), reads the server's RSS before and after each, then restarts the
server on the same database and times the first `Backward` again, which now also compiles
the graph from the store, as after any restart or eviction.

The baseline is NetworkX building a bare `DiGraph` of the same nodes and edges (names only,
no attributes) in this process, timed in the same run, and the bytes that graph occupies
(tracemalloc). chainrule validates every node, infers every node's shape, compiles the plan
and stores the graph in one transaction, so it cannot beat that baseline; the ratio says how
many bare NetworkX graphs one stored chainrule graph costs, in time and in memory.
"""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import networkx as nx
import numpy as np

from bench.chain import CYCLE, SCALE, SHIFT, X0, chain_graph
from bench.measure import Measurement, Target
from bench.rss import status_bytes
from bench.server import ChainruleServer
from chainrule import tensors
from chainrule.v1 import graph_pb2, graph_service_pb2_grpc
from chainrule.v1 import graph_service_pb2 as pb

UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
CALL_TIMEOUT = 600.0


def chain_message(length: int) -> graph_pb2.Graph:
    """`chain_graph(length).to_proto()` built straight into protobuf: the builder's bookkeeping
    would take longer than what is measured at a million nodes."""
    message = graph_pb2.Graph(name=f"chain-{length}")
    nodes = message.nodes
    nodes.add(name="x", op="input", attrs={"dtype": graph_pb2.AttrValue(s="float64")}).attrs["shape"].ints.SetInParent()
    scale = tensors.encode(np.float64(SCALE), "scale")
    shift = tensors.encode(np.float64(SHIFT), "shift")
    nodes.add(name="scale", op="constant", value=scale)
    nodes.add(name="shift", op="constant", value=shift)
    previous = "x"
    counts = dict.fromkeys(CYCLE, 0)
    for index in range(length):
        op = CYCLE[index % 4]
        counts[op] += 1
        name = "loss" if index == length - 1 else f"{op}_{counts[op]}"
        inputs = [previous, "scale"] if op == "mul" else [previous, "shift"] if op == "add" else [previous]
        nodes.add(name=name, op=op, inputs=inputs)
        previous = name
    return message


def check_message() -> None:
    """The direct construction must be the very graph measurement 1 builds."""
    for length in (4, 9):
        assert chain_message(length) == chain_graph(length).to_proto(), f"chain_message({length}) differs"


def networkx_baseline(message: graph_pb2.Graph) -> tuple[float, float, float]:
    """Seconds, CPU seconds and bytes per node of a bare NetworkX DiGraph of the message's nodes and edges."""
    names = [node.name for node in message.nodes]
    edges = [(argument, node.name) for node in message.nodes for argument in node.inputs]

    def build() -> nx.DiGraph:
        graph = nx.DiGraph()
        graph.add_nodes_from(names)
        graph.add_edges_from(edges)
        return graph

    gc.collect()
    cpu, start = time.process_time(), time.perf_counter()
    graph = build()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu
    del graph
    gc.collect()
    tracemalloc.start()
    graph = build()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del graph
    return seconds / len(names), cpu_seconds / len(names), size / len(names)


def cpu_seconds(process: Path) -> float:
    """User and system CPU time of every thread of `process` so far (/proc/PID/stat, in clock ticks).
    On a machine other work shares, a call's CPU time says more than its wall time."""
    fields = (process / "stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stub(address: str) -> tuple[grpc.Channel, graph_service_pb2_grpc.GraphServiceStub]:
    channel = grpc.insecure_channel(address, options=UNLIMITED)
    return channel, graph_service_pb2_grpc.GraphServiceStub(channel)


def _backward(stub: graph_service_pb2_grpc.GraphServiceStub, graph_id: str) -> float:
    request = pb.BackwardRequest(
        graph_id=graph_id, feeds={"x": tensors.encode(np.float64(X0), "x")}, loss="loss", wrt=["x"]
    )
    start = time.perf_counter()
    for _ in stub.Backward(request, timeout=CALL_TIMEOUT):
        pass
    return time.perf_counter() - start


def measure_size(nodes: int) -> dict[str, Any]:
    """One size in fresh servers: create, first call, restart, first call again; times and RSS per node.
    The chain is 3 nodes shorter than `nodes`, for its input and two constants."""
    message = chain_message(nodes - 3)
    baseline_seconds, baseline_cpu_seconds, baseline_bytes = networkx_baseline(message)
    request = pb.CreateGraphRequest(graph=message, view=graph_pb2.GRAPH_VIEW_BASIC)
    with ChainruleServer().start() as server:
        process = Path(f"/proc/{server.pid}")
        channel, stub = _stub(server.address)
        with channel:
            before = status_bytes(process, "VmRSS")
            cpu, start = cpu_seconds(process), time.perf_counter()
            graph_id = stub.CreateGraph(request, timeout=CALL_TIMEOUT).graph.graph_id
            create_seconds = time.perf_counter() - start
            create_cpu_seconds = cpu_seconds(process) - cpu
            created = status_bytes(process, "VmRSS")
            first_call_seconds = _backward(stub, graph_id)
            called = status_bytes(process, "VmRSS")
        server.restart()
        process = Path(f"/proc/{server.pid}")
        channel, stub = _stub(server.address)
        with channel:
            restarted = status_bytes(process, "VmRSS")
            recompile_seconds = _backward(stub, graph_id)
            recompiled = status_bytes(process, "VmRSS")
    return {
        "nodes": nodes,
        "message_bytes": message.ByteSize(),
        "create_us_per_node": create_seconds * 1e6 / nodes,
        "create_server_cpu_us_per_node": create_cpu_seconds * 1e6 / nodes,
        "first_call_us_per_node": first_call_seconds * 1e6 / nodes,
        "first_call_after_restart_us_per_node": recompile_seconds * 1e6 / nodes,
        "rss_after_create_kb_per_node": (created - before) / 1e3 / nodes,
        "rss_after_first_call_kb_per_node": (called - before) / 1e3 / nodes,
        "rss_after_restart_and_first_call_kb_per_node": (recompiled - restarted) / 1e3 / nodes,
        "networkx_us_per_node": baseline_seconds * 1e6,
        "networkx_cpu_us_per_node": baseline_cpu_seconds * 1e6,
        "networkx_kb_per_node": baseline_bytes / 1e3,
    }


def measure_graph_cost(sizes: Sequence[int]) -> tuple[Measurement, Measurement]:
    """Two rows for the largest size (in nodes), time and memory; every size is in the details."""
    check_message()
    sweep = [measure_size(nodes) for nodes in sizes]
    largest = sweep[-1]
    details = {"sweep": sweep}
    title = f"chain N={largest['nodes']:,}"
    create = Measurement(
        key="graph_create",
        title=f"6 CreateGraph per node, {title}",
        unit="us/node",
        chainrule=largest["create_us_per_node"],
        baselines={"networkx": largest["networkx_us_per_node"]},
        ratio_baseline="networkx",
        target=Target("<=", 3.0),
        details=details,
    )
    memory = Measurement(
        key="graph_memory",
        title=f"7 server RSS per stored node, {title}",
        unit="KB/node",
        chainrule=largest["rss_after_create_kb_per_node"],
        baselines={"networkx": largest["networkx_kb_per_node"]},
        ratio_baseline="networkx",
        target=Target("<=", 1.0),
        details=details,
    )
    return create, memory
