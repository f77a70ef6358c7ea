"""Assembles a running server: store, engine, gRPC service, health service, signal handling."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chainrule.server.engine import DEFAULT_CHECKPOINT_EVERY, Engine
from chainrule.server.graph import Limits
from chainrule.server.service import GraphService
from chainrule.server.store import Store
from chainrule.v1 import graph_service_pb2, graph_service_pb2_grpc

log = logging.getLogger("chainrule.server")
SERVICE_NAME = graph_service_pb2.DESCRIPTOR.services_by_name["GraphService"].full_name


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    db: str = "chainrule.db"
    workers: int = 32
    max_request_bytes: int = 512 * 1024 * 1024
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    grace_seconds: float = 10.0
    limits: Limits = field(default_factory=Limits)


class RunningServer:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.store = Store(options.db)
        self.engine = Engine(self.store, options.limits, options.checkpoint_every)
        self.health = health.HealthServicer()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="rpc"),
            options=[
                ("grpc.max_receive_message_length", options.max_request_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ],
        )
        graph_service_pb2_grpc.add_GraphServiceServicer_to_server(GraphService(self.engine), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"{options.host}:{options.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {options.host}:{options.port}")
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        host = self.options.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> None:
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def stop(self) -> None:
        """Refuse new work, let running calls finish within the grace period, then close the store."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.options.grace_seconds).wait()
        self.store.close()

    def serve_until_signalled(self) -> None:
        def on_signal(signum: int, _frame: object) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            threading.Thread(target=self.stop, name="shutdown").start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        self._stopped.wait()
        self.server.wait_for_termination()
