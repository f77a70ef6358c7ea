"""Run a generator on its own thread, a few items ahead of the thread that consumes it; and read
an iterator that may block for ever with a limit on how long each item may take.

A Train stream's handler thread would otherwise spend part of every step waiting on gRPC:
for the response to be written, then for the next request to be handed over. With the steps
computed on a thread of their own, that waiting overlaps the next step's numpy work, which
releases the GIL.

gRPC's request iterator blocks until the client sends something; `idle_limited` reads it on a
thread of its own so that a stream whose client went quiet ends after --stream-idle-seconds.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import TypeVar

from chainrule.server.plan import StopFlag

T = TypeVar("T")
PUT_POLL_SECONDS = 0.1
"""How often a producer blocked on a full queue looks whether its consumer has gone."""


class _End:
    """What the producer queues last: nothing, or the exception that ended it."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error


def run_ahead(items: Generator[T, None, None], depth: int, stop: StopFlag, name: str) -> Iterator[T]:
    """Yield what `items` yields, computed on a thread that keeps up to `depth` items waiting
    (and one more in hand, blocked until there is room).

    An exception from `items` is raised here, in the consumer's thread. When the consumer stops
    early, `stop` is raised (so a running pass ends between two steps) and `items` is closed on
    its own thread; either way this returns only once that thread has finished, so whatever
    `items` holds is released before the caller goes on.
    """
    ready: queue.Queue[T | _End] = queue.Queue(maxsize=depth)
    abandoned = threading.Event()

    def put(item: T | _End) -> bool:
        while not abandoned.is_set():
            try:
                ready.put(item, timeout=PUT_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_End())
        except Exception as error:
            put(_End(error))
        finally:
            items.close()

    producer = threading.Thread(target=produce, name=name, daemon=True)
    producer.start()
    ended = False
    try:
        while True:
            item = ready.get()
            if isinstance(item, _End):
                ended = True
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        if not ended:
            abandoned.set()
            stop.stopped = True
        producer.join()


class StreamIdle(Exception):
    """The next item did not come within the idle limit."""


def idle_limited(items: Iterator[T], idle_seconds: float, name: str) -> Iterator[T]:
    """Yield what `items` yields, each read on a thread of its own when it is asked for (never ahead);
    raise StreamIdle when one takes more than `idle_seconds` to come.

    The reading thread is left blocked in `items` when this gives up: it is meant for gRPC's request
    iterator, which ends (and so lets the thread finish) as soon as its RPC does.
    """
    wanted = threading.Semaphore(0)
    ready: queue.SimpleQueue[T | _End] = queue.SimpleQueue()
    closed = threading.Event()

    def read() -> None:
        while True:
            wanted.acquire()
            if closed.is_set():
                return
            try:
                item = next(items)
            except StopIteration:
                ready.put(_End())
                return
            except Exception as error:
                ready.put(_End(error))
                return
            ready.put(item)

    threading.Thread(target=read, name=name, daemon=True).start()
    try:
        while True:
            wanted.release()
            try:
                item = ready.get(timeout=idle_seconds)
            except queue.Empty:
                raise StreamIdle(f"nothing came for {idle_seconds:g} s") from None
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        closed.set()
        wanted.release()
