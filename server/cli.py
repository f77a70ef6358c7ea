"""The `chainrule` command.

`chainrule serve` refuses impossible flag values before anything starts (argparse names the flag
and the range), and a server that cannot start prints one line saying why and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable

from chainrule.client.commands import add_client_commands
from chainrule.server import logs
from chainrule.server.app import RunningServer, ServerOptions, StartupError
from chainrule.server.datasets import DEFAULT_MAX_DATASET_MB
from chainrule.server.engine import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_LIVE_GRAPHS, DEFAULT_MAX_LIVE_MEMORY_MB
from chainrule.server.graph import Limits
from chainrule.server.jobs import DEFAULT_JOB_WORKERS
from chainrule.server.jobs.ray_cluster import RAY_EXTRA
from chainrule.server.jobs.ray_executor import DEFAULT_REPLICA_CPUS
from chainrule.server.jobs.runner import DEFAULT_JOB_MAX_RESTARTS
from chainrule.server.service.calls import DEFAULT_MAX_WATCHERS, DEFAULT_STREAM_IDLE_SECONDS
from chainrule.server.store import POOL_SPARE_CONNECTIONS, POSTGRES_EXTRA, WATCHER_CONNECTIONS, location

MIB = 1024 * 1024
MAX_PORT = 65535
MAX_MESSAGE_MB = 2047
"""gRPC sizes messages with a signed 32-bit integer."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high` (no upper bound when None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < low or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: it must be {span}")
        return value

    parse.__name__ = "integer"
    return parse


