"""Measurement 10: a dataset uploaded through UploadDataset, and the bare gRPC sink it is compared with.

The client sends a 256 MiB float32 array (32 MiB in quick mode) as `client.upload_dataset` does:
1 MiB chunks in a client stream. The time runs until the call returns, when the dataset is
durable: hashed, in the store in one committed transaction, and in the server's local cache.
The baseline streams the same bytes in the same 1 MiB messages to a bare gRPC server that only
counts them (`python -m bench.upload` runs it): no protobuf, no hashing, no disk. Each run
deletes its dataset and lets the server settle, so every upload stores the same bytes into the same
database on a quiet server.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np

import chainrule.client as cr
from bench.measure import Measurement, Target, interleaved, median
from bench.server import ChildServer
from chainrule.client.datasets import CHUNK_BYTES

SETTLE_SECONDS = 1.0
"""Untimed, after each upload's delete: the server checkpoints a large write and its delete on a thread
of its own after answering, which would otherwise share the cores with the next run."""
SERVICE = "bench.RawUpload"
METHOD = f"/{SERVICE}/Bytes"


def serve() -> None:
    def sink(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return sum(len(request) for request in requests).to_bytes(8, "little")

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 2 * CHUNK_BYTES)],
    )
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Bytes": grpc.stream_unary_rpc_method_handler(sink)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"raw upload serving on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def send(channel: grpc.Channel, payload: np.ndarray) -> int:
    """Stream the array's bytes in CHUNK_BYTES messages, sliced as the client slices a column."""
    call = channel.stream_unary(METHOD, request_serializer=None, response_deserializer=None)
    raw = payload.reshape(-1).view(np.uint8).data
    chunks = (raw[start : start + CHUNK_BYTES].tobytes() for start in range(0, len(raw), CHUNK_BYTES))
    return int.from_bytes(call(chunks), "little")


def measure_upload(address: str, size: int, repeats: int) -> Measurement:
    payload = np.random.default_rng(0).standard_normal(size // 4, dtype=np.float32)
    expected = hashlib.sha256(payload.tobytes()).hexdigest()
    with (
        cr.Client(address) as client,
        ChildServer([sys.executable, "-m", "bench.upload"]).start() as raw,
        grpc.insecure_channel(raw.address) as channel,
    ):

        def chainrule_upload() -> float:
            start = time.perf_counter()
            info = client.upload_dataset("bench-upload", {"x": payload}, progress=False)
            elapsed = time.perf_counter() - start
            assert info.size_bytes == size and info.sha256 == expected, "wrong dataset"
            client.delete_dataset(info.dataset_id)
            time.sleep(SETTLE_SECONDS)
            return elapsed

        def bare_grpc() -> float:
            start = time.perf_counter()
            received = send(channel, payload)
            elapsed = time.perf_counter() - start
            assert received == size
            return elapsed

        runs = {"chainrule": chainrule_upload, "raw_grpc": bare_grpc}
        interleaved(runs, 1)  # warm-up: connections, the database's first pages, allocator growth
        samples = interleaved(runs, repeats)
    gigabytes = size / 1e9
    return Measurement(
        key="upload",
        title=f"10 dataset upload via UploadDataset, {size / 2**20:g} MiB",
        unit="GB/s",
        chainrule=gigabytes / median(samples["chainrule"]),  # type: ignore[operator]
        baselines={"raw_grpc": gigabytes / median(samples["raw_grpc"])},  # type: ignore[operator]
        ratio_baseline="raw_grpc",
        target=Target(">=", 0.3, on="value"),
        details={"bytes": size, "repeats": repeats, "seconds": {name: median(s) for name, s in samples.items()}},
    )


if __name__ == "__main__":
    serve()
