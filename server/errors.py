"""Errors a client can cause, each carrying the gRPC status name the service answers with.

The engine raises these without knowing gRPC; the service maps `status` onto grpc.StatusCode.
`reason` is a stable machine-readable word (CYCLE, UNKNOWN_OP, SHAPE_MISMATCH...) and
`subject` the node, tensor or field at fault.
"""

from __future__ import annotations


class ChainruleError(Exception):
    status = "INTERNAL"

    def __init__(self, message: str, *, reason: str = "INVALID", subject: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.subject = subject


class InvalidArgument(ChainruleError):
    status = "INVALID_ARGUMENT"


class NotFound(ChainruleError):
    status = "NOT_FOUND"


class AlreadyExists(ChainruleError):
    status = "ALREADY_EXISTS"


class ResourceExhausted(ChainruleError):
    status = "RESOURCE_EXHAUSTED"


class Unavailable(ChainruleError):
    status = "UNAVAILABLE"


class Cancelled(ChainruleError):
    status = "CANCELLED"


class Unauthenticated(ChainruleError):
    status = "UNAUTHENTICATED"
