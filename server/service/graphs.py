"""The GraphService servicer: decodes requests, calls the engine, encodes answers.

Every RPC's behaviour is here, one method each; the math is in the engine, the per-call
plumbing (auth, admission, logging, error statuses) in `calls`.

Compiling a graph (CreateGraph, or the first call of a graph not in memory) happens before a call
takes its compute slot: the slots bound the calls running graphs, and a big graph compiling for
seconds must not keep small calls on other graphs waiting for one.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from chainrule import tensors
from chainrule.server import onnx as onnx_models
from chainrule.server.engine import Engine, GraphSummary, TrainingSession
from chainrule.server.errors import DeadlineExceeded, InvalidArgument, NonScalarLoss, ResourceExhausted, Unavailable
from chainrule.server.ops import STORED_SOURCES
from chainrule.server.pipeline import StreamIdle, idle_limited, run_ahead
from chainrule.server.service.calls import Call, CallGate, Servicer, decode_tensor, streaming, unary
from chainrule.server.specs import Schedule, optimizer_from_proto, schedule_from_proto
from chainrule.v1 import graph_pb2, graph_service_pb2_grpc, tensor_pb2
from chainrule.v1 import graph_service_pb2 as pb

GRADIENT_FIELD = pb.BackwardResponse.DESCRIPTOR.fields_by_name["gradient"].number
TRAIN_RESPONSES_AHEAD = 2
"""Responses of a Train stream that may wait, computed, for gRPC to send them."""


def graph_view(view: graph_pb2.GraphView.ValueType, default: graph_pb2.GraphView.ValueType) -> bool:
    """Whether the request asks for GRAPH_VIEW_FULL, its method's `default` standing in for UNSPECIFIED."""
    if view not in graph_pb2.GraphView.values():
        raise InvalidArgument(
            f"view is {view}, which this server does not know; use GRAPH_VIEW_BASIC (1) or GRAPH_VIEW_FULL (2)",
            reason="BAD_VIEW",
            subject="view",
        )
    return (view or default) == graph_pb2.GRAPH_VIEW_FULL


def graph_info(summary: GraphSummary, full: bool) -> graph_pb2.GraphInfo:
    """The GraphInfo of GRAPH_VIEW_FULL, or of GRAPH_VIEW_BASIC without what grows with the node count."""
    created = Timestamp()
    created.FromNanoseconds(int(summary.created_at * 1e9))
    return graph_pb2.GraphInfo(
        graph_id=summary.graph_id,
        name=summary.name,
        topological_order=summary.topological_order if full else (),
        inputs=summary.inputs,
        parameters=summary.parameters,
        state=summary.state,
        step=summary.step,
        node_count=summary.node_count,
        create_time=created,
    )


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


