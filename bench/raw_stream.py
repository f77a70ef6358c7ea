"""A bare gRPC server that streams N bytes in 1 MiB messages: the transport's ceiling for measurement 4.

Run as `python -m bench.raw_stream`; it prints `raw stream serving on HOST:PORT`. It has no
protobuf, no tensors and no computation, and its chunks are sliced before the call, so what a
client measures against it is gRPC Python moving bytes between two processes on this machine.
A chainrule Backward that streams a large gradient pays this plus its own work.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc

from chainrule import tensors

SERVICE = "bench.RawStream"
METHOD = f"/{SERVICE}/Bytes"
CHUNK_BYTES = tensors.CHUNK_BYTES
"""The chunk size chainrule's server streams use, so both sides send the same number of messages."""


def serve() -> None:
    chunks: dict[int, list[bytes]] = {}
    lock = threading.Lock()

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        size = int.from_bytes(request, "little")
        with lock:
            if size not in chunks:
                payload = bytes(size)
                chunks[size] = [payload[offset : offset + CHUNK_BYTES] for offset in range(0, size, CHUNK_BYTES)]
        yield from chunks[size]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Bytes": grpc.unary_stream_rpc_method_handler(stream)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"raw stream serving on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def receive(channel: grpc.Channel, size: int) -> bytes:
    """Ask for `size` bytes and join the messages, as chainrule's client joins a chunked tensor."""
    call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
    return b"".join(call(size.to_bytes(8, "little")))


if __name__ == "__main__":
    serve()
