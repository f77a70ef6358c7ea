"""What every chainrule servicer shares: per-call bookkeeping, admission, error mapping, lenient parsing.

Each RPC method gets a `Call`: the caller's tenant, a stop flag raised on cancellation, and a
request id that tags the call's log lines and is echoed to the client as `x-request-id`
metadata. `unary` and `streaming` wrap the methods so engine errors become statuses with
google.rpc details, and anything else is logged and answered INTERNAL. Before a method runs,
every name its request carries is checked (`check_names`); an error's message and details are
cut to what a default gRPC client accepts in trailers (`error_status`).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import Gauge

from chainrule import tensors
from chainrule.server.auth import TokenFile
from chainrule.server.errors import (
    Cancelled,
    ChainruleError,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    check_name,
)
from chainrule.server.graph import Limits
from chainrule.server.metrics import Metrics
from chainrule.server.plan import StopFlag
from chainrule.v1 import graph_pb2, tensor_pb2

log = logging.getLogger("chainrule.server")
Handler = TypeVar("Handler", bound=Callable[..., Any])
T = TypeVar("T")
_END = object()
ERROR_DOMAIN = "chainrule"
REQUEST_ID_KEY = "x-request-id"
REQUEST_ID_MAX_CHARACTERS = 256
"""A longer x-request-id is cut to this before it is logged or echoed."""
ERROR_TRAILER_BUDGET = 7 * 1024
"""Bytes an error's grpc-message (percent-encoded) and grpc-status-details-bin (base64) may take
together: gRPC clients refuse trailers over 8 KiB by default (and then report RESOURCE_EXHAUSTED
instead of the error), and grpc-status, the header names and HPACK's 32 bytes per entry need the rest."""
ERROR_SUBJECT_MAX_BYTES = 1024
"""UTF-8 bytes of an error's subject (ErrorInfo metadata, BadRequest field): a name at the default
--max-name-length of 256 characters fits whole even in 4-byte characters."""
CUT_MARK = " [...]"
ID_FIELDS_MIN_LENGTH = 64
"""Ids and page tokens are held to --max-name-length, but never below the length of those the server issues."""
UNCHECKED_MESSAGES = frozenset({tensor_pb2.Tensor.DESCRIPTOR.full_name, graph_pb2.Graph.DESCRIPTOR.full_name})
"""Not walked by `check_names`: tensors carry data, and a graph's names are checked as it is built."""
DEFAULT_STREAM_IDLE_SECONDS = 300.0
DEFAULT_MAX_WATCHERS = 256
COMPUTE_POLL_SECONDS = 0.1
"""How often a call waiting for a compute slot looks whether it was cancelled."""


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
    watching: bool = False
    """Admitted as a watcher (--max-watchers), not as a call."""


