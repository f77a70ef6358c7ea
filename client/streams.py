"""Iterators over the server-streaming calls (Backward, Train, StreamParameters) that speak numpy and ChainruleError.

Arrays decoded from responses are read-only views of the received bytes (no copy); call
`.copy()` on one to modify it in place.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Generic, Self, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from chainrule import tensors
from chainrule.v1 import graph_service_pb2 as pb
from chainrule.v1 import tensor_pb2

from .errors import from_rpc_error
from .training import TrainStep

Response = TypeVar("Response")
Item = TypeVar("Item")


def encode_feeds(feeds: Mapping[str, npt.ArrayLike]) -> dict[str, tensor_pb2.Tensor]:
    """Python floats become float64 scalars; numpy arrays keep their dtype (inputs may declare one)."""
    return {name: tensors.encode(np.asarray(value), name) for name, value in feeds.items()}


def decode_named(named: Iterable[tensor_pb2.NamedTensor]) -> dict[str, np.ndarray]:
    return {item.name: tensors.decode(item.tensor, item.name) for item in named}


class ResponseStream(Generic[Response, Item], Iterator[Item]):
    """Iterates a streaming call; `cancel()` ends the iteration quietly instead of with an error."""

    def __init__(self, call: grpc.CallIterator[Response]) -> None:
        self._call = call
        self._responses = iter(call)
        self._cancelled = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Item:
        while True:
            try:
                response = next(self._responses)
            except grpc.RpcError as error:
                if self._cancelled and error.code() == grpc.StatusCode.CANCELLED:
                    raise StopIteration from None
                raise from_rpc_error(error) from None
            except StopIteration:
                if self._incomplete():
                    raise tensors.TensorError("the stream ended in the middle of a chunked tensor") from None
                raise
            item = self._item(response)
            if item is not None:
                return item

    @abstractmethod
    def _item(self, response: Response) -> Item | None:
        """The Python value the response completes, or None while chunks of it are still to come."""

    @abstractmethod
    def _incomplete(self) -> bool:
        """Whether a value is still waiting for chunks, so the stream must not end here."""

    def cancel(self) -> None:
        """Stop the call on the server too; safe to call at any time, including after the end."""
        self._cancelled = True
        self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel unannotated

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        """Leaving the block early (break, an exception) must not leave the server computing."""
        self.cancel()


class GradientStream(ResponseStream[pb.BackwardResponse, tuple[str, np.ndarray]]):
    """Yields (name, gradient) pairs in the order the server finishes them (reverse topological).

    `loss` is None until the first message has arrived, then the loss node's value.
    """

    def __init__(self, call: grpc.CallIterator[pb.BackwardResponse], loss_name: str) -> None:
        super().__init__(call)
        self.loss_name = loss_name
        self.loss: np.ndarray | None = None
        self._chunks = tensors.Assembler()
        self._loss_chunks = tensors.Assembler()

    def _item(self, response: pb.BackwardResponse) -> tuple[str, np.ndarray] | None:
        if response.HasField("loss"):
            loss = self._loss_chunks.add(self.loss_name, response.loss)
            if loss is not None:
                self.loss = loss
        if not response.HasField("gradient"):
            return None  # a leading message with only a chunk of a large loss
        gradient = self._chunks.add(response.name, response.gradient)
        return None if gradient is None else (response.name, gradient)

    def _incomplete(self) -> bool:
        return self._chunks.pending or self._loss_chunks.pending


class ParameterStream(ResponseStream[pb.StreamParametersResponse, tuple[str, np.ndarray]]):
    """Yields (name, value) pairs of one step's parameters, joined from their chunks.

    `step` is None until the first message has arrived, then the step the values belong to.
    """

    def __init__(self, call: grpc.CallIterator[pb.StreamParametersResponse]) -> None:
        super().__init__(call)
        self.step: int | None = None
        self._chunks = tensors.Assembler()
        self._ready: deque[tuple[str, np.ndarray]] = deque()

    def __next__(self) -> tuple[str, np.ndarray]:
        """A message may complete several small parameters; they are handed out one by one."""
        if self._ready:
            return self._ready.popleft()
        return super().__next__()

    def _item(self, response: pb.StreamParametersResponse) -> tuple[str, np.ndarray] | None:
        self.step = response.step
        for named in response.parameters:
            value = self._chunks.add(named.name, named.tensor)
            if value is not None:
                self._ready.append((named.name, value))
        return self._ready.popleft() if self._ready else None

    def _incomplete(self) -> bool:
        return self._chunks.pending


class TrainStream(ResponseStream[pb.TrainResponse, TrainStep]):
    """Yields one TrainStep per batch while gRPC keeps sending batches without waiting for them.

    If `batches` raises (or holds a feed that cannot be encoded), the request stream is closed
    there: the batches already sent are still trained and yielded, then the error is raised.
    """

    def __init__(
        self,
        start: Callable[[Iterator[pb.TrainRequest]], grpc.CallIterator[pb.TrainResponse]],
        config: pb.TrainConfig,
        batches: Iterable[Mapping[str, npt.ArrayLike]],
    ) -> None:
        self._batch_error: Exception | None = None
        self._gradients: dict[str, np.ndarray] = {}
        self._updates: dict[str, np.ndarray] = {}
        self._gradient_chunks = tensors.Assembler()
        self._update_chunks = tensors.Assembler()
        self._step_open = False
        super().__init__(start(self._requests(config, batches)))

    def _requests(
        self, config: pb.TrainConfig, batches: Iterable[Mapping[str, npt.ArrayLike]]
    ) -> Iterator[pb.TrainRequest]:
        """Runs on gRPC's sending thread. An exception escaping it would cancel the call with a bare
        "Exception iterating requests!", so it is kept and raised on the caller's thread instead."""
        yield pb.TrainRequest(config=config)
        try:
            for batch in batches:
                yield pb.TrainRequest(batch=pb.Batch(feeds=encode_feeds(batch)))
        except Exception as error:
            self._batch_error = error

    def __next__(self) -> TrainStep:
        try:
            return super().__next__()
        except StopIteration:
            error, self._batch_error = self._batch_error, None
            if error is not None:
                raise error from None
            raise

    def _item(self, response: pb.TrainResponse) -> TrainStep | None:
        """Collects a step that arrives split over several messages (more_in_step) and chunked tensors."""
        for named, chunks, into in (
            (response.gradients, self._gradient_chunks, self._gradients),
            (response.updates, self._update_chunks, self._updates),
        ):
            for item in named:
                value = chunks.add(item.name, item.tensor)
                if value is not None:
                    into[item.name] = value
        if response.more_in_step:
            self._step_open = True
            return None
        step = TrainStep(step=response.step, loss=response.loss, gradients=self._gradients, updates=self._updates)
        self._gradients, self._updates = {}, {}
        self._step_open = False
        return step

    def _incomplete(self) -> bool:
        return self._step_open or self._gradient_chunks.pending or self._update_chunks.pending
