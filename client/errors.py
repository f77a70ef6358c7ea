"""The one exception type of the client, so callers never need to know about grpc.RpcError."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status


@dataclass(frozen=True)
class Violation:
    """One field of a request the server refused (a google.rpc.BadRequest field violation)."""

    field: str
    description: str


class ChainruleError(Exception):
    """A failed call: `code` and `message` are the gRPC status; `str()` reads "CODE: message".

    `reason` (a stable word such as SHAPE_MISMATCH), `metadata` and `violations` come from the
    google.rpc rich error details when the server sends them, and are None or empty otherwise.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[Violation] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.violations = list(violations)


def from_rpc_error(error: grpc.RpcError) -> ChainruleError:
    """The ChainruleError of a grpc.RpcError, with the rich details of its trailing metadata if any."""
    code, message = error.code(), error.details() or ""
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[Violation] = []
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]  # every RpcError a channel raises is a Call
    except ValueError:  # rich details that contradict the status line: trust the status line alone
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason or None, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations = [Violation(v.field, v.description) for v in bad_request.field_violations]
    return ChainruleError(code, message, reason=reason, metadata=metadata, violations=violations)


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Re-raise a grpc.RpcError from the block as a ChainruleError, without grpc's noisy context."""
    try:
        yield
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
