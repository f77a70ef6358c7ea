"""Bearer-token authentication: a file of `token tenant` lines, re-read on SIGHUP.

Each graph belongs to the tenant whose token created it; the servicer scopes every call to the
caller's tenant. Token values are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("chainrule.server")
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenFile:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._tenants: dict[str, str] = {}
        self.reload()

    def reload(self) -> None:
        """Read the file again; on a malformed file keep the tokens already loaded and say why."""
        tenants: dict[str, str] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(f"{self.path}:{number}: expected 'token tenant', found {len(fields)} fields")
            token, tenant = fields
            tenants[token] = tenant
        with self._lock:
            self._tenants = tenants
        log.info("loaded %d token(s) for %d tenant(s) from %s", len(tenants), len(set(tenants.values())), self.path)

    def tenant(self, metadata: Sequence[tuple[str, Any]]) -> str | None:
        """The tenant of the call's `authorization: Bearer <token>`, or None. The scheme is
        case-insensitive (RFC 7235: bearer, BEARER...)."""
        presented = next((value for key, value in metadata if key == "authorization"), None)
        if not isinstance(presented, str):
            return None
        scheme, _, credentials = presented.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return None
        token = credentials.strip().encode()
        with self._lock:
            tenants = list(self._tenants.items())
        found = None
        for known, tenant in tenants:
            if hmac.compare_digest(known.encode(), token):
                found = tenant
        return found


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call but the health check unless it carries a known bearer token."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        method: str = details.method  # type: ignore[attr-defined]
        if method.startswith(OPEN_METHOD_PREFIXES):
            return continuation(details)
        if self.tokens.tenant(details.invocation_metadata) is not None:  # type: ignore[attr-defined]
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        return _refusal(handler, "this server needs 'authorization: Bearer <token>' with a known token")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that answers UNAUTHENTICATED."""

    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **serializers)
    return grpc.unary_unary_rpc_method_handler(refuse, **serializers)
