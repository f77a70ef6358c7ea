"""The gRPC servicer: decodes requests, calls the engine, encodes answers, maps errors to status codes.

Every RPC's behaviour is here, one method each; the math is in the engine.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from chainrule import tensors
from chainrule.server import optim
from chainrule.server.engine import Engine, GraphSummary
from chainrule.server.errors import ChainruleError, InvalidArgument
from chainrule.server.plan import StopFlag
from chainrule.v1 import graph_pb2, graph_service_pb2_grpc, tensor_pb2
from chainrule.v1 import graph_service_pb2 as pb

log = logging.getLogger("chainrule.server")
Handler = TypeVar("Handler", bound=Callable[..., Any])


ERROR_DOMAIN = "chainrule"


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
        try:
            return method(self, request, context)
        except ChainruleError as error:
            _abort(context, error)
        except Exception:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed unexpectedly; see the server log")

    return handler  # type: ignore[return-value]


def streaming(method: Handler) -> Handler:
    """As `unary`, for methods that stream responses; a client that went away needs no answer."""

    @functools.wraps(method)
    def handler(self: GraphService, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except ChainruleError as error:
            _abort(context, error)
        except Exception:
            if not context.is_active():
                log.info("%s ended: the client cancelled or disconnected", method.__name__)
                return
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed unexpectedly; see the server log")

    return handler  # type: ignore[return-value]


def decode_tensor(tensor: tensor_pb2.Tensor, name: str) -> np.ndarray:
    try:
        return tensors.decode(tensor, name)
    except tensors.TensorError as error:
        raise InvalidArgument(str(error), reason="BAD_TENSOR", subject=name) from None


def decode_feeds(feeds: Mapping[str, tensor_pb2.Tensor]) -> dict[str, np.ndarray]:
    return {name: decode_tensor(tensor, name) for name, tensor in feeds.items()}


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


def stop_flag(context: grpc.ServicerContext) -> StopFlag:
    """A flag the engine polls between steps, raised when the client cancels or the deadline passes."""
    flag = StopFlag()

    def stop() -> None:
        flag.stopped = True

    context.add_callback(stop)
    return flag


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
    for field, values in (("gradients", gradients), ("updates", updates)):
        for name, value in values.items():
            for chunk in tensors.split(tensors.encode(value, name)):
                if len(chunk.data) > room and room < tensors.CHUNK_BYTES:
                    response.more_in_step = True
                    yield response
                    response = pb.TrainResponse(step=step, loss=loss)
                    room = tensors.CHUNK_BYTES
                getattr(response, field).add(name=name, tensor=chunk)
                room -= len(chunk.data)
    yield response


class GraphService(graph_service_pb2_grpc.GraphServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @unary
    def CreateGraph(self, request: pb.CreateGraphRequest, context: grpc.ServicerContext) -> pb.CreateGraphResponse:
        summary = self.engine.create_graph(request.graph)
        log.info("created graph %s '%s' with %d nodes", summary.graph_id, summary.name, summary.node_count)
        return pb.CreateGraphResponse(graph=graph_info(summary))

    @unary
    def GetGraph(self, request: pb.GetGraphRequest, context: grpc.ServicerContext) -> pb.GetGraphResponse:
        response = pb.GetGraphResponse(graph=graph_info(self.engine.get_graph(request.graph_id)))
        if request.include_definition:
            response.definition.ParseFromString(self.engine.definition(request.graph_id))
        return response

    @unary
    def ListGraphs(self, request: pb.ListGraphsRequest, context: grpc.ServicerContext) -> pb.ListGraphsResponse:
        summaries, next_token = self.engine.list_graphs(request.page_size, request.page_token)
        return pb.ListGraphsResponse(graphs=[graph_info(s) for s in summaries], next_page_token=next_token)

    @unary
    def DeleteGraph(self, request: pb.DeleteGraphRequest, context: grpc.ServicerContext) -> pb.DeleteGraphResponse:
        self.engine.delete_graph(request.graph_id)
        log.info("deleted graph %s", request.graph_id)
        return pb.DeleteGraphResponse()

    @unary
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        feeds = decode_feeds(request.feeds)
        values = self.engine.forward(request.graph_id, feeds, list(request.fetches), stop=stop_flag(context))
        return pb.ForwardResponse(
            outputs=[
                tensor_pb2.NamedTensor(name=name, tensor=tensors.encode(value, name))
                for name, value in zip(request.fetches, values, strict=True)
            ]
        )

    @streaming
    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> Iterator[pb.BackwardResponse]:
        feeds = decode_feeds(request.feeds)
        loss_grad = decode_tensor(request.loss_grad, "loss_grad") if request.HasField("loss_grad") else None
        loss, gradients = self.engine.backward(
            request.graph_id, feeds, request.loss, list(request.wrt), loss_grad, stop=stop_flag(context)
        )
        *leading_loss_chunks, last_loss_chunk = tensors.split(tensors.encode(loss, request.loss))
        for chunk in leading_loss_chunks:
            yield pb.BackwardResponse(loss=chunk)
        first = True
        for name, gradient in gradients:
            for chunk in tensors.split(tensors.encode(gradient, name)):
                response = pb.BackwardResponse(name=name, gradient=chunk)
                if first:
                    response.loss.CopyFrom(last_loss_chunk)
                    first = False
                yield response

    @streaming
    def Train(self, requests: Iterator[pb.TrainRequest], context: grpc.ServicerContext) -> Iterator[pb.TrainResponse]:
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
        )
        stop = stop_flag(context)
        try:
            for index, request in enumerate(requests):
                if request.WhichOneof("item") != "batch":
                    raise InvalidArgument(
                        f"batch {index}: a TrainConfig may only be the first message of the stream",
                        reason="CONFIG_FIRST",
                        subject=f"batch {index}",
                    )
                try:
                    result = session.step(decode_feeds(request.batch.feeds), stop)
                except InvalidArgument as error:
                    raise InvalidArgument(
                        f"batch {index}: {error.message}", reason=error.reason, subject=error.subject
                    ) from None
                yield from train_responses(
                    result.step,
                    result.loss,
                    result.gradients if config.stream_gradients else {},
                    result.updates if config.stream_updates else {},
                )
        finally:
            session.finish()

    @unary
    def GetParameters(
        self, request: pb.GetParametersRequest, context: grpc.ServicerContext
    ) -> pb.GetParametersResponse:
        parameters, step = self.engine.get_parameters(request.graph_id, list(request.names))
        return pb.GetParametersResponse(parameters=tensors.encode_named(parameters), step=step)

    @unary
    def SetParameters(
        self, request: pb.SetParametersRequest, context: grpc.ServicerContext
    ) -> pb.SetParametersResponse:
        values: dict[str, np.ndarray] = {}
        for named in request.parameters:
            if named.name in values:
                raise InvalidArgument(
                    f"parameter '{named.name}' is given twice", reason="DUPLICATE_PARAMETER", subject=named.name
                )
            values[named.name] = decode_tensor(named.tensor, named.name)
        return pb.SetParametersResponse(step=self.engine.set_parameters(request.graph_id, values))
