"""The `chainrule` command."""

from __future__ import annotations

import argparse
import logging
import sys

from chainrule.client.commands import add_client_commands
from chainrule.server import logs
from chainrule.server.app import RunningServer, ServerOptions
from chainrule.server.engine import DEFAULT_MAX_LIVE_GRAPHS
from chainrule.server.graph import Limits

MIB = 1024 * 1024


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
        workers=args.workers,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
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
    )
    try:
        server = RunningServer(options)
    except (OSError, ValueError) as error:
        print(f"chainrule: {error}", file=sys.stderr)
        return 2
    print(f"chainrule serving on {server.address} (database {options.db})", flush=True)
    logging.getLogger("chainrule.server").info("listening on %s", server.address)
    server.serve_until_signalled()
    return 0


def add_serve_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve_parser = commands.add_parser(
        "serve", help="start the gRPC server", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    network = serve_parser.add_argument_group("network")
    network.add_argument("--host", default="127.0.0.1", help="address to bind")
    network.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one and prints it")
    network.add_argument("--db", default="chainrule.db", help="SQLite database file")
    network.add_argument("--workers", type=int, default=64, help="RPC worker threads")
    network.add_argument("--grace-seconds", type=float, default=10.0, help="on SIGTERM, time running calls get")
    network.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    network.add_argument("--no-reflection", dest="reflection", action="store_false", help="turn off server reflection")
    security = serve_parser.add_argument_group("security")
    security.add_argument(
        "--auth-tokens", metavar="FILE", help="require bearer tokens: lines 'token tenant'; SIGHUP rereads"
    )
    security.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    security.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    security.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    limits = serve_parser.add_argument_group("limits")
    defaults = Limits()
    limits.add_argument("--max-nodes", type=int, default=defaults.max_nodes, help="nodes per graph")
    limits.add_argument("--max-name-length", type=int, default=defaults.max_name_length, help="characters per name")
    limits.add_argument("--max-attrs", type=int, default=defaults.max_attrs_per_node, help="attrs per node")
    limits.add_argument(
        "--max-attr-list-length", type=int, default=defaults.max_attr_list_length, help="entries per ints/floats attr"
    )
    limits.add_argument(
        "--max-tensor-elements", type=int, default=defaults.max_tensor_elements, help="elements per tensor or node"
    )
    limits.add_argument(
        "--max-request-memory-mb",
        type=int,
        default=defaults.max_request_bytes // MIB,
        help="estimated MiB of values one request may compute; larger requests get RESOURCE_EXHAUSTED",
    )
    limits.add_argument(
        "--max-live-graphs",
        type=int,
        default=DEFAULT_MAX_LIVE_GRAPHS,
        help="graphs kept compiled in memory; idle ones beyond this are recompiled from the store when used",
    )
    limits.add_argument("--max-message-mb", type=int, default=512, help="largest request message accepted, MiB")
    limits.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=60,
        help="chainrule calls and streams served at once, health checks not counted; below --workers, "
        "so health checks always find a thread",
    )
    training = serve_parser.add_argument_group("training")
    training.add_argument(
        "--checkpoint-every", type=int, default=100, help="steps between checkpoints when a stream asks for the default"
    )
    serve_parser.set_defaults(run=serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chainrule", description="Run and differentiate dataflow graphs over gRPC.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="log lines for people or machines (default: text)",
    )
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