def seconds(low: float, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds above `low` (or from it, when `inclusive`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            bound = "at least" if inclusive else "more than"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {bound} {low:g}")
        return value

    parse.__name__ = "seconds"
    return parse


def cpus(text: str) -> float:
    """An argparse type: a finite number of CPUs, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of CPUs") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range: it must be at least 0")
    return value


PORT = integer(0, MAX_PORT)
POSITIVE = integer(1)
NOT_NEGATIVE = integer(0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show: switches, and options off unless given."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def serve(args: argparse.Namespace) -> int:
    limits = Limits(
        max_nodes=args.max_nodes,
        max_name_length=args.max_name_length,
        max_attrs_per_node=args.max_attrs,
        max_attr_list_length=args.max_attr_list_length,
        max_tensor_elements=args.max_tensor_elements,
        max_request_bytes=args.max_request_memory_mb * MIB,
    )
    options = ServerOptions(
        host=args.host,
        port=args.port,
        db=args.db,
        db_pool_size=args.db_pool_size,
        workers=args.workers,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_concurrent_rpcs_per_tenant=args.max_concurrent_rpcs_per_tenant,
        max_concurrent_compute=args.max_concurrent_compute,
        stream_idle_seconds=args.stream_idle_seconds,
        max_watchers=args.max_watchers,
        max_watchers_per_tenant=args.max_watchers_per_tenant,
        max_request_message_bytes=args.max_message_mb * MIB,
        checkpoint_every=args.checkpoint_every,
        grace_seconds=args.grace_seconds,
        limits=limits,
        auth_tokens=args.auth_tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        reflection=args.reflection,
        metrics_port=args.metrics_port,
        max_live_graphs=args.max_live_graphs,
        max_live_memory_bytes=args.max_live_memory_mb * MIB,
        dataset_cache=args.dataset_cache,
        max_dataset_bytes=args.max_dataset_mb * MIB,
        job_workers=args.job_workers,
        job_max_restarts=args.job_max_restarts,
        ray_address=args.ray_address,
        ray_replica_cpus=args.ray_replica_cpus,
        job_lease_seconds=args.job_lease_seconds,
    )
    try:
        server = RunningServer(options)
        server.start()
    except (StartupError, OSError, ValueError) as error:
        print(f"chainrule: {error}", file=sys.stderr)
        return 2
    server.handle_signals()
    if server.metrics_port is not None:
        print(f"chainrule metrics on port {server.metrics_port} (/metrics)", flush=True)
    print(f"chainrule serving on {server.address} (database {location.shown(options.db)})", flush=True)
    logging.getLogger("chainrule.server").info("listening on %s", server.address)
    server.wait_until_stopped()
    return 0


def add_log_options(parser: argparse._ActionsContainer, default: object) -> None:
    """--log-level and --log-format, on `chainrule` itself and on `chainrule serve`; on `serve` they
    default to argparse.SUPPRESS, so that `chainrule --log-format json serve` keeps its value."""
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO" if default is None else default,
        help="the least severe log lines written",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text" if default is None else default,
        help="log lines for people (text) or machines (json: one object per line)",
    )


def add_serve_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve_parser = commands.add_parser("serve", help="start the gRPC server", formatter_class=HelpFormatter)
    network = serve_parser.add_argument_group("network")
    network.add_argument("--host", default="127.0.0.1", help="address to bind")
    network.add_argument("--port", type=PORT, default=50051, help="port; 0 picks a free one and prints it")
    network.add_argument(
        "--db",
        default="chainrule.db",
        help="SQLite database file, or a postgresql://USER@HOST:PORT/DATABASE URL shared by any number of servers "
        f"(needs {POSTGRES_EXTRA}; give the password through PGPASSWORD or ~/.pgpass rather than the URL)",
    )
    network.add_argument(
        "--db-pool-size",
        type=POSITIVE,
        help="connections to PostgreSQL one server holds at most, opened as calls need them (default: "
        f"--max-concurrent-rpcs + --job-workers + {WATCHER_CONNECTIONS + POOL_SPARE_CONNECTIONS}: one per call "
        f"and per job, so no call waits for another's, {WATCHER_CONNECTIONS} that all WatchJob streams share for "
        f"their reads of the store, however many watch, and {POOL_SPARE_CONNECTIONS} for the server's heartbeat "
        "and claims); the servers on one database together need fewer than its max_connections",
    )
    network.add_argument(
        "--dataset-cache",
        metavar="DIR",
        help="directory of the local copies of datasets that jobs memory-map, refilled from the database when "
        "missing (default: DB.cache beside the database)",
    )
    network.add_argument("--workers", type=POSITIVE, default=64, help="RPC worker threads")
    network.add_argument(
        "--grace-seconds", type=seconds(0, inclusive=True), default=10.0, help="on SIGTERM, time running calls get"
    )
    network.add_argument(
        "--metrics-port", type=PORT, help="serve Prometheus metrics on this port; 0 picks a free one and prints it"
    )
    network.add_argument(
        "--no-reflection",
        dest="reflection",
        action="store_false",
        help="turn off gRPC server reflection, which is on unless this is given",
    )
    security = serve_parser.add_argument_group("security")
    security.add_argument(
        "--auth-tokens", metavar="FILE", help="require bearer tokens: lines 'token tenant'; SIGHUP rereads"
    )
    security.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    security.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    security.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    limits = serve_parser.add_argument_group("limits")
    defaults = Limits()
    limits.add_argument("--max-nodes", type=POSITIVE, default=defaults.max_nodes, help="nodes per graph")
    limits.add_argument(
        "--max-name-length",
        type=POSITIVE,
        default=defaults.max_name_length,
        help="characters per name: graph and node names, and every name or id a request carries",
    )
    limits.add_argument("--max-attrs", type=NOT_NEGATIVE, default=defaults.max_attrs_per_node, help="attrs per node")
    limits.add_argument(
        "--max-attr-list-length",
        type=NOT_NEGATIVE,
        default=defaults.max_attr_list_length,
        help="entries per ints/floats attr",
    )
    limits.add_argument(
        "--max-tensor-elements",
        type=POSITIVE,
        default=defaults.max_tensor_elements,
        help="elements per tensor or node",
    )
    limits.add_argument(
        "--max-request-memory-mb",
        type=POSITIVE,
        default=defaults.max_request_bytes // MIB,
        help="estimated MiB of values one request may compute; larger requests get RESOURCE_EXHAUSTED",
    )
    limits.add_argument(
        "--max-live-graphs",
        type=POSITIVE,
        default=DEFAULT_MAX_LIVE_GRAPHS,
        help="graphs kept compiled in memory; idle ones beyond this are recompiled from the store when used",
    )
    limits.add_argument(
        "--max-live-memory-mb",
        type=POSITIVE,
        default=DEFAULT_MAX_LIVE_MEMORY_MB,
        help="estimated MiB the graphs kept compiled may hold with their cached schedules and parameters; "
        "the least recently used idle ones beyond it are recompiled from the store when used",
    )
    limits.add_argument(
        "--max-dataset-mb",
        type=POSITIVE,
        default=DEFAULT_MAX_DATASET_MB,
        help="largest dataset UploadDataset accepts, MiB; larger ones get RESOURCE_EXHAUSTED at their header",
    )
    limits.add_argument(
        "--max-message-mb",
        type=integer(1, MAX_MESSAGE_MB),
        default=512,
        help="largest request message accepted, MiB",
    )
    limits.add_argument(
        "--max-concurrent-rpcs",
        type=POSITIVE,
        default=60,
        help="chainrule calls and streams served at once, health checks not counted; below --workers, "
        "so health checks always find a thread",
    )
    limits.add_argument(
        "--max-concurrent-rpcs-per-tenant",
        type=POSITIVE,
        help="calls and streams one tenant may have open at once (default: half of --max-concurrent-rpcs; "
        "without --auth-tokens every caller is one tenant, held to it too)",
    )
    limits.add_argument(
        "--max-concurrent-compute",
        type=POSITIVE,
        help="calls running graphs at once; the others admitted wait their turn, off the GIL "
        "(default: one per CPU core)",
    )
    limits.add_argument(
        "--max-watchers",
        type=POSITIVE,
        default=DEFAULT_MAX_WATCHERS,
        help="WatchJob streams served at once; not counted in --max-concurrent-rpcs, each has a thread of its "
        "own beyond --workers",
    )
    limits.add_argument(
        "--max-watchers-per-tenant",
        type=POSITIVE,
        help="WatchJob streams one tenant may have open at once (default: half of --max-watchers)",
    )
    limits.add_argument(
        "--stream-idle-seconds",
        type=seconds(0, inclusive=False),
        default=DEFAULT_STREAM_IDLE_SECONDS,
        help="a Train stream that sends nothing for this long ends with DEADLINE_EXCEEDED, its steps committed",
    )
    training = serve_parser.add_argument_group("training")
    training.add_argument(
        "--checkpoint-every",
        type=POSITIVE,
        default=100,
        help="steps between checkpoints when a stream asks for the default",
    )
    training.add_argument(
        "--job-workers",
        type=POSITIVE,
        default=DEFAULT_JOB_WORKERS,
        help="training jobs run at once; the others wait in creation order",
    )
    training.add_argument(
        "--job-lease-seconds",
        type=seconds(0, inclusive=False),
        default=DEFAULT_LEASE_SECONDS,
        help="how long a job (and a Train stream's hold on its graph) stays with a server that stopped "
        "renewing it, before another server on the same database takes it up from its last commit",
    )
    training.add_argument(
        "--job-max-restarts",
        type=NOT_NEGATIVE,
        default=DEFAULT_JOB_MAX_RESTARTS,
        help="times a job on Ray starts again from its last commit after losing a replica before it fails "
        "(a Ray cluster out of reach is waited for, not counted)",
    )
    ray = serve_parser.add_argument_group("ray")
    ray.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="run job steps on a Ray cluster: auto, HOST:PORT of its head, ray://HOST:PORT, or local to start a "
        f"private one on 127.0.0.1 (needs {RAY_EXTRA}); a cluster with token authentication needs "
        "RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token",
    )
    ray.add_argument(
        "--ray-replica-cpus",
        type=cpus,
        default=DEFAULT_REPLICA_CPUS,
        help="CPUs each replica of a job reserves on the Ray cluster (0: none reserved)",
    )
    add_log_options(serve_parser.add_argument_group("logging"), argparse.SUPPRESS)
    serve_parser.set_defaults(run=serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chainrule",
        description="Run and differentiate dataflow graphs over gRPC.",
        formatter_class=HelpFormatter,
    )
    add_log_options(parser, None)
    commands = parser.add_subparsers(dest="command", required=True)

    add_serve_command(commands)
    add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
