"""The gRPC servicer: decodes requests, calls the engine, encodes answers, maps errors to status codes.

Every RPC's behaviour is here, one method each; the math is in the engine. Each method gets a
`Call`: the caller's tenant, a stop flag raised on cancellation, and a request id that tags
the call's log lines and is echoed to the client as `x-request-id` metadata.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from chainrule import tensors
from chainrule.server import optim
from chainrule.server.auth import TokenFile
from chainrule.server.engine import Engine, GraphSummary, TrainingSession
from chainrule.server.errors import ChainruleError, InvalidArgument, ResourceExhausted, Unauthenticated, Unavailable
from chainrule.server.metrics import Metrics
from chainrule.server.pipeline import run_ahead
from chainrule.server.plan import StopFlag
from chainrule.v1 import graph_pb2, graph_service_pb2_grpc, tensor_pb2
from chainrule.v1 import graph_service_pb2 as pb

log = logging.getLogger("chainrule.server")
Handler = TypeVar("Handler", bound=Callable[..., Any])
ERROR_DOMAIN = "chainrule"
REQUEST_ID_KEY = "x-request-id"
GRADIENT_FIELD = pb.BackwardResponse.DESCRIPTOR.fields_by_name["gradient"].number
TRAIN_RESPONSES_AHEAD = 2
"""Responses of a Train stream that may wait, computed, for gRPC to send them."""


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
    def handler(self: GraphService, request: Any, context: grpc.ServicerContext) -> Any:
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
    def handler(self: GraphService, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
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


def add_to_server(service: GraphService, server: grpc.Server) -> None:
    """Register like the generated add_GraphServiceServicer_to_server, with lenient request parsing."""
    descriptor = pb.DESCRIPTOR.services_by_name["GraphService"]
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: factories[method.client_streaming, method.server_streaming](
            getattr(service, method.name),
            request_deserializer=_lenient_parser(getattr(pb, method.input_type.name)),
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


def graph_info(summary: GraphSummary) -> graph_pb2.GraphInfo:
    created = Timestamp()
    created.FromNanoseconds(int(summary.created_at * 1e9))
    return graph_pb2.GraphInfo(
        graph_id=summary.graph_id,
        name=summary.name,
        topological_order=summary.topological_order,
        inputs=summary.inputs,
        parameters=summary.parameters,
        step=summary.step,
        node_count=summary.node_count,
        create_time=created,
    )


def optimizer_from_proto(message: pb.Optimizer) -> optim.Optimizer:
    kind = message.WhichOneof("kind")
    if kind == "sgd":
        sgd = message.sgd
        return optim.Sgd(sgd.learning_rate, sgd.momentum, sgd.nesterov, sgd.weight_decay)
    if kind == "adam":
        adam = message.adam
        return optim.Adam(
            adam.learning_rate,
            adam.beta1 or 0.9,
            adam.beta2 or 0.999,
            adam.epsilon or 1e-8,
            adam.weight_decay,
        )
    raise InvalidArgument("config.optimizer is unset; choose sgd or adam", reason="BAD_OPTIMIZER", subject="optimizer")


def train_responses(
    step: int, loss: float, gradients: Mapping[str, np.ndarray], updates: Mapping[str, np.ndarray]
) -> Iterator[pb.TrainResponse]:
    """One step's response, split into several with the same step when its tensors exceed a chunk."""
    response = pb.TrainResponse(step=step, loss=loss)
    room = tensors.CHUNK_BYTES
    for field_name, values in (("gradients", gradients), ("updates", updates)):
        for name, value in values.items():
            for chunk in tensors.chunks(value, name):
                if len(chunk.data) > room and room < tensors.CHUNK_BYTES:
                    response.more_in_step = True
                    yield response
                    response = pb.TrainResponse(step=step, loss=loss)
                    room = tensors.CHUNK_BYTES
                chunk.write_to(getattr(response, field_name).add(name=name).tensor)
                room -= len(chunk.data)
    yield response


