"""`chainrule dashboard`: serve the app with uvicorn on a socket bound here, so --port 0 can print the port it got."""

from __future__ import annotations

import argparse
import socket
import sys

import uvicorn

from chainrule.client import Client

from .app import MissingAssets, build_app

LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def allowed_hosts(host: str) -> list[str]:
    """Host names a request may carry: the bound address and loopback names, or any when bound to
    every interface (then which names reach this machine cannot be known)."""
    if host in WILDCARD_HOSTS:
        return ["*"]
    return sorted({host, *LOOPBACK_NAMES})


def serve(args: argparse.Namespace, client: Client) -> int:
    """Run until SIGINT or SIGTERM; exit 2 if the app cannot start (assets missing, port taken)."""
    try:
        app = build_app(client, args.address, allowed_hosts(args.host))
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((args.host, args.port))
    except (MissingAssets, OSError) as error:
        print(f"chainrule: {error}", file=sys.stderr)
        return 2
    listener.listen(128)
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"chainrule dashboard on http://{shown}:{port}/ (server {args.address})", flush=True)
    if args.host in WILDCARD_HOSTS:
        print("chainrule: the dashboard listens on every interface: anyone who reaches it can cancel jobs", flush=True)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_graceful_shutdown=2, lifespan="off", server_header=False
    )
    with client:
        uvicorn.Server(config).run(sockets=[listener])
    return 0
