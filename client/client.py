"""`Client`: the GraphService calls with numpy arrays in and out and ChainruleError for failures."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, Unpack

import numpy as np
import numpy.typing as npt
from tqdm import tqdm  # type: ignore[import-untyped]

from chainrule import tensors
from chainrule.v1 import dataset_service_pb2, dataset_service_pb2_grpc, graph_pb2, graph_service_pb2_grpc
from chainrule.v1 import graph_service_pb2 as pb

from .builder import GraphBuilder
from .channel import DEFAULT_MAX_MESSAGE_MB, open_channel
from .datasets import UPLOAD_METHOD, DatasetInfo, upload_arrays, upload_requests
from .errors import rpc_errors
from .jobs import (
    Evaluation,
    Job,
    JobInfo,
    JobState,
    Schedule,
    create_job,
    job_spec,
    job_stub,
    list_jobs,
    list_jobs_page,
)
from .onnx import ImportedModel, OnnxModel, model_bytes, size_refusals, write_model
from .render import computable_nodes, gradient_nodes, render_svg, to_dot
from .streams import GradientStream, ParameterStream, TrainStream, decode_named, encode_feeds
from .training import Batch, History, Optimizer, TrainOptions, plan_batches

GraphView = Literal["basic", "full"]
"""How much of a GraphInfo a call answers with (chainrule.v1.GraphView): "basic" leaves out
`topological_order`, which grows with the graph; "full" has every field."""
_VIEWS: dict[str, graph_pb2.GraphView.ValueType] = {
    "basic": graph_pb2.GRAPH_VIEW_BASIC,
    "full": graph_pb2.GRAPH_VIEW_FULL,
}


@dataclass(frozen=True)
class GraphInfo:
    """What the server knows about a stored graph (chainrule.v1.GraphInfo).

    `topological_order` is empty in the "basic" view, which `create_graph` and `list_graphs`
    answer with by default; `get_graph` fills it.
    """

    graph_id: str
    name: str
    topological_order: tuple[str, ...]
    inputs: tuple[str, ...]
    parameters: tuple[str, ...]
    step: int
    node_count: int
    create_time: datetime | None
    state: tuple[str, ...] = ()
    """The graph's `state` nodes (running statistics): read and set with the parameters, updated by training."""
    definition: graph_pb2.Graph | None = None
    """The graph as submitted; only `get_graph(..., include_definition=True)` fetches it."""

    @classmethod
    def from_proto(cls, message: graph_pb2.GraphInfo, definition: graph_pb2.Graph | None = None) -> GraphInfo:
        return cls(
            graph_id=message.graph_id,
            name=message.name,
            topological_order=tuple(message.topological_order),
            inputs=tuple(message.inputs),
            parameters=tuple(message.parameters),
            step=message.step,
            node_count=message.node_count,
            create_time=message.create_time.ToDatetime(UTC) if message.HasField("create_time") else None,
            state=tuple(message.state),
            definition=definition,
        )


