"""What every chainrule servicer shares: per-call bookkeeping, admission, error mapping, lenient parsing.

Each RPC method gets a `Call`: the caller's tenant, a stop flag raised on cancellation, and a
request id that tags the call's log lines and is echoed to the client as `x-request-id`
metadata. `unary` and `streaming` wrap the methods so engine errors become statuses with
google.rpc details, and anything else is logged and answered INTERNAL.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from chainrule import tensors
from chainrule.server.auth import TokenFile
from chainrule.server.errors import ChainruleError, InvalidArgument, ResourceExhausted, Unauthenticated
from chainrule.server.metrics import Metrics
from chainrule.server.plan import StopFlag
from chainrule.v1 import tensor_pb2

log = logging.getLogger("chainrule.server")
Handler = TypeVar("Handler", bound=Callable[..., Any])
ERROR_DOMAIN = "chainrule"
REQUEST_ID_KEY = "x-request-id"


@dataclass
class Call:
    method: str
    tenant: str
    authenticated: bool
    request_id: str
    stop: StopFlag
    started: float = field(default_factory=time.perf_counter)
    bytes_in: int = 0
    bytes_out: int = 0
    detail: str = ""
    admitted: bool = False


@dataclass
class CallGate:
    """What every servicer of one server shares: tokens, metrics, and the slots of
    --max-concurrent-rpcs (health checks are not counted)."""

    tokens: TokenFile | None = None
    metrics: Metrics = field(default_factory=Metrics)
    max_calls: int | None = None
    slots: threading.Semaphore | None = None

    def __post_init__(self) -> None:
        if self.max_calls is not None and self.slots is None:
            self.slots = threading.Semaphore(self.max_calls)


class Servicer:
    """The per-call bookkeeping `unary` and `streaming` run around every method."""

    def __init__(self, calls: CallGate) -> None:
        self.calls = calls

    # ------------------------------------------------------------ per-call bookkeeping
    def begin(self, method: str, context: grpc.ServicerContext, request: Any) -> Call:
        metadata = context.invocation_metadata()
        request_id = next((str(v) for k, v in metadata if k == REQUEST_ID_KEY), "") or uuid.uuid4().hex[:16]
        context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        stop = StopFlag()

        def on_done() -> None:
            stop.stopped = True

        context.add_callback(on_done)
        tenant = "" if self.calls.tokens is None else self.calls.tokens.tenant(metadata)
        call = Call(method, tenant or "", tenant is not None, request_id, stop)
        if hasattr(request, "ByteSize"):
            call.bytes_in = request.ByteSize()
        return call

    def authorize(self, call: Call) -> None:
        """The interceptor already refused unknown tokens; this covers a token file reloaded since."""
        if not call.authenticated:
            raise Unauthenticated("a known bearer token is required", reason="UNAUTHENTICATED")

    def admit(self, call: Call) -> None:
        """Count the call against max_calls, or refuse it at once rather than queue it."""
        if self.calls.slots is None:
            return
        if not self.calls.slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"the server is already serving {self.calls.max_calls} calls and streams, its limit "
                "(--max-concurrent-rpcs); retry later",
                reason="TOO_MANY_CALLS",
            )
        call.admitted = True

    def end(self, call: Call, code: str) -> None:
        if call.admitted:
            assert self.calls.slots is not None
            self.calls.slots.release()
            call.admitted = False
        elapsed = time.perf_counter() - call.started
        self.calls.metrics.rpcs.labels(call.method, code).inc()
        self.calls.metrics.latency.labels(call.method).observe(elapsed)
        self.calls.metrics.bytes_in.labels(call.method).inc(call.bytes_in)
        self.calls.metrics.bytes_out.labels(call.method).inc(call.bytes_out)
        log.info(
            "%s %s in %.1f ms (%d bytes in, %d out)%s",
            call.method,
            code,
            elapsed * 1e3,
            call.bytes_in,
            call.bytes_out,
            f": {call.detail}" if call.detail else "",
            extra={"request_id": call.request_id, "tenant": call.tenant},
        )


def _abort(context: grpc.ServicerContext, error: ChainruleError) -> None:
    """Abort with the message plus google.rpc details: ErrorInfo (reason) and BadRequest (culprit)."""
    code = getattr(grpc.StatusCode, error.status)
    status = status_pb2.Status(code=code.value[0], message=error.message)
    metadata = {"subject": error.subject} if error.subject else {}
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata))
    if error.status == "INVALID_ARGUMENT" and error.subject:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.subject, description=error.message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    context.abort_with_status(rpc_status.to_status(status))


def unary(method: Handler) -> Handler:
    """Turn engine errors into statuses; anything else is a bug, logged and answered INTERNAL."""

    @functools.wraps(method)
    def handler(self: Servicer, request: Any, context: grpc.ServicerContext) -> Any:
        call = self.begin(method.__name__, context, request)
        code = "OK"
        try:
            self.authorize(call)
            self.admit(call)
            response = method(self, parsed(request), context, call)
            call.bytes_out += response.ByteSize()
            return response
        except ChainruleError as error:
            code, call.detail = error.status, error.message
            _abort(context, error)
        except Exception:
            code = "INTERNAL"
            log.exception("%s failed", method.__name__, extra={"request_id": call.request_id})
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed unexpectedly; see the server log")
        finally:
            self.end(call, code)

    return handler  # type: ignore[return-value]


def streaming(method: Handler) -> Handler:
    """As `unary`, for methods that stream responses; a client that went away needs no answer."""

    @functools.wraps(method)
    def handler(self: Servicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = self.begin(method.__name__, context, request)
        code = "OK"
        try:
            self.authorize(call)
            self.admit(call)
            requests = (parsed(item) for item in request) if isinstance(request, Iterator) else parsed(request)
            for response in method(self, requests, context, call):
                call.bytes_out += len(response) if isinstance(response, bytes) else response.ByteSize()
                yield response
        except ChainruleError as error:
            code, call.detail = error.status, error.message
            _abort(context, error)
        except Exception:
            if not context.is_active():
                code = "CANCELLED"
                return
            code = "INTERNAL"
            log.exception("%s failed", method.__name__, extra={"request_id": call.request_id})
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed unexpectedly; see the server log")
        finally:
            if code == "OK" and not context.is_active():
                code = "CANCELLED"
            self.end(call, code)

    return handler  # type: ignore[return-value]


class MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the client gets INVALID_ARGUMENT
    instead of gRPC's own INTERNAL "Exception deserializing request"."""

    def __init__(self, message_type: str, error: Exception) -> None:
        self.message = f"the {message_type} could not be parsed: {error}"