def default_compute_slots() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class CallGate:
    """What every servicer of one server shares: tokens, metrics, name and idle limits, the slots
    of --max-concurrent-rpcs and --max-concurrent-rpcs-per-tenant (health checks are not counted),
    those of --max-watchers and --max-watchers-per-tenant (WatchJob streams, which spend their lives
    waiting for steps: they have threads of their own and do not take calls' slots), and the
    compute slots.

    Compute slots bound how many calls run graphs at once (`Servicer.computing`). The others wait
    blocked, off the GIL, so a health check or a cheap call competes for the GIL with a few busy
    threads instead of every admitted one (with sixty computing at once, health checks took up to a
    second here). Numpy releases the GIL in its kernels, so one slot per core keeps every core busy."""

    tokens: TokenFile | None = None
    metrics: Metrics = field(default_factory=Metrics)
    max_calls: int | None = None
    max_calls_per_tenant: int | None = None
    max_name_length: int = Limits.max_name_length
    compute_slots: int | None = None
    stream_idle_seconds: float = DEFAULT_STREAM_IDLE_SECONDS
    """How long a client-streaming call may send nothing before it is ended."""
    max_watchers: int | None = None
    max_watchers_per_tenant: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _open: collections.Counter[str] = field(default_factory=collections.Counter, init=False, repr=False)
    _watching: collections.Counter[str] = field(default_factory=collections.Counter, init=False, repr=False)
    _compute: FairSlots | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.compute_slots is not None:
            self._compute = FairSlots(self.compute_slots)

    def admit(self, tenant: str) -> None:
        """Count a call of `tenant`, or refuse it at once rather than queue it (a full server says so
        before a tenant's own limit does)."""
        with self._lock:
            if self.max_calls is not None and self._open.total() >= self.max_calls:
                raise ResourceExhausted(
                    f"the server is already serving {self.max_calls} calls and streams, its limit "
                    "(--max-concurrent-rpcs); retry later",
                    reason="TOO_MANY_CALLS",
                )
            limit = self.max_calls_per_tenant
            if limit is not None and self._open[tenant] >= limit:
                raise ResourceExhausted(
                    f"this tenant already has {limit} calls and streams open, its limit "
                    "(--max-concurrent-rpcs-per-tenant); retry later",
                    reason="TOO_MANY_CALLS",
                )
            self._open[tenant] += 1

    def release(self, tenant: str) -> None:
        with self._lock:
            _uncount(self._open, tenant)

    def admit_watcher(self, tenant: str) -> None:
        """Count a WatchJob stream of `tenant`, or refuse it at once, as `admit` does calls."""
        with self._lock:
            if self.max_watchers is not None and self._watching.total() >= self.max_watchers:
                raise ResourceExhausted(
                    f"the server is already serving {self.max_watchers} WatchJob streams, its limit "
                    "(--max-watchers); retry later",
                    reason="TOO_MANY_WATCHERS",
                )
            limit = self.max_watchers_per_tenant
            if limit is not None and self._watching[tenant] >= limit:
                raise ResourceExhausted(
                    f"this tenant already has {limit} WatchJob streams open, its limit "
                    "(--max-watchers-per-tenant); retry later",
                    reason="TOO_MANY_WATCHERS",
                )
            self._watching[tenant] += 1

    def release_watcher(self, tenant: str) -> None:
        with self._lock:
            _uncount(self._watching, tenant)

    @contextlib.contextmanager
    def computing(self, stop: StopFlag) -> Iterator[None]:
        """Hold a compute slot, waiting for one first; a call that ends while it waits raises Cancelled."""
        if self._compute is None:
            yield
            return
        self._compute.acquire(stop, self.metrics.compute_waiting)
        try:
            yield
        finally:
            self._compute.release()


def _uncount(counts: collections.Counter[str], tenant: str) -> None:
    counts[tenant] -= 1
    if not counts[tenant]:
        del counts[tenant]


