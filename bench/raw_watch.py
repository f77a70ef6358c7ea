"""A bare gRPC server that streams a job's pace of small messages to its watchers: the floor under row 12.

Run as `python -m bench.raw_watch`; it prints `raw watch serving on HOST:PORT`. A watch asks for
`steps` events at `rate` a second; the first watch of a run starts its clock, and every watch of
the run gets one encoded `JobEvent` per step, taken in batches as chainrule's watchers take them
(a watcher that has sent what there was sleeps WATCH_BATCH_SECONDS). There is no job, no store
and no chainrule servicer, so the CPU a watch costs here is what gRPC Python and protobuf cost
per message: no watcher of chainrule's can cost less.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from chainrule.server.jobs.manager import WATCH_BATCH_SECONDS
from chainrule.v1 import job_service_pb2 as pb

SERVICE = "bench.RawWatch"
METHOD = f"/{SERVICE}/Watch"
REQUEST = struct.Struct("<qdq")
"""A watch's request: the run (watches of one run follow one clock), steps a second, steps."""


@dataclass
class Run:
    """One clock of steps, and each step's event encoded once for all the run's watches."""

    rate: float
    events: list[bytes]
    step: int = 0
    condition: threading.Condition = field(default_factory=threading.Condition)

    def tick(self) -> None:
        start = time.perf_counter()
        for step in range(1, len(self.events) + 1):
            delay = start + step / self.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            with self.condition:
                self.step = step
                self.condition.notify_all()

    def follow(self) -> Iterator[bytes]:
        sent = 0
        while sent < len(self.events):
            with self.condition:
                while self.step == sent:
                    self.condition.wait()
                reached = self.step
            yield from self.events[sent:reached]
            sent = reached
            time.sleep(WATCH_BATCH_SECONDS)


def serve() -> None:
    runs: dict[int, Run] = {}
    lock = threading.Lock()

    def watch(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        run_id, rate, steps = REQUEST.unpack(request)
        with lock:
            run = runs.get(run_id)
            if run is None:
                events = [
                    pb.JobEvent(step=step, epoch=1, loss=2.302585, learning_rate=0.1).SerializeToString()
                    for step in range(1, steps + 1)
                ]
                run = runs[run_id] = Run(rate, events)
                threading.Thread(target=run.tick, daemon=True).start()
        yield from run.follow()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Watch": grpc.unary_stream_rpc_method_handler(watch)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"raw watch serving on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def watch(channel: grpc.Channel, run_id: int, rate: float, steps: int) -> int:
    """Follow run `run_id` to its end, parsing each event as a Python client does; the events received."""
    call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=pb.JobEvent.FromString)
    return sum(1 for _ in call(REQUEST.pack(run_id, rate, steps)))


if __name__ == "__main__":
    serve()
