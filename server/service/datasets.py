"""The DatasetService servicer: reads the upload stream, calls the dataset manager, encodes answers.

Every RPC's behaviour is here, one method each; storage and the cache are in `chainrule.server.datasets`,
the per-call plumbing (auth, admission, logging, error statuses) in `calls`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from chainrule import tensors
from chainrule.server.datasets import DatasetManager
from chainrule.server.errors import Cancelled, DeadlineExceeded, InvalidArgument
from chainrule.server.pipeline import StreamIdle, idle_limited
from chainrule.server.service.calls import Call, CallGate, Servicer, parsed, unary
from chainrule.server.store.base import StoredDataset
from chainrule.v1 import dataset_service_pb2 as pb
from chainrule.v1 import dataset_service_pb2_grpc

CANCEL_NOTICE_SECONDS = 0.2
"""How long after an incomplete request stream ends a cancellation may still come in."""


def cancelled(call: Call) -> bool:
    """Whether the call was cancelled. gRPC ends the request stream of a cancelled call just as a
    client's half-close does and flags the cancellation a moment later, so this waits that moment."""
    deadline = time.monotonic() + CANCEL_NOTICE_SECONDS
    while not call.stop.stopped and time.monotonic() < deadline:
        time.sleep(CANCEL_NOTICE_SECONDS / 20)
    return call.stop.stopped


def dataset_message(stored: StoredDataset) -> pb.Dataset:
    created = Timestamp()
    created.FromNanoseconds(int(stored.created_at * 1e9))
    return pb.Dataset(
        dataset_id=stored.dataset_id,
        name=stored.name,
        columns=[
            pb.DatasetColumn(name=column.name, dtype=tensors.DTYPE_NAMES[column.dtype], shape=column.shape)
            for column in stored.columns
        ],
        num_examples=stored.num_examples,
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
        create_time=created,
    )


class DatasetService(Servicer, dataset_service_pb2_grpc.DatasetServiceServicer):
    """Datasets: upload, read, list, delete."""

    def __init__(self, datasets: DatasetManager, calls: CallGate) -> None:
        super().__init__(calls)
        self.datasets = datasets

    @unary
    def UploadDataset(
        self, requests: Iterator[pb.UploadDatasetRequest], context: grpc.ServicerContext, call: Call
    ) -> pb.Dataset:
        idle_seconds = self.calls.stream_idle_seconds
        # Chunks are only parsed: a chunk's column name either is one the header declared, whose names
        # are checked, or is refused as unknown (quoted safely); walking a chunk would copy its bytes.
        messages = idle_limited((parsed(request) for request in requests), idle_seconds, f"upload-{call.request_id}")
        try:
            first = next(messages, None)
            if first is None or first.WhichOneof("item") != "header":
                raise InvalidArgument(
                    "the first UploadDatasetRequest must carry a header; got "
                    + ("nothing" if first is None else "a chunk"),
                    reason="HEADER_FIRST",
                    subject="header",
                )
            call.bytes_in += self.checked(first).ByteSize()
            with self.datasets.upload(first.header, call.tenant) as upload:
                for index, message in enumerate(messages, start=1):
                    if message.WhichOneof("item") != "chunk":
                        raise InvalidArgument(
                            f"message {index} carries a header; only the first message may, every later one "
                            "carries a chunk; nothing was stored",
                            reason="HEADER_FIRST",
                            subject="header",
                        )
                    data = message.chunk.data
                    call.bytes_in += len(data)
                    upload.append(message.chunk.column, data)
                if not upload.complete and cancelled(call):
                    raise Cancelled("the upload was cancelled; nothing was stored", reason="CANCELLED")
                stored = upload.finish()
        except StreamIdle:
            raise DeadlineExceeded(
                f"the stream sent nothing for {idle_seconds:g} s (--stream-idle-seconds); nothing was stored",
                reason="STREAM_IDLE",
            ) from None
        except grpc.RpcError:  # the request iterator's way of saying the client cancelled or went away
            raise Cancelled("the upload was cancelled; nothing was stored", reason="CANCELLED") from None
        return dataset_message(stored)

    @unary
    def GetDataset(self, request: pb.GetDatasetRequest, context: grpc.ServicerContext, call: Call) -> pb.Dataset:
        return dataset_message(self.datasets.get_dataset(request.dataset_id, call.tenant))

    @unary
    def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext, call: Call
    ) -> pb.ListDatasetsResponse:
        page, next_token = self.datasets.list_datasets(request.page_size, request.page_token, call.tenant)
        return pb.ListDatasetsResponse(datasets=[dataset_message(s) for s in page], next_page_token=next_token)

    @unary
    def DeleteDataset(
        self, request: pb.DeleteDatasetRequest, context: grpc.ServicerContext, call: Call
    ) -> pb.DeleteDatasetResponse:
        self.datasets.delete_dataset(request.dataset_id, call.tenant)
        return pb.DeleteDatasetResponse()
