"""The `chainrule` command."""

from __future__ import annotations

import argparse
import logging
import sys

from chainrule.client.commands import add_client_commands, default_address
from chainrule.server.app import RunningServer, ServerOptions


def serve(args: argparse.Namespace) -> int:
    options = ServerOptions(
        host=args.host,
        port=args.port,
        db=args.db,
        workers=args.workers,
        max_request_bytes=args.max_request_mb * 1024 * 1024,
        checkpoint_every=args.checkpoint_every,
        grace_seconds=args.grace_seconds,
    )
    server = RunningServer(options)
    print(f"chainrule serving on {server.address} (database {options.db})", flush=True)
    logging.getLogger("chainrule.server").info("listening on %s", server.address)
    server.serve_until_signalled()
    return 0


def health(args: argparse.Namespace) -> int:
    """Exit 0 when the server at --address answers SERVING: for container health checks and scripts."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"{args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{args.address}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chainrule", description="Run and differentiate dataflow graphs over gRPC.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="start the gRPC server")
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve_parser.add_argument("--port", type=int, default=50051, help="port; 0 picks a free one (default: %(default)s)")
    serve_parser.add_argument("--db", default="chainrule.db", help="SQLite database file (default: %(default)s)")
    serve_parser.add_argument("--workers", type=int, default=32, help="RPC worker threads (default: %(default)s)")
    serve_parser.add_argument(
        "--max-request-mb", type=int, default=512, help="largest request message accepted, MiB (default: %(default)s)"
    )
    serve_parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="training steps between checkpoints when a stream asks for the default (default: %(default)s)",
    )
    serve_parser.add_argument(
        "--grace-seconds",
        type=float,
        default=10.0,
        help="on SIGTERM/SIGINT, how long running calls may take to finish (default: %(default)s)",
    )
    serve_parser.set_defaults(run=serve)

    health_parser = commands.add_parser("health", help="ask a server's grpc.health.v1 service whether it is serving")
    health_parser.add_argument(
        "--address", default=default_address(), help="HOST:PORT (default: $CHAINRULE_ADDRESS or 127.0.0.1:50051)"
    )
    health_parser.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    health_parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default: %(default)s)")
    health_parser.set_defaults(run=health)
    add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
