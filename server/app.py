"""Assembles a running server: store, engine, gRPC services, security, metrics, signal handling."""

from __future__ import annotations

import ctypes
import errno
import logging
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chainrule.server.auth import AuthInterceptor, TokenFile
from chainrule.server.datasets import DEFAULT_MAX_DATASET_MB, DatasetManager
from chainrule.server.engine import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_LIVE_GRAPHS,
    DEFAULT_MAX_LIVE_MEMORY_MB,
    Engine,
)
from chainrule.server.graph import Limits
from chainrule.server.jobs import DEFAULT_JOB_WORKERS, JobManager
from chainrule.server.jobs.executor import ExecutorFactory, InProcessExecutor
from chainrule.server.jobs.ray_cluster import RayCluster, RayUnavailable
from chainrule.server.jobs.ray_executor import DEFAULT_REPLICA_CPUS, RayExecutors
from chainrule.server.jobs.runner import DEFAULT_JOB_MAX_RESTARTS
from chainrule.server.metrics import Metrics
from chainrule.server.service.calls import (
    DEFAULT_MAX_WATCHERS,
    DEFAULT_STREAM_IDLE_SECONDS,
    CallGate,
    add_to_server,
    default_compute_slots,
)
from chainrule.server.service.datasets import DatasetService
from chainrule.server.service.graphs import GraphService
from chainrule.server.service.jobs import JobService
from chainrule.server.store import DatabaseUnusable, default_pool_size, location, open_store
from chainrule.v1 import dataset_service_pb2, graph_service_pb2, job_service_pb2

