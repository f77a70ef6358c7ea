"""Opening a channel to a chainrule server: plain or TLS (optionally mutual), with an optional bearer token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc

MIB = 1024 * 1024
DEFAULT_MAX_MESSAGE_MB = 512
"""The server's default --max-message-mb: clients receive what the server accepts, not gRPC's 4 MiB."""
MAX_MESSAGE_MB = 2048
"""gRPC holds message sizes in a signed 32-bit integer, so limits stay below 2 GiB."""
RECEIVE_LIMIT_OPTION = "grpc.max_receive_message_length"


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds `authorization: Bearer <token>` to every call, over plain and TLS channels alike."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def open_channel(
    address: str,
    *,
    token: str | None = None,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    tls: bool = False,
    options: Sequence[tuple[str, Any]] = (),
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
) -> grpc.Channel:
    """TLS when `tls` or any tls_* file is given: `tls_ca` verifies the server (the system's roots when
    None); `tls_cert` and `tls_key` are the client's own certificate for servers that require one.

    The channel receives messages of up to `max_message_mb` MiB, unless `options` sets
    grpc.max_receive_message_length itself."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together")
    if not 0 < max_message_mb < MAX_MESSAGE_MB:
        raise ValueError(f"max_message_mb must be from 1 to {MAX_MESSAGE_MB - 1}, got {max_message_mb}")
    if all(name != RECEIVE_LIMIT_OPTION for name, _ in options):
        options = [(RECEIVE_LIMIT_OPTION, max_message_mb * MIB), *options]
    if tls or tls_ca or tls_cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(tls_ca), private_key=_read(tls_key), certificate_chain=_read(tls_cert)
        )
        channel = grpc.secure_channel(address, credentials, options=list(options))
    else:
        channel = grpc.insecure_channel(address, options=list(options))
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel
