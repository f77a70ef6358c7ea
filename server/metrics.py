"""Prometheus metrics of one server, on a registry of its own (served by --metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        self.rpcs = Counter("chainrule_rpcs", "RPCs by method and status", ["method", "code"], registry=registry)
        self.latency = Histogram(
            "chainrule_rpc_seconds", "RPC duration, by method", ["method"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self.bytes_in = Counter("chainrule_received_bytes", "Request bytes, by method", ["method"], registry=registry)
        self.bytes_out = Counter("chainrule_sent_bytes", "Response bytes, by method", ["method"], registry=registry)
        self.graphs = Gauge("chainrule_graphs", "Graphs stored", registry=registry)
        self.compute_waiting = Gauge(
            "chainrule_calls_waiting_for_compute",
            "Calls admitted but waiting for a compute slot (--max-concurrent-compute)",
            registry=registry,
        )
        self.training_steps = Counter(
            "chainrule_training_steps", "Optimizer steps applied; rate() gives steps per second", registry=registry
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on `port` (0: a free one); returns the port bound."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
