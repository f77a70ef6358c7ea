"""Errors a client can cause, each carrying the gRPC status name the service answers with.

The engine raises these without knowing gRPC; the service maps `status` onto grpc.StatusCode.
`reason` is a stable machine-readable word (CYCLE, UNKNOWN_OP, SHAPE_MISMATCH...) and
`subject` the node, tensor or field at fault.

Names come from clients, so a message quotes them through `shown` (control characters escaped,
long names cut short) and `check_name` holds every name to --max-name-length and printable text.
"""

from __future__ import annotations

import re

CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")
"""Unicode's Cc category: C0 controls, DEL and C1 controls."""
SHOWN_NAME_CHARACTERS = 64


class ChainruleError(Exception):
    status = "INTERNAL"

    def __init__(self, message: str, *, reason: str = "INVALID", subject: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.subject = subject


class InvalidArgument(ChainruleError):
    status = "INVALID_ARGUMENT"


class NonScalarLoss(InvalidArgument):
    """A loss of more than one element with no loss_grad to seed it: Backward can take one, Train cannot."""

    def __init__(self, loss: str, shape: list[int]) -> None:
        super().__init__(
            f"loss '{loss}' has shape {shape}; a loss must be a scalar unless loss_grad is given",
            reason="SHAPE_MISMATCH",
            subject=loss,
        )
        self.loss = loss
        self.shape = shape


class NotFound(ChainruleError):
    status = "NOT_FOUND"


class AlreadyExists(ChainruleError):
    status = "ALREADY_EXISTS"


class ResourceExhausted(ChainruleError):
    status = "RESOURCE_EXHAUSTED"


class FailedPrecondition(ChainruleError):
    """The request is sound but the system is not in a state to run it (a dataset a job still uses)."""

    status = "FAILED_PRECONDITION"


class DataLoss(ChainruleError):
    """Stored data read back does not match what was written (a checksum differs)."""

    status = "DATA_LOSS"


class Unavailable(ChainruleError):
    status = "UNAVAILABLE"


class Cancelled(ChainruleError):
    status = "CANCELLED"


class DeadlineExceeded(ChainruleError):
    status = "DEADLINE_EXCEEDED"


class Unauthenticated(ChainruleError):
    status = "UNAUTHENTICATED"


def shown(name: str, limit: int = SHOWN_NAME_CHARACTERS) -> str:
    """`name` as a message quotes it: control characters escaped, and cut after `limit` characters."""
    cut = name if len(name) <= limit else f"{name[:limit]}... ({len(name):,} characters)"
    return CONTROL_CHARACTER.sub(lambda control: f"\\x{ord(control.group()):02x}", cut)


def check_name(name: str, field: str, max_length: int, subject: str | None = None) -> None:
    """Refuse a name longer than `max_length` or holding a control character, naming `field`."""
    if len(name) > max_length:
        raise InvalidArgument(
            f"{field} '{shown(name)}' is {len(name):,} characters long, more than the limit of {max_length} "
            "(--max-name-length)",
            reason="NAME_TOO_LONG",
            subject=field if subject is None else subject,
        )
    control = CONTROL_CHARACTER.search(name)
    if control is not None:
        raise InvalidArgument(
            f"{field} '{shown(name)}' holds the control character U+{ord(control.group()):04X}; "
            "names must be printable",
            reason="BAD_NAME",
            subject=field if subject is None else subject,
        )