class GraphService(Servicer, graph_service_pb2_grpc.GraphServiceServicer):
    """Graphs: create, read, evaluate, differentiate, train."""

    def __init__(self, engine: Engine, calls: CallGate, max_model_bytes: int | None = None) -> None:
        super().__init__(calls)
        self.engine = engine
        self.max_model_bytes = max_model_bytes
        """--max-message-mb: the largest ONNX model ImportOnnx takes (gRPC's own limit is set a little above)."""
        self.draining = False
        """Set on graceful shutdown: Train streams stop after their current step."""

    def decode_feeds(self, feeds: Mapping[str, tensor_pb2.Tensor]) -> dict[str, np.ndarray]:
        limit = self.engine.limits.max_tensor_elements
        return {name: decode_tensor(tensor, name, limit) for name, tensor in feeds.items()}

    # ------------------------------------------------------------ graphs
    @unary
    def CreateGraph(
        self, request: pb.CreateGraphRequest, context: grpc.ServicerContext, call: Call
    ) -> pb.CreateGraphResponse:
        full = graph_view(request.view, graph_pb2.GRAPH_VIEW_BASIC)
        summary = self.engine.create_graph(request.graph, call.tenant, request.request_id, call.stop)
        if not summary.retried:
            self.calls.metrics.graphs.inc()
        return pb.CreateGraphResponse(graph=graph_info(summary, full))

    @unary
    def GetGraph(self, request: pb.GetGraphRequest, context: grpc.ServicerContext, call: Call) -> pb.GetGraphResponse:
        full = graph_view(request.view, graph_pb2.GRAPH_VIEW_FULL)
        summary = self.engine.get_graph(request.graph_id, call.tenant, with_order=full)
        response = pb.GetGraphResponse(graph=graph_info(summary, full))
        if request.include_definition:
            response.definition.ParseFromString(self.engine.definition(request.graph_id, call.tenant))
            if request.omit_parameter_values:
                for node in response.definition.nodes:
                    if node.op in STORED_SOURCES:
                        node.ClearField("value")
        return response

    @unary
    def ListGraphs(
        self, request: pb.ListGraphsRequest, context: grpc.ServicerContext, call: Call
    ) -> pb.ListGraphsResponse:
        full = graph_view(request.view, graph_pb2.GRAPH_VIEW_BASIC)
        summaries, next_token = self.engine.list_graphs(
            request.page_size, request.page_token, call.tenant, with_order=full
        )
        return pb.ListGraphsResponse(graphs=[graph_info(s, full) for s in summaries], next_page_token=next_token)

    @unary
    def DeleteGraph(
        self, request: pb.DeleteGraphRequest, context: grpc.ServicerContext, call: Call
    ) -> pb.DeleteGraphResponse:
        self.engine.delete_graph(request.graph_id, call.tenant)
        self.calls.metrics.graphs.dec()
        return pb.DeleteGraphResponse()

    # ------------------------------------------------------------ evaluation
    @unary
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext, call: Call) -> pb.ForwardResponse:
        feeds = self.decode_feeds(request.feeds)
        fetches = list(request.fetches)
        self.engine.compile(request.graph_id, call.tenant, call.stop)
        with self.computing(call):
            values = self.engine.forward(
                request.graph_id, feeds, fetches, call.tenant, call.stop, training=request.training, seed=request.seed
            )
        return pb.ForwardResponse(outputs=tensors.encode_named(zip(fetches, values, strict=True)))

    @streaming
    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext, call: Call) -> Iterator[bytes]:
        """Gradient messages go out already serialized (see Chunk.serialized_into): for a large
        gradient that saves two full copies of it."""
        feeds = self.decode_feeds(request.feeds)
        loss_grad = decode_tensor(request.loss_grad, "loss_grad") if request.HasField("loss_grad") else None
        self.engine.compile(request.graph_id, call.tenant, call.stop)
        with self.computing(call):
            loss, gradients = self.engine.backward(
                request.graph_id,
                feeds,
                request.loss,
                list(request.wrt),
                loss_grad,
                call.tenant,
                call.stop,
                training=request.training,
                seed=request.seed,
            )
        *leading_loss_chunks, last_loss_chunk = tensors.chunks(loss, request.loss)
        for chunk in leading_loss_chunks:
            response = pb.BackwardResponse()
            chunk.write_to(response.loss)
            yield response
        first = True
        for name, gradient in self.computed(gradients, call):
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
        idle_seconds = self.calls.stream_idle_seconds
        requests = idle_limited(requests, idle_seconds, f"train-requests-{call.request_id}")
        try:
            first = next(requests, None)
        except StreamIdle:
            raise DeadlineExceeded(
                f"the stream sent nothing for {idle_seconds:g} s (--stream-idle-seconds); no step was taken",
                reason="STREAM_IDLE",
            ) from None
        if first is None or first.WhichOneof("item") != "config":
            raise InvalidArgument(
                "the first TrainRequest must carry a config; got " + ("nothing" if first is None else "a batch"),
                reason="CONFIG_FIRST",
                subject="config",
            )
        config = first.config
        optimizer = optimizer_from_proto(config.optimizer)
        schedule = schedule_from_proto(config.schedule, optimizer)
        session = self.engine.start_training(
            config.graph_id,
            config.loss,
            optimizer,
            list(config.parameters),
            config.checkpoint_every,
            config.stop_on_non_finite_loss,
            call.tenant,
            keep_updates=config.stream_updates,
            seed=config.seed,
        )
        try:
            steps = self._train_steps(session, config, schedule, requests, call)
            yield from run_ahead(steps, TRAIN_RESPONSES_AHEAD, call.stop, f"train-{call.request_id}")
        except StreamIdle:
            session.finish()
            raise DeadlineExceeded(
                f"the stream sent no batch for {idle_seconds:g} s (--stream-idle-seconds); its steps are "
                f"committed, the graph is at step {session.live.committed_step}",
                reason="STREAM_IDLE",
            ) from None
        finally:
            session.finish()

    def _train_steps(
        self,
        session: TrainingSession,
        config: pb.TrainConfig,
        schedule: Schedule | None,
        requests: Iterator[pb.TrainRequest],
        call: Call,
    ) -> Generator[pb.TrainResponse, None, None]:
        """One step per batch, on a thread of its own (see pipeline); the caller finishes the session.
        The schedule counts steps from the stream's first batch."""
        for index, request in enumerate(requests):
            if request.WhichOneof("item") != "batch":
                raise InvalidArgument(
                    f"batch {index}: a TrainConfig may only be the first message of the stream",
                    reason="CONFIG_FIRST",
                    subject=f"batch {index}",
                )
            call.bytes_in += request.ByteSize()
            try:
                with self.computing(call):
                    rate = None if schedule is None else schedule.rate(index)
                    result = session.step(self.decode_feeds(request.batch.feeds), call.stop, learning_rate=rate)
            except NonScalarLoss as error:
                raise InvalidArgument(
                    f"batch {index}: loss '{error.loss}' has shape {error.shape}; Train needs a scalar loss: "
                    "reduce it in the graph with sum or mean",
                    reason=error.reason,
                    subject=error.subject,
                ) from None
            except InvalidArgument as error:
                raise InvalidArgument(
                    f"batch {index}: {error.message}", reason=error.reason, subject=error.subject
                ) from None
            self.calls.metrics.training_steps.inc()
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

    @streaming
    def StreamParameters(
        self, request: pb.StreamParametersRequest, context: grpc.ServicerContext, call: Call
    ) -> Iterator[pb.StreamParametersResponse]:
        """One step's parameters, small ones packed up to a chunk's worth per message, large ones in chunks."""
        parameters, step = self.engine.get_parameters(request.graph_id, list(request.names), call.tenant)
        response = pb.StreamParametersResponse(step=step)
        room = tensors.CHUNK_BYTES
        for name, value in parameters.items():
            for chunk in tensors.chunks(value, name):
                if len(chunk.data) > room and room < tensors.CHUNK_BYTES:
                    yield response
                    response = pb.StreamParametersResponse(step=step)
                    room = tensors.CHUNK_BYTES
                chunk.write_to(response.parameters.add(name=name).tensor)
                room -= len(chunk.data)
        yield response

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

    # ------------------------------------------------------------ ONNX
    @unary
    def ImportOnnx(
        self, request: pb.ImportOnnxRequest, context: grpc.ServicerContext, call: Call
    ) -> pb.ImportOnnxResponse:
        size = len(request.model)
        if self.max_model_bytes is not None and size > self.max_model_bytes:
            raise ResourceExhausted(
                f"the model is {size:,} bytes, more than the {self.max_model_bytes:,} bytes this server accepts "
                "(chainrule serve --max-message-mb)",
                reason="MODEL_TOO_LARGE",
                subject="model",
            )
        with self.computing(call):
            imported = onnx_models.import_model(request.model, request.name, list(request.frozen), self.engine.limits)
        summary = self.engine.create_graph(imported.graph, call.tenant, stop=call.stop)
        self.calls.metrics.graphs.inc()
        return pb.ImportOnnxResponse(graph=graph_info(summary, False), outputs=imported.outputs)

    @streaming
    def ExportOnnx(
        self, request: pb.ExportOnnxRequest, context: grpc.ServicerContext, call: Call
    ) -> Iterator[pb.ExportOnnxResponse]:
        """The graph's definition with the parameters and state of one step, in chunks of at most 1 MiB."""
        definition = graph_pb2.Graph.FromString(self.engine.definition(request.graph_id, call.tenant))
        values, _ = self.engine.get_parameters(request.graph_id, [], call.tenant)
        with self.computing(call):
            model = onnx_models.export_model(definition, values, list(request.outputs), self.engine.limits)
        for start in range(0, len(model), tensors.CHUNK_BYTES):
            yield pb.ExportOnnxResponse(chunk=model[start : start + tensors.CHUNK_BYTES])