log = logging.getLogger("chainrule.server")
SERVICE_NAME = graph_service_pb2.DESCRIPTOR.services_by_name["GraphService"].full_name
DATASET_SERVICE = dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"]
JOB_SERVICE = job_service_pb2.DESCRIPTOR.services_by_name["JobService"]
SERVICE_NAMES = (SERVICE_NAME, DATASET_SERVICE.full_name, JOB_SERVICE.full_name)
"""The chainrule services, each with its own health status (besides the whole server's, "")."""
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")
MESSAGE_SLACK_BYTES = 1 << 20
"""How far above --max-message-mb gRPC still receives a request (ImportOnnx checks its model against the flag)."""
GIL_SWITCH_SECONDS = 0.001
"""How long a thread may hold the GIL while another waits (Python's default is 5 ms). A health check
takes the GIL about five times on its way through gRPC's threads, each time waiting up to this long
behind busy compute threads: under heavy Forward load 1 ms instead of 5 took its p99 from about 300 ms
to about 100 ms, for a few percent of the throughput of GIL-bound graphs."""
WATCH_SPARE_THREADS = 4
"""Threads of the watchers' pool beyond --max-watchers, which refuse the watchers over the limit."""
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""mallopt's parameter numbers (glibc's malloc.h)."""
MMAP_THRESHOLD_BYTES = 256 << 20
TRIM_THRESHOLD_BYTES = 512 << 20
"""glibc maps each block above its mmap threshold fresh from the kernel and unmaps it when it is freed, and
hands a heap's top back once more than its trim threshold of it is free; by default both adapt up to only
32 and 64 MiB. The multi-megabyte arrays of a step (activations, im2col matrices) then come back as fresh
pages that fault in again on every step: a quarter of a LeNet-5 training step's CPU, a fifth of a
ResNet-18 forward's at batch 8. With these, freed arrays stay mapped and are reused; the price is memory
a heap keeps after a large request instead of returning it, up to about these sizes (after CreateGraph
of a million nodes the server holds 0.56 KB per node instead of 0.49: request memory freed after the
compile's malloc_trim). Blocks above 64 MiB on a request thread's heap are mapped fresh whatever the
threshold (glibc caps those heaps at 64 MiB)."""


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    db: str = "chainrule.db"
    db_pool_size: int | None = None
    """PostgreSQL connections at most; None: store.default_pool_size of the calls, jobs and watchers at once."""
    workers: int = 64
    max_concurrent_rpcs: int = 60
    max_request_message_bytes: int = 512 * 1024 * 1024
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    grace_seconds: float = 10.0
    limits: Limits = field(default_factory=Limits)
    auth_tokens: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    reflection: bool = True
    metrics_port: int | None = None
    max_live_graphs: int = DEFAULT_MAX_LIVE_GRAPHS
    max_live_memory_bytes: int = DEFAULT_MAX_LIVE_MEMORY_MB << 20
    max_concurrent_rpcs_per_tenant: int | None = None
    """None: half of max_concurrent_rpcs (without auth_tokens every caller is one tenant, held to it too)."""
    max_concurrent_compute: int | None = None
    """None: one per core this process may run on."""
    stream_idle_seconds: float = DEFAULT_STREAM_IDLE_SECONDS
    max_watchers: int = DEFAULT_MAX_WATCHERS
    """WatchJob streams open at once; they run on threads of their own, beyond --workers."""
    max_watchers_per_tenant: int | None = None
    """None: half of max_watchers."""
    dataset_cache: str | None = None
    """Where datasets jobs read are kept memory-mapped; None: `<db>.cache` beside the database."""
    max_dataset_bytes: int = DEFAULT_MAX_DATASET_MB << 20
    job_workers: int = DEFAULT_JOB_WORKERS
    job_max_restarts: int = DEFAULT_JOB_MAX_RESTARTS
    ray_address: str | None = None
    """Run job steps on this Ray cluster (see server/jobs/ray_cluster.py); None: in this process."""
    ray_replica_cpus: float = DEFAULT_REPLICA_CPUS
    job_lease_seconds: float = DEFAULT_LEASE_SECONDS
    """How long a job's claim and a Train stream's lease outlive their server's last heartbeat."""


class StartupError(Exception):
    """What keeps the server from starting, in one line for the operator (no traceback)."""


def default_dataset_cache(db: str) -> str:
    """`<db>.cache` beside the database file; a directory of the database's own in the user's cache
    for a PostgreSQL database; a temporary directory for an in-memory database."""
    if location.is_postgres_url(db):
        return str(location.user_cache(db))
    return tempfile.mkdtemp(prefix="chainrule-datasets-") if db in ("", ":memory:") else f"{db}.cache"


def keep_freed_memory() -> None:
    """Raise glibc's mmap and trim thresholds (see MMAP_THRESHOLD_BYTES); other C libraries are left alone."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def exposure_warning(host: str, address: str, tokens: bool) -> str | None:
    """What a server logs at start when anyone beyond this machine may use it unchecked, else None."""
    if tokens or is_loopback(host):
        return None
    return f"serving {address} without --auth-tokens: anyone who can reach it can read, change and delete every graph"


def database_trouble(db: str, error: sqlite3.Error) -> StartupError:
    """What is wrong with `db`, in words, for an error SQLite raised while the server started."""
    text = str(error)
    if "not a database" in text:
        why = "the file is not a SQLite database"
    elif not Path(db).parent.is_dir():
        why = f"the directory {Path(db).parent} does not exist"
    elif "readonly" in text:
        why = "the database, or the file system it is on, is read-only"
    elif "unable to open" in text:
        why = "the file cannot be opened or created there (a read-only file system, or no permission?)"
    elif "disk I/O" in text:
        why = "the disk refused a write (full, failing or read-only)"
    else:
        why = text
    return StartupError(f"cannot use the database {db}: {why}")


def check_address(host: str, port: int) -> None:
    """Refuse a host that names no address of this machine, or a port another process listens on,
    before gRPC tries them (gRPC's own refusal comes with a log line of its own) and before the
    database is opened (whose upgrade would log a line first). The probe binds as gRPC will, port 0
    included, with SO_REUSEADDR as gRPC sets it, so a port in TIME_WAIT passes."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise StartupError(f"cannot listen on {host}:{port}: the host is not known ({error.strerror})") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                why = {
                    errno.EADDRINUSE: "the port is in use",
                    errno.EADDRNOTAVAIL: "the host is not an address of this machine",
                }.get(error.errno or 0, error.strerror)
                raise StartupError(f"cannot listen on {host}:{port}: {why}") from None


class RunningServer:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self._check_capacity()
        check_address(options.host, options.port)
        self.tokens = TokenFile(options.auth_tokens) if options.auth_tokens else None
        try:
            pool_size = options.db_pool_size or default_pool_size(options.max_concurrent_rpcs, options.job_workers)
            self.store = open_store(options.db, pool_size)
        except sqlite3.Error as error:
            raise database_trouble(options.db, error) from None
        except DatabaseUnusable as error:
            raise StartupError(str(error)) from None
        try:
            self._assemble()
        except BaseException as error:
            self.store.close()
            if isinstance(error, sqlite3.Error):
                raise database_trouble(options.db, error) from None
            raise
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.metrics_port: int | None = None

    def _assemble(self) -> None:
        options = self.options
        self.engine = Engine(
            self.store,
            options.limits,
            options.checkpoint_every,
            options.max_live_graphs,
            options.max_live_memory_bytes,
            options.job_lease_seconds,
        )
        self.metrics = Metrics()
        self.metrics.graphs.set(self.store.count_graphs())
        per_tenant = options.max_concurrent_rpcs_per_tenant or max(1, options.max_concurrent_rpcs // 2)
        self.calls = CallGate(
            self.tokens,
            self.metrics,
            options.max_concurrent_rpcs,
            per_tenant,
            options.limits.max_name_length,
            options.max_concurrent_compute or default_compute_slots(),
            options.stream_idle_seconds,
            options.max_watchers,
            options.max_watchers_per_tenant or max(1, options.max_watchers // 2),
        )
        self.service = GraphService(self.engine, self.calls, options.max_request_message_bytes)
        cache = options.dataset_cache or default_dataset_cache(options.db)
        try:
            self.datasets = DatasetManager(
                self.store,
                cache,
                max_dataset_bytes=options.max_dataset_bytes,
                max_chunk_bytes=options.max_request_message_bytes,
                max_name_length=options.limits.max_name_length,
            )
        except OSError as error:
            raise StartupError(f"cannot use the dataset cache {cache}: {error.strerror or error}") from None
        self.dataset_service = DatasetService(self.datasets, self.calls)
        self.ray: RayCluster | None = None
        executors: ExecutorFactory = InProcessExecutor
        if options.ray_address is not None:
            try:
                self.ray = RayCluster.at(options.ray_address)
            except RayUnavailable as error:
                raise StartupError(str(error)) from None
            executors = RayExecutors(self.ray, options.limits, options.ray_replica_cpus)
        self.jobs = JobManager(
            self.engine,
            self.datasets,
            options.job_workers,
            self.calls.computing,
            self.metrics.training_steps.inc,
            executors=executors,
        )
        self.jobs.runner.max_restarts = options.job_max_restarts
        self.job_service = JobService(self.jobs, self.calls)
        self.health = health.HealthServicer()
        self.store.on_lost = self._store_lost
        self.executor = futures.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="rpc")
        # A watcher spends its life waiting for steps: on a pool of their own, watchers never take
        # the threads calls and health checks need, however many there are.
        self.watch_executor = futures.ThreadPoolExecutor(
            max_workers=options.max_watchers + WATCH_SPARE_THREADS, thread_name_prefix="watch"
        )
        self.server = grpc.server(
            self.executor,
            interceptors=[AuthInterceptor(self.tokens)] if self.tokens else [],
            options=[
                # A little above the flag, so that ImportOnnx can refuse a model just over it by name.
                ("grpc.max_receive_message_length", options.max_request_message_bytes + MESSAGE_SLACK_BYTES),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            ],
            # GraphService refuses calls beyond --max-concurrent-rpcs itself, leaving the threads above
            # that for health checks and reflection. gRPC's own limit is not set: it would refuse health
            # checks too while refused calls pass through the threads.
            maximum_concurrent_rpcs=None,
        )
        add_to_server(self.service, graph_service_pb2.DESCRIPTOR.services_by_name["GraphService"], self.server)
        add_to_server(self.dataset_service, DATASET_SERVICE, self.server)
        add_to_server(self.job_service, JOB_SERVICE, self.server, {"WatchJob": self.watch_executor})
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if options.reflection:
            names = (*SERVICE_NAMES, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        self.port = self._bind()
        self.engine.worker = self.worker_address()

    def _check_capacity(self) -> None:
        if self.options.max_concurrent_rpcs >= self.options.workers:
            raise ValueError(
                "--max-concurrent-rpcs must stay below --workers, so a thread is always free for health checks"
            )

    def _bind(self) -> int:
        options = self.options
        target = f"{options.host}:{options.port}"
        if options.tls_cert or options.tls_key:
            if not (options.tls_cert and options.tls_key):
                raise ValueError("--tls-cert and --tls-key go together")
            client_ca = Path(options.tls_client_ca).read_bytes() if options.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(Path(options.tls_key).read_bytes(), Path(options.tls_cert).read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            try:
                port = self.server.add_secure_port(target, credentials)
            except RuntimeError:
                port = 0
        else:
            if options.tls_client_ca:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
            try:
                port = self.server.add_insecure_port(target)
            except RuntimeError:
                port = 0
        if port == 0:
            raise StartupError(
                f"cannot listen on {target}: the port is in use, or the host is not an address of this machine"
            )
        return port

    def worker_address(self) -> str:
        """How other servers and Job.worker name this one: host:port of its gRPC address, the machine's
        name standing in for a wildcard host (0.0.0.0 or ::), which names no particular machine."""
        host = self.options.host
        if host in ("", "0.0.0.0", "::", "[::]"):
            host = socket.gethostname()
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def address(self) -> str:
        host = self.options.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        keep_freed_memory()
        warning = exposure_warning(self.options.host, self.address, self.tokens is not None)
        if warning is not None:
            log.warning("%s", warning)
        if self.options.metrics_port is not None:
            host = "127.0.0.1" if is_loopback(self.options.host) else ""
            try:
                self.metrics_port = self.metrics.serve(self.options.metrics_port, host)
            except OSError as error:
                raise StartupError(
                    f"cannot serve metrics on port {self.options.metrics_port}: {error.strerror or error}"
                ) from None
        if self.ray is not None:
            try:
                self.ray.start()
            except RayUnavailable as error:
                raise StartupError(str(error)) from None
        self.jobs.start()  # jobs a previous run left running take their graphs back before any call comes
        self.server.start()
        for service in ("", *SERVICE_NAMES):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def _store_lost(self, reason: str) -> None:
        """Writes can no longer last: every one is refused from now on, and health says so until a restart."""
        log.error("%s; refusing every write and reporting NOT_SERVING until the server is restarted", reason)
        for service in ("", *SERVICE_NAMES):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self) -> None:
        """Turn health NOT_SERVING and refuse new calls; running Train streams and jobs stop after their
        current step and commit (the jobs resume at the next start); other calls get the grace period
        to finish; then the store is closed."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.service.draining = True
        self.jobs.stop()
        if self.ray is not None:
            self.ray.stop()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.options.grace_seconds).wait()
        self.executor.shutdown(wait=True)
        self.watch_executor.shutdown(wait=True)
        self.store.close()
        log.info("stopped")
        self._stopped.set()

    def reload_tokens(self) -> None:
        if self.tokens is None:
            log.info("SIGHUP ignored: the server runs without --auth-tokens")
            return
        try:
            self.tokens.reload()
        except (OSError, ValueError) as error:
            log.error("kept the previous tokens: %s", error)

    def handle_signals(self) -> None:
        """SIGTERM and SIGINT stop the server, SIGHUP rereads the tokens. Installed before the address
        is announced: a signal sent as soon as it is must never meet the default action (death)."""

        def on_stop_signal(signum: int, _frame: object) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            threading.Thread(target=self.stop, name="shutdown").start()

        signal.signal(signal.SIGTERM, on_stop_signal)
        signal.signal(signal.SIGINT, on_stop_signal)
        signal.signal(signal.SIGHUP, lambda _signum, _frame: self.reload_tokens())

    def wait_until_stopped(self) -> None:
        self._stopped.wait()