class FairSlots:
    """A semaphore that hands its slots out in the order they were asked for, so a call waiting
    for compute is overtaken by none that came after it; a waiter can give up when its call ends."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._lock = threading.Lock()

    def acquire(self, stop: StopFlag, waiting: Gauge) -> None:
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            granted = threading.Event()
            self._waiting.append(granted)
        waiting.inc()
        try:
            while not granted.wait(COMPUTE_POLL_SECONDS):
                if stop.stopped:
                    with self._lock:
                        came_too_late = granted.is_set()
                        if not came_too_late:
                            self._waiting.remove(granted)
                    if came_too_late:
                        self.release()  # pass it on
                    raise Cancelled("the call ended while it waited for a compute slot", reason="CANCELLED")
        finally:
            waiting.dec()

    def release(self) -> None:
        """Hand the slot straight to the longest waiter, if any."""
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._free += 1


class Servicer:
    """The per-call bookkeeping `unary` and `streaming` run around every method."""

    def __init__(self, calls: CallGate) -> None:
        self.calls = calls

    # ------------------------------------------------------------ per-call bookkeeping
    def begin(self, method: str, context: grpc.ServicerContext, request: Any) -> Call:
        metadata = context.invocation_metadata()
        request_id = next((str(v) for k, v in metadata if k == REQUEST_ID_KEY), "") or uuid.uuid4().hex[:16]
        request_id = request_id[:REQUEST_ID_MAX_CHARACTERS]
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
        self.calls.admit(call.tenant)
        call.admitted = True

    def admit_watcher(self, call: Call) -> None:
        self.calls.admit_watcher(call.tenant)
        call.admitted = call.watching = True

    def checked(self, request: Any) -> Any:
        """The request, parsed, once every name it carries is within the limits."""
        request = parsed(request)
        if isinstance(request, Message):
            check_names(request, self.calls.max_name_length)
        return request

    def computing(self, call: Call) -> contextlib.AbstractContextManager[None]:
        """Wrap the part of a call that runs a graph: it waits for a compute slot (see CallGate)."""
        return self.calls.computing(call.stop)

    def computed(self, items: Iterator[T], call: Call) -> Iterator[T]:
        """`items`, each computed holding a compute slot, released while the caller sends it."""
        while True:
            with self.computing(call):
                item = next(items, _END)
            if item is _END:
                return
            yield item  # type: ignore[misc]

    def end(self, call: Call, code: str) -> None:
        if call.admitted:
            if call.watching:
                self.calls.release_watcher(call.tenant)
            else:
                self.calls.release(call.tenant)
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


def _status(error: ChainruleError, message: str, subject: str) -> status_pb2.Status:
    """The message plus google.rpc details: ErrorInfo (reason) and BadRequest (culprit)."""
    code = getattr(grpc.StatusCode, error.status)
    status = status_pb2.Status(code=code.value[0], message=message)
    metadata = {"subject": subject} if subject else {}
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata))
    if error.status == "INVALID_ARGUMENT" and subject:
        violation = error_details_pb2.BadRequest.FieldViolation(field=subject, description=message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return status


def _trailer_bytes(status: status_pb2.Status) -> int:
    """What the status takes on the wire: grpc-message percent-encoded, the details base64-encoded."""
    message = sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in status.message.encode())
    return message + len(base64.b64encode(status.SerializeToString()))


def _cut(text: str, max_bytes: int) -> str:
    """`text` in at most `max_bytes` UTF-8 bytes, cut at a character boundary and marked as cut."""
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max(0, max_bytes - len(CUT_MARK))].decode(errors="ignore") + CUT_MARK


def error_status(error: ChainruleError) -> status_pb2.Status:
    """The error's status, its message cut short (in the status and in BadRequest alike) as far as it
    takes to keep within ERROR_TRAILER_BUDGET, its subject to ERROR_SUBJECT_MAX_BYTES."""
    subject = _cut(error.subject, ERROR_SUBJECT_MAX_BYTES)
    message = error.message
    status = _status(error, message, subject)
    fixed = _trailer_bytes(_status(error, "", subject))
    while (size := _trailer_bytes(status)) > ERROR_TRAILER_BUDGET and message:
        length = len(message.encode())
        message = _cut(message, min(length - 1, length * (ERROR_TRAILER_BUDGET - fixed) // (size - fixed)))
        status = _status(error, message, subject)
    return status


def _abort(context: grpc.ServicerContext, call: Call, error: ChainruleError) -> None:
    """Answer the error's status; the call's log line gets the message as the client sees it."""
    status = error_status(error)
    call.detail = status.message
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
            response = method(self, self.checked(request), context, call)
            call.bytes_out += response.ByteSize()
            return response
        except ChainruleError as error:
            code = error.status
            _abort(context, call, error)
        except Exception:
            code = "INTERNAL"
            log.exception("%s failed", method.__name__, extra={"request_id": call.request_id})
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed unexpectedly; see the server log")
        finally:
            self.end(call, code)

    return handler  # type: ignore[return-value]


def streaming(method: Handler) -> Handler:
    """As `unary`, for methods that stream responses; a client that went away needs no answer."""
    return _streaming(method, watcher=False)


def watching(method: Handler) -> Handler:
    """As `streaming`, for a stream admitted as a watcher (--max-watchers) rather than as a call."""
    return _streaming(method, watcher=True)


def _streaming(method: Handler, watcher: bool) -> Handler:
    @functools.wraps(method)
    def handler(self: Servicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        call = self.begin(method.__name__, context, request)
        code = "OK"
        try:
            self.authorize(call)
            if watcher:
                self.admit_watcher(call)
            else:
                self.admit(call)
            requests = (
                (self.checked(item) for item in request) if isinstance(request, Iterator) else self.checked(request)
            )
            for response in method(self, requests, context, call):
                call.bytes_out += len(response) if isinstance(response, bytes) else response.ByteSize()
                yield response
        except ChainruleError as error:
            code = error.status
            _abort(context, call, error)
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


def check_names(message: Message, max_length: int, prefix: str = "") -> None:
    """Hold every string in `message` (names, ids, page tokens, map keys; graphs and tensors aside)
    to `max_length` characters and printable text; errors name the field, e.g. `fetches[2]`."""
    for descriptor, value in message.ListFields():
        path = prefix + descriptor.name
        if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            entry = descriptor.message_type
            if entry.GetOptions().map_entry:  # the request maps are name -> tensor
                if entry.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING:
                    for key in value:
                        check_name(key, path, max_length)
            elif entry.full_name in UNCHECKED_MESSAGES:
                continue
            elif descriptor.is_repeated:
                for index, item in enumerate(value):
                    check_names(item, max_length, f"{path}[{index}].")
            else:
                check_names(value, max_length, f"{path}.")
        elif descriptor.type == FieldDescriptor.TYPE_STRING:
            is_id = descriptor.name.endswith("_id") or descriptor.name == "page_token"
            limit = max(max_length, ID_FIELDS_MIN_LENGTH) if is_id else max_length
            if descriptor.is_repeated:
                for index, item in enumerate(value):
                    check_name(item, f"{path}[{index}]", limit)
            else:
                check_name(value, path, limit)


def _serialize(response: Message | bytes) -> bytes:
    """Responses are messages, or bytes a method serialized itself."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_to_server(
    service: Servicer,
    descriptor: ServiceDescriptor,
    server: grpc.Server,
    thread_pools: Mapping[str, futures.ThreadPoolExecutor] | None = None,
) -> None:
    """Register like the generated add_*Servicer_to_server, with lenient request parsing; the methods
    `thread_pools` names run on that pool instead of the server's."""
    messages = message_factory.GetMessageClassesForFiles([descriptor.file.name], descriptor.file.pool)
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: factories[method.client_streaming, method.server_streaming](
            _on_pool(getattr(service, method.name), (thread_pools or {}).get(method.name)),
            request_deserializer=_lenient_parser(messages[method.input_type.full_name]),
            response_serializer=_serialize,
        )
        for method in descriptor.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


def _on_pool(behavior: Callable[..., Any], pool: futures.ThreadPoolExecutor | None) -> Callable[..., Any]:
    """`behavior`, marked to run on `pool` (gRPC's per-method thread pool) when one is given."""
    if pool is None:
        return behavior
    marked = functools.partial(behavior)
    marked.experimental_thread_pool = pool  # type: ignore[attr-defined]
    return marked


def decode_tensor(tensor: tensor_pb2.Tensor, name: str, max_elements: int | None = None) -> np.ndarray:
    try:
        return tensors.decode(tensor, name, max_elements)
    except tensors.TensorTooLarge as error:
        raise ResourceExhausted(str(error), reason="TENSOR_TOO_LARGE", subject=name) from None
    except tensors.TensorError as error:
        raise InvalidArgument(str(error), reason="BAD_TENSOR", subject=name) from None
