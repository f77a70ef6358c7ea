"""run_ahead: the thread that computes a Train stream's steps ahead of the gRPC handler thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator

import pytest

from chainrule.server.errors import InvalidArgument
from chainrule.server.pipeline import run_ahead
from chainrule.server.plan import StopFlag


def test_items_arrive_in_order_from_another_thread() -> None:
    threads: list[str] = []

    def numbers() -> Generator[int, None, None]:
        for number in range(10):
            threads.append(threading.current_thread().name)
            yield number

    assert list(run_ahead(numbers(), 2, StopFlag(), "producer")) == list(range(10))
    assert set(threads) == {"producer"}


def test_an_error_arrives_after_the_items_before_it() -> None:
    def failing() -> Generator[int, None, None]:
        yield 1
        yield 2
        raise InvalidArgument("batch 2: bad feed", reason="SHAPE_MISMATCH", subject="x")

    received = []
    with pytest.raises(InvalidArgument, match="batch 2: bad feed"):
        for item in run_ahead(failing(), 2, StopFlag(), "producer"):
            received.append(item)
    assert received == [1, 2]


def test_the_producer_runs_at_most_depth_items_ahead() -> None:
    produced = 0
    blocked = threading.Event()

    def counting() -> Generator[int, None, None]:
        nonlocal produced
        for number in range(100):
            produced += 1
            if produced == 4:
                blocked.set()
            yield number

    items = run_ahead(counting(), 2, StopFlag(), "producer")
    assert next(items) == 0
    # Item 0 taken, items 1 and 2 queued, item 3 waiting for room: no item 4 until we take more.
    assert blocked.wait(10)
    time.sleep(0.3)
    assert produced == 4
    items.close()


def test_a_consumer_that_leaves_stops_and_closes_the_producer_before_returning() -> None:
    stop = StopFlag()
    closed_on: list[str] = []
    started = threading.Event()

    def endless() -> Generator[int, None, None]:
        try:
            yield 0
            started.set()
            while not stop.stopped:  # a pass in progress, ending between two steps
                time.sleep(0.01)
            yield 1
        finally:
            closed_on.append(threading.current_thread().name)

    items = run_ahead(endless(), 1, stop, "producer")
    assert next(items) == 0
    assert started.wait(10)
    items.close()
    assert stop.stopped
    assert closed_on == ["producer"]


def test_a_finished_stream_leaves_the_stop_flag_alone() -> None:
    stop = StopFlag()
    assert list(run_ahead(iter_three(), 2, stop, "producer")) == [0, 1, 2]
    assert not stop.stopped


def iter_three() -> Generator[int, None, None]:
    yield from range(3)