class GraphService(graph_service_pb2_grpc.GraphServiceServicer):
    def __init__(
        self,
        engine: Engine,
        tokens: TokenFile | None = None,
        metrics: Metrics | None = None,
        max_calls: int | None = None,
    ) -> None:
        self.engine = engine
        self.tokens = tokens
        self.metrics = metrics or Metrics()
        self.max_calls = max_calls
        """Calls and streams of this service served at once; health checks are not counted."""
        self._call_slots = None if max_calls is None else threading.Semaphore(max_calls)
        self.draining = False
        """Set on graceful shutdown: Train streams stop after their current step."""

    # ------------------------------------------------------------ per-call bookkeeping
    def begin(self, method: str, context: grpc.ServicerContext, request: Any) -> Call:
        metadata = context.invocation_metadata()
        request_id = next((str(v) for k, v in metadata if k == REQUEST_ID_KEY), "") or uuid.uuid4().hex[:16]
        context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        stop = StopFlag()

        def on_done() -> None:
            stop.stopped = True

        context.add_callback(on_done)
        tenant = "" if self.tokens is None else self.tokens.tenant(metadata)
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
        if self._call_slots is None:
            return
        if not self._call_slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"the server is already serving {self.max_calls} calls and streams, its limit "
                "(--max-concurrent-rpcs); retry later",
                reason="TOO_MANY_CALLS",
            )
        call.admitted = True

    def end(self, call: Call, code: str) -> None:
        if call.admitted:
            assert self._call_slots is not None
            self._call_slots.release()
            call.admitted = False
        elapsed = time.perf_counter() - call.started
        self.metrics.rpcs.labels(call.method, code).inc()
        self.metrics.latency.labels(call.method).observe(elapsed)
        self.metrics.bytes_in.labels(call.method).inc(call.bytes_in)
        self.metrics.bytes_out.labels(call.method).inc(call.bytes_out)
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

    def decode_feeds(self, feeds: Mapping[str, tensor_pb2.Tensor]) -> dict[str, np.ndarray]:
        limit = self.engine.limits.max_tensor_elements
        return {name: decode_tensor(tensor, name, limit) for name, tensor in feeds.items()}

    # ------------------------------------------------------------ graphs
    @unary
    def CreateGraph(
        self, request: pb.CreateGraphRequest, context: grpc.ServicerContext, call: Call
    ) -> pb.CreateGraphResponse:
        summary = self.engine.create_graph(request.graph, call.tenant)
        self.metrics.graphs.inc()
        return pb.CreateGraphResponse(graph=graph_info(summary))

    @unary
    def GetGraph(self, request: pb.GetGraphRequest, context: grpc.ServicerContext, call: Call) -> pb.GetGraphResponse:
        response = pb.GetGraphResponse(graph=graph_info(self.engine.get_graph(request.graph_id, call.tenant)))
        if request.include_definition:
            response.definition.ParseFromString(self.engine.definition(request.graph_id, call.tenant))
        return response

    @unary
    def ListGraphs(
        self, request: pb.ListGraphsRequest, context: grpc.ServicerContext, call: Call
    ) -> pb.ListGraphsResponse:
        summaries, next_token = self.engine.list_graphs(request.page_size, request.page_token, call.tenant)
        return pb.ListGraphsResponse(graphs=[graph_info(s) for s in summaries], next_page_token=next_token)

    @unary
    def DeleteGraph(
        self, request: pb.DeleteGraphRequest, context: grpc.ServicerContext, call: Call
    ) -> pb.DeleteGraphResponse:
        self.engine.delete_graph(request.graph_id, call.tenant)
        self.metrics.graphs.dec()
        return pb.DeleteGraphResponse()

    # ------------------------------------------------------------ evaluation
    @unary
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext, call: Call) -> pb.ForwardResponse:
        feeds = self.decode_feeds(request.feeds)
        fetches = list(request.fetches)
        values = self.engine.forward(request.graph_id, feeds, fetches, call.tenant, call.stop)
        return pb.ForwardResponse(outputs=tensors.encode_named(zip(fetches, values, strict=True)))

    @streaming
    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext, call: Call) -> Iterator[bytes]:
        """Gradient messages go out already serialized (see Chunk.serialized_into): for a large
        gradient that saves two full copies of it."""
        feeds = self.decode_feeds(request.feeds)
        loss_grad = decode_tensor(request.loss_grad, "loss_grad") if request.HasField("loss_grad") else None
        loss, gradients = self.engine.backward(
            request.graph_id, feeds, request.loss, list(request.wrt), loss_grad, call.tenant, call.stop
        )
        *leading_loss_chunks, last_loss_chunk = tensors.chunks(loss, request.loss)
        for chunk in leading_loss_chunks:
            response = pb.BackwardResponse()
            chunk.write_to(response.loss)
            yield response
        first = True
        for name, gradient in gradients:
            for chunk in tensors.chunks(gradient, name):
                head = pb.BackwardResponse(name=name)
                if first:
                    last_loss_chunk.write_to(head.loss)
                    first = False
                yield chunk.serialized_into(GRADIENT_FIELD, head.SerializeToString())

    # ------------------------------------------------------------ training
    @streaming
    def Train(
        self, requests: Iterator[pb.TrainRequest], context: grpc.ServicerContext, call: Call
    ) -> Iterator[pb.TrainResponse]:
        first = next(requests, None)
        if first is None or first.WhichOneof("item") != "config":
            raise InvalidArgument(
                "the first TrainRequest must carry a config; got " + ("nothing" if first is None else "a batch"),
                reason="CONFIG_FIRST",
                subject="config",
            )
        config = first.config
        session = self.engine.start_training(
            config.graph_id,
            config.loss,
            optimizer_from_proto(config.optimizer),
            list(config.parameters),
            config.checkpoint_every,
            config.stop_on_non_finite_loss,
            call.tenant,
            keep_updates=config.stream_updates,
        )
        try:
            steps = self._train_steps(session, config, requests, call)
            yield from run_ahead(steps, TRAIN_RESPONSES_AHEAD, call.stop, f"train-{call.request_id}")
        finally:
            session.finish()

    def _train_steps(
        self, session: TrainingSession, config: pb.TrainConfig, requests: Iterator[pb.TrainRequest], call: Call
    ) -> Generator[pb.TrainResponse, None, None]:
        """One step per batch, on a thread of its own (see pipeline); the caller finishes the session."""
        for index, request in enumerate(requests):
            if request.WhichOneof("item") != "batch":
                raise InvalidArgument(
                    f"batch {index}: a TrainConfig may only be the first message of the stream",
                    reason="CONFIG_FIRST",
                    subject=f"batch {index}",
                )
            call.bytes_in += request.ByteSize()
            try:
                result = session.step(self.decode_feeds(request.batch.feeds), call.stop)
            except InvalidArgument as error:
                raise InvalidArgument(
                    f"batch {index}: {error.message}", reason=error.reason, subject=error.subject
                ) from None
            self.metrics.training_steps.inc()
            yield from train_responses(
                result.step,
                result.loss,
                result.gradients if config.stream_gradients else {},
                result.updates if config.stream_updates else {},
            )
            if self.draining:
                session.finish()
                raise Unavailable(
                    f"the server is shutting down; this stream's steps up to {result.step} are committed",
                    reason="SHUTTING_DOWN",
                )

    @unary
    def GetParameters(
        self, request: pb.GetParametersRequest, context: grpc.ServicerContext, call: Call
    ) -> pb.GetParametersResponse:
        parameters, step = self.engine.get_parameters(request.graph_id, list(request.names), call.tenant)
        return pb.GetParametersResponse(parameters=tensors.encode_named(parameters), step=step)

    @unary
    def SetParameters(
        self, request: pb.SetParametersRequest, context: grpc.ServicerContext, call: Call
    ) -> pb.SetParametersResponse:
        values: dict[str, np.ndarray] = {}
        for named in request.parameters:
            if named.name in values:
                raise InvalidArgument(
                    f"parameter '{named.name}' is given twice", reason="DUPLICATE_PARAMETER", subject=named.name
                )
            values[named.name] = decode_tensor(named.tensor, named.name, self.engine.limits.max_tensor_elements)
        return pb.SetParametersResponse(step=self.engine.set_parameters(request.graph_id, values, call.tenant))