class Client:
    """A connection to a chainrule server. Every failed call raises `ChainruleError`.

    `timeout` (seconds) is the deadline of each call except `train`, whose stream lasts as long
    as its batches do (stop one with `TrainStream.cancel()`), and `upload_dataset`, which lasts as
    long as its bytes take. The channel receives messages of
    up to `max_message_mb` MiB (the server's default --max-message-mb, instead of gRPC's 4 MiB),
    so a Forward of large tensors or a graph's definition arrives whole; parameters and
    gradients stream in chunks whatever the limit. The client does not learn the server's own
    limit: for a server started with a larger --max-message-mb, pass the same value here, or
    answers above 512 MiB fail with RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: float | None = None,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
    ) -> None:
        """`token` is sent as `authorization: Bearer <token>` (servers started with --auth-tokens);
        any tls_* file makes the channel TLS: `tls_ca` verifies the server, `tls_cert` and `tls_key`
        identify this client to servers that require client certificates. `channel_options` are
        gRPC channel arguments; a grpc.max_receive_message_length among them overrides
        `max_message_mb`."""
        self.address = address
        self.timeout = timeout
        self._channel = open_channel(
            address,
            token=token,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            options=channel_options,
            max_message_mb=max_message_mb,
        )
        self._stub = graph_service_pb2_grpc.GraphServiceStub(self._channel)
        self._jobs = job_stub(self._channel)
        self._datasets = dataset_service_pb2_grpc.DatasetServiceStub(self._channel)
        self._upload = self._channel.stream_unary(  # its requests come serialized (see upload_requests)
            UPLOAD_METHOD, request_serializer=None, response_deserializer=dataset_service_pb2.Dataset.FromString
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------ graphs
    def create_graph(
        self, graph: GraphBuilder | graph_pb2.Graph, *, request_id: str = "", view: GraphView = "basic"
    ) -> GraphInfo:
        """Store the graph. With a `request_id` (a uuid.uuid4() string, say), calling again with the
        same id and graph within a day answers with the graph stored the first time instead of
        storing a copy, so a call that failed without an answer can be retried safely."""
        message = graph.to_proto() if isinstance(graph, GraphBuilder) else graph
        request = pb.CreateGraphRequest(graph=message, request_id=request_id, view=_view(view))
        with rpc_errors():
            response = self._stub.CreateGraph(request, timeout=self.timeout)
        return GraphInfo.from_proto(response.graph)

    def get_graph(
        self,
        graph_id: str,
        *,
        include_definition: bool = False,
        view: GraphView = "full",
        omit_parameter_values: bool = False,
    ) -> GraphInfo:
        """`include_definition` also fetches the submitted Graph (GraphInfo.definition), e.g. to draw it;
        `omit_parameter_values` leaves the parameters' initial values out of it."""
        request = pb.GetGraphRequest(
            graph_id=graph_id,
            include_definition=include_definition,
            view=_view(view),
            omit_parameter_values=omit_parameter_values,
        )
        with rpc_errors():
            response = self._stub.GetGraph(request, timeout=self.timeout)
        return GraphInfo.from_proto(response.graph, response.definition if include_definition else None)

    def list_graphs(self, page_size: int = 100, *, view: GraphView = "basic") -> list[GraphInfo]:
        """Every stored graph, oldest first; `page_size` only sets how many come per round trip."""
        graphs: list[GraphInfo] = []
        token = ""
        while True:
            page, token = self.list_graphs_page(page_size, token, view=view)
            graphs.extend(page)
            if not token:
                return graphs

    def list_graphs_page(
        self, page_size: int = 100, page_token: str = "", *, view: GraphView = "basic"
    ) -> tuple[list[GraphInfo], str]:
        """One page of the stored graphs, oldest first, and the token of the next page ("" after the last)."""
        request = pb.ListGraphsRequest(page_size=page_size, page_token=page_token, view=_view(view))
        with rpc_errors():
            response = self._stub.ListGraphs(request, timeout=self.timeout)
        return [GraphInfo.from_proto(info) for info in response.graphs], response.next_page_token

    def delete_graph(self, graph_id: str) -> None:
        with rpc_errors():
            self._stub.DeleteGraph(pb.DeleteGraphRequest(graph_id=graph_id), timeout=self.timeout)

    # ------------------------------------------------------------ evaluation
    def forward(
        self,
        graph_id: str,
        feeds: Mapping[str, npt.ArrayLike],
        fetches: Sequence[str],
        *,
        training: bool = False,
        seed: int = 0,
    ) -> dict[str, np.ndarray]:
        """The fetched nodes' values, in fetch order, as read-only arrays.

        Feeds go through np.asarray: numpy arrays keep their dtype, Python floats become float64.
        The graph runs in inference mode (running statistics, no dropout) unless `training`, which
        uses batch statistics and dropout masks drawn from `seed` without changing the graph's state.
        """
        request = pb.ForwardRequest(
            graph_id=graph_id, feeds=encode_feeds(feeds), fetches=_names(fetches), training=training, seed=seed
        )
        with rpc_errors():
            response = self._stub.Forward(request, timeout=self.timeout)
        return decode_named(response.outputs)

    def backward(
        self,
        graph_id: str,
        feeds: Mapping[str, npt.ArrayLike],
        loss: str,
        wrt: Sequence[str] = (),
        loss_grad: npt.ArrayLike | None = None,
        *,
        training: bool = False,
        seed: int = 0,
    ) -> GradientStream:
        """Stream d(loss)/d(node) for each `wrt` node (every parameter when empty) as the server finishes it.

        `loss_grad` seeds a non-scalar loss (a vector-Jacobian product). Iterating the returned
        stream yields (name, gradient) pairs; its `loss` is set once the first one has arrived.
        `training` and `seed` as for `forward`.
        """
        request = pb.BackwardRequest(
            graph_id=graph_id,
            feeds=encode_feeds(feeds),
            loss=loss,
            wrt=_names(wrt),
            loss_grad=None if loss_grad is None else tensors.encode(np.asarray(loss_grad), "loss_grad"),
            training=training,
            seed=seed,
        )
        return GradientStream(self._stub.Backward(request, timeout=self.timeout), loss)

    def gradients(
        self,
        graph_id: str,
        feeds: Mapping[str, npt.ArrayLike],
        loss: str,
        wrt: Sequence[str] = (),
        loss_grad: npt.ArrayLike | None = None,
        *,
        training: bool = False,
        seed: int = 0,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`backward` collected: the loss value and every gradient by name."""
        with self.backward(graph_id, feeds, loss, wrt, loss_grad, training=training, seed=seed) as stream:
            gradients = dict(stream)
        if stream.loss is None:
            # The server sends the loss with the first gradient, so with no wrt nodes there is none.
            raise ValueError(f"graph {graph_id} has no parameters to differentiate '{loss}' by; name them in wrt")
        return stream.loss, gradients

    # ------------------------------------------------------------ pictures
    def render(
        self,
        graph_id: str,
        feeds: Mapping[str, npt.ArrayLike] | None = None,
        loss: str | None = None,
        format: Literal["svg", "dot"] = "svg",
    ) -> str:
        """The graph drawn left to right as SVG text (for a notebook: IPython.display.SVG) or as DOT.

        With `feeds` (or a `loss`), each node also shows its forward value: every node that the
        feeds and the graph determine is fetched, so a partly fed graph draws what it can. With
        `loss`, every float node the loss depends on also shows d(loss)/d(node). SVG needs
        Graphviz's `dot` program installed; DOT needs nothing. All values come back in one
        Forward response, within the channel's receive limit (`max_message_mb`).
        """
        if format not in ("svg", "dot"):
            raise ValueError(f"format must be 'svg' or 'dot', got {format!r}")
        info = self.get_graph(graph_id, include_definition=True, omit_parameter_values=True)
        definition = info.definition
        assert definition is not None  # include_definition=True always sets it
        values: dict[str, np.ndarray] | None = None
        gradients: dict[str, np.ndarray] | None = None
        if feeds is not None or loss is not None:
            fed = feeds or {}
            fetches = computable_nodes(definition, info.topological_order, fed)
            values = self.forward(graph_id, fed, fetches) if fetches else {}
            if loss is not None:
                wrt = gradient_nodes(definition, info.topological_order, loss, values)
                _, gradients = self.gradients(graph_id, fed, loss, wrt)
        dot = to_dot(definition, values, gradients, loss=loss)
        return dot if format == "dot" else render_svg(dot)

    # ------------------------------------------------------------ parameters
    def get_parameters(self, graph_id: str, names: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Current values of parameters and state nodes (all when `names` is empty); see get_parameters_with_step
        for the step."""
        return self.get_parameters_with_step(graph_id, names)[0]

    def get_parameters_with_step(self, graph_id: str, names: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], int]:
        """Parameter values and the optimizer step they belong to, read together so they match.

        They stream (StreamParameters) in chunks, so parameters of any size arrive whatever the
        channel's receive limit.
        """
        request = pb.StreamParametersRequest(graph_id=graph_id, names=_names(names))
        with rpc_errors():
            call = self._stub.StreamParameters(request, timeout=self.timeout)
        with ParameterStream(call) as stream:
            values = dict(stream)
        assert stream.step is not None  # the server sends at least one message, with the step
        return values, stream.step

    def set_parameters(self, graph_id: str, values: Mapping[str, npt.ArrayLike]) -> int:
        """Replace parameter or state values (same dtype and shape; optimizer state is reset); returns the step."""
        request = pb.SetParametersRequest(graph_id=graph_id, parameters=tensors.encode_named(_arrays(values)))
        with rpc_errors():
            response = self._stub.SetParameters(request, timeout=self.timeout)
        return response.step

    # ------------------------------------------------------------ training
    def train(
        self,
        graph_id: str,
        batches: Iterable[Batch],
        *,
        loss: str,
        optimizer: Optimizer,
        parameters: Sequence[str] = (),
        stream_gradients: bool = False,
        stream_updates: bool = False,
        checkpoint_every: int = 0,
        stop_on_non_finite_loss: bool = False,
        seed: int = 0,
    ) -> TrainStream:
        """Train on `batches` in one stream, yielding a TrainStep per batch.

        Batches are read and sent by gRPC as fast as the connection allows, not one per step
        read, so a slow consumer of the returned stream does not slow training down.
        `parameters` restricts training (all parameters when empty); `checkpoint_every` 0 means
        the server's default; `stop_on_non_finite_loss` ends the stream with INVALID_ARGUMENT
        on a NaN or infinite loss without applying that step. The graph runs in training mode:
        batch statistics (each step updates the running ones), and dropout masks drawn from
        (`seed`, step, node name), so the same batches and seed give the same run, bit for bit.
        """
        config = pb.TrainConfig(
            graph_id=graph_id,
            loss=loss,
            optimizer=optimizer.to_proto(),
            parameters=_names(parameters),
            stream_gradients=stream_gradients,
            stream_updates=stream_updates,
            checkpoint_every=checkpoint_every,
            stop_on_non_finite_loss=stop_on_non_finite_loss,
            seed=seed,
        )
        return TrainStream(self._stub.Train, config, batches)

    def fit(
        self,
        graph_id: str,
        data: Iterable[Batch] | Batch,
        *,
        loss: str,
        optimizer: Optimizer,
        batch_size: int | None = None,
        epochs: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        progress: bool | None = None,
        **train_options: Unpack[TrainOptions],
    ) -> History:
        """Train for `epochs` over `data` and return every step's loss.

        `data` is a dict of equal-length arrays, cut along the first axis into batches of
        `batch_size` (all of it when None), reshuffled each epoch by numpy's Generator(seed)
        when `shuffle`; or an iterable of ready batch dicts (then batch_size must be None and
        shuffle does not apply). `seed` also seeds the server's dropout masks (`train`'s seed), so
        one seed makes the whole run reproducible. `progress` None shows a progress bar only when
        stderr is a terminal, so logs and CI output stay clean. Other keywords go to `train`.
        """
        batches, total = plan_batches(data, batch_size, epochs, shuffle, seed)
        history = History()
        show = sys.stderr.isatty() if progress is None else progress
        with (
            tqdm(total=total, disable=not show, unit="step", dynamic_ncols=True) as bar,
            self.train(graph_id, batches, loss=loss, optimizer=optimizer, seed=seed, **train_options) as stream,
        ):
            for step in stream:
                history.record(step)
                bar.set_postfix(loss=f"{step.loss:.4g}", refresh=False)
                bar.update()
        return history

    # ------------------------------------------------------------ datasets
    def upload_dataset(
        self, name: str, columns: Mapping[str, npt.ArrayLike], *, progress: bool | None = None
    ) -> DatasetInfo:
        """Store arrays on the server as a dataset that jobs train on: `columns` maps each column's
        name to an array whose first axis indexes the examples (the same length in every column),
        e.g. {"x": images, "y": labels}. Dtypes are float32, float64, int32, int64 or bool.

        The bytes stream in 1 MiB chunks, column after column; the dataset is durable when this
        returns. `progress` None shows a progress bar only when stderr is a terminal."""
        arrays = upload_arrays(columns)
        total = sum(array.nbytes for array in arrays.values())
        show = sys.stderr.isatty() if progress is None else progress
        with (
            tqdm(total=total, disable=not show, unit="B", unit_scale=True, dynamic_ncols=True) as bar,
            rpc_errors(),
        ):
            response = self._upload(upload_requests(name, arrays, bar.update))
        return DatasetInfo.from_proto(response)

    def get_dataset(self, dataset_id: str) -> DatasetInfo:
        request = dataset_service_pb2.GetDatasetRequest(dataset_id=dataset_id)
        with rpc_errors():
            return DatasetInfo.from_proto(self._datasets.GetDataset(request, timeout=self.timeout))

    def list_datasets(self, page_size: int = 100) -> list[DatasetInfo]:
        """Every dataset stored, oldest first; `page_size` only sets how many come per round trip."""
        datasets: list[DatasetInfo] = []
        token = ""
        while True:
            page, token = self.list_datasets_page(page_size, token)
            datasets.extend(page)
            if not token:
                return datasets

    def list_datasets_page(self, page_size: int = 100, page_token: str = "") -> tuple[list[DatasetInfo], str]:
        """One page of the stored datasets, oldest first, and the token of the next page ("" after the last)."""
        request = dataset_service_pb2.ListDatasetsRequest(page_size=page_size, page_token=page_token)
        with rpc_errors():
            response = self._datasets.ListDatasets(request, timeout=self.timeout)
        return [DatasetInfo.from_proto(message) for message in response.datasets], response.next_page_token

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset; refused (FAILED_PRECONDITION) while a queued or running job uses it."""
        with rpc_errors():
            self._datasets.DeleteDataset(
                dataset_service_pb2.DeleteDatasetRequest(dataset_id=dataset_id), timeout=self.timeout
            )

    # ------------------------------------------------------------ jobs
    def create_job(
        self,
        graph_id: str,
        dataset_id: str,
        *,
        loss: str,
        optimizer: Optimizer,
        feeds: Mapping[str, str],
        batch_size: int,
        epochs: int = 0,
        max_steps: int = 0,
        parameters: Sequence[str] = (),
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        evaluation: Evaluation | None = None,
        checkpoint_every: int = 0,
        stop_on_non_finite_loss: bool = False,
        schedule: Schedule | None = None,
        replicas: int = 1,
    ) -> Job:
        """Queue a job that trains the graph on a stored dataset on the server, detached from this
        client, and return its handle (`Job.wait()` follows it with a progress bar).

        `feeds` maps graph inputs to dataset columns. The job makes `epochs` passes (0: 1 unless
        `max_steps` is set), or stops at `max_steps` steps, in batches of `batch_size` examples,
        shuffled each epoch by a permutation keyed by (`seed`, epoch) when `shuffle`; `seed` also
        keys dropout, so the same call on the same graph start gives the same parameters, bit for
        bit. `evaluation` adds metrics; `schedule` (StepDecay, Cosine, Warmup) varies the
        learning rate. `replicas` > 1 splits each batch among that many data-parallel replicas on the
        server's Ray cluster. The other keywords are those of `train`."""
        spec = job_spec(
            graph_id,
            dataset_id,
            loss=loss,
            optimizer=optimizer,
            feeds=feeds,
            batch_size=batch_size,
            epochs=epochs,
            max_steps=max_steps,
            parameters=parameters,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
            evaluation=evaluation,
            checkpoint_every=checkpoint_every,
            stop_on_non_finite_loss=stop_on_non_finite_loss,
            schedule=schedule,
            replicas=replicas,
        )
        return create_job(self._jobs, spec, self.timeout)

    def get_job(self, job_id: str) -> Job:
        """A handle on an existing job (checked to exist)."""
        job = Job(self._jobs, job_id, self.timeout)
        job.info()
        return job

    def list_jobs(self, *, states: Sequence[JobState] = (), graph_id: str = "", page_size: int = 100) -> list[JobInfo]:
        """Every job (in `states`, of `graph_id`, when given), oldest first."""
        return list_jobs(self._jobs, states, graph_id, page_size, self.timeout)

    def list_jobs_page(
        self, page_size: int = 100, page_token: str = "", *, states: Sequence[JobState] = (), graph_id: str = ""
    ) -> tuple[list[JobInfo], str]:
        """One page of the jobs (in `states`, of `graph_id`, when given), oldest first, and the token of
        the next page ("" after the last)."""
        return list_jobs_page(self._jobs, page_size, page_token, states, graph_id, self.timeout)

    # ------------------------------------------------------------ ONNX
    def import_onnx(self, model: OnnxModel, *, name: str = "", frozen: Sequence[str] = ()) -> ImportedModel:
        """Store an ONNX model (a path, its bytes, or a ModelProto) as a graph whose nodes carry the
        ONNX value names. Float initializers become trainable parameters, except those in `frozen`;
        `name` empty keeps the ONNX graph's name. The result's `outputs` name the graph's outputs."""
        data = model_bytes(model)
        request = pb.ImportOnnxRequest(name=name, model=data, frozen=_names(frozen))
        with size_refusals(len(data)), rpc_errors():
            response = self._stub.ImportOnnx(request, timeout=self.timeout)
        return ImportedModel(GraphInfo.from_proto(response.graph), tuple(response.outputs))

    def export_onnx(
        self, graph_id: str, path: str | os.PathLike[str] | None = None, *, outputs: Sequence[str] = ()
    ) -> bytes:
        """The graph with its current parameters and state as a serialized ONNX model (opset 21),
        also written to `path` when given. `outputs` are the nodes the model outputs (empty: every
        computed node no other node reads)."""
        request = pb.ExportOnnxRequest(graph_id=graph_id, outputs=_names(outputs))
        with rpc_errors():
            model = b"".join(response.chunk for response in self._stub.ExportOnnx(request, timeout=self.timeout))
        if path is not None:
            write_model(path, model)
        return model


def _view(view: GraphView) -> graph_pb2.GraphView.ValueType:
    if view not in _VIEWS:
        raise ValueError(f"view must be 'basic' or 'full', got {view!r}")
    return _VIEWS[view]


def _names(names: Sequence[str]) -> list[str]:
    """A lone string is one name, not a sequence of one-letter names."""
    return [names] if isinstance(names, str) else list(names)


def _arrays(values: Mapping[str, npt.ArrayLike]) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in values.items()}