def _lenient_parser(message_class: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return MalformedRequest(message_class.__name__, error)

    return parse


def parsed(request: Any) -> Any:
    if isinstance(request, MalformedRequest):
        raise InvalidArgument(request.message, reason="MALFORMED_REQUEST")
    return request


def _serialize(response: Message | bytes) -> bytes:
    """Responses are messages, or bytes a method serialized itself."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_to_server(service: Servicer, descriptor: ServiceDescriptor, server: grpc.Server) -> None:
    """Register like the generated add_*Servicer_to_server, with lenient request parsing."""
    messages = message_factory.GetMessageClassesForFiles([descriptor.file.name], descriptor.file.pool)
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: factories[method.client_streaming, method.server_streaming](
            getattr(service, method.name),
            request_deserializer=_lenient_parser(messages[method.input_type.full_name]),
            response_serializer=_serialize,
        )
        for method in descriptor.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


def decode_tensor(tensor: tensor_pb2.Tensor, name: str, max_elements: int | None = None) -> np.ndarray:
    try:
        return tensors.decode(tensor, name, max_elements)
    except tensors.TensorTooLarge as error:
        raise ResourceExhausted(str(error), reason="TENSOR_TOO_LARGE", subject=name) from None
    except tensors.TensorError as error:
        raise InvalidArgument(str(error), reason="BAD_TENSOR", subject=name) from None
