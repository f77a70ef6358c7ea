"""One WatchJob stream per job, shared by every browser that follows the job.

A job's page follows the job through Server-Sent Events; ten tabs on one job, or one page
reloaded often, would otherwise hold ten WatchJob streams, each a thread here and a watcher on
the server. Instead the first follower of a job starts a `JobFeed`: one thread reading WatchJob
from step 1 into compact arrays (32 bytes a step), handing each follower what it has not sent
yet, from the step it asked for. Followers join and leave at any time; a follower that reads
slowly only falls behind in the arrays, never slows the stream. The feed watches again after
UNAVAILABLE (a restarting server) from the step after its last, and is dropped LINGER_SECONDS
after its last follower left, so a reload finds it still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from array import array
from collections.abc import AsyncIterator, Callable

import grpc

from chainrule.client import ChainruleError, Client

from . import data
from .data import JSON

log = logging.getLogger("chainrule.dashboard")
EVENTS_PER_MESSAGE = 5000
KEEPALIVE_SECONDS = 15.0
COALESCE_SECONDS = 0.05
"""A follower waits this long after being woken before sending, so a fast job's steps travel a
few dozen per message instead of one, still far within a second of each step."""
LINGER_SECONDS = 30.0
RETRY_SECONDS = 1.0
STATE = 0
"""The step recorded for a change of state: steps count from 1."""


class JobFeed:
    """A job's events from step 1 as WatchJob gave them: steps and changes of state, in order."""

    def __init__(self, job_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.job_id = job_id
        self.loop = loop
        self.lock = threading.Lock()
        self.steps = array("q")
        self.epochs = array("q")
        self.losses = array("d")
        self.rates = array("d")
        self.metrics: dict[int, dict[str, float]] = {}
        self.states: dict[int, str] = {}
        """The events' arrays by position; a change of state has step STATE and its name here."""
        self.step_positions = array("q")
        """The position of step s at index s - 1."""
        self.state: str | None = None
        """The latest state."""
        self.ended = False
        self.failure: str | None = None
        self.followers: set[asyncio.Event] = set()
        self.idle_since = time.monotonic()
        self.closed = False
        self._watch: Callable[[], None] | None = None
        self._wake_pending = False

    # ------------------------------------------------------------ the reading thread
    def read(self, client: Client) -> None:
        """Follow WatchJob to the job's end, watching again after UNAVAILABLE; run in a thread of its own."""
        resumed = False
        while not self.closed:
            try:
                watch = client.get_job(self.job_id).watch(len(self.step_positions) + 1)
                self._watch = watch.cancel
                if self.closed:
                    watch.cancel()
                for event in watch:
                    with self.lock:
                        if event.state is not None:
                            if not (resumed and event.state == self.state):  # a new watch tells its state first
                                self._append(STATE, 0, 0.0, 0.0, {}, event.state)
                        else:
                            self._append(event.step, event.epoch, event.loss, event.learning_rate, event.metrics, None)
                    resumed = False
                    self._wake()
                with self.lock:
                    self.ended = not self.closed
                self._wake()
                return
            except ChainruleError as error:
                if self.closed:
                    return
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    with self.lock:
                        self.failure = str(error)
                    self._wake()
                    return
                log.warning("watching job %s: %s; watching again in %g s", self.job_id, error, RETRY_SECONDS)
                resumed = True
                time.sleep(RETRY_SECONDS)

    def _append(
        self, step: int, epoch: int, loss: float, rate: float, metrics: dict[str, float], state: str | None
    ) -> None:
        position = len(self.steps)
        self.steps.append(step)
        self.epochs.append(epoch)
        self.losses.append(loss)
        self.rates.append(rate)
        if metrics:
            self.metrics[position] = dict(metrics)
        if state is not None:
            self.states[position] = self.state = state
        else:
            self.step_positions.append(position)

    def _wake(self) -> None:
        """Wake the followers, on the event loop; once until they have run, however many events come meanwhile."""
        with self.lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # the event loop closed: the dashboard is stopping
            self.loop.call_soon_threadsafe(self._wake_followers)

    def _wake_followers(self) -> None:
        with self.lock:
            self._wake_pending = False
        for follower in self.followers:
            follower.set()

    def close(self) -> None:
        self.closed = True
        if self._watch is not None:
            self._watch()

    # ------------------------------------------------------------ what followers read
    def start(self, from_step: int) -> tuple[int, str | None] | None:
        """Where a follower from `from_step` starts reading, and the state to tell it first (the
        latest before that position, as WatchJob tells its state first); None until the feed has
        every step before `from_step` (or the job ended short of it)."""
        with self.lock:
            index = max(from_step, 1) - 1
            if index > len(self.step_positions) and not self.ended and self.failure is None:
                return None
            position = self.step_positions[index] if index < len(self.step_positions) else len(self.steps)
            before = [at for at in self.states if at < position]
            return position, self.states[max(before)] if before else None

    def events(self, start: int, stop: int) -> list[JSON]:
        with self.lock:
            stop = min(stop, len(self.steps))
            return [self._event(position) for position in range(start, stop)]

    def _event(self, position: int) -> JSON:
        state = self.states.get(position)
        if state is not None:
            return {"state": state}
        return data.event_json(
            self.steps[position],
            self.epochs[position],
            self.losses[position],
            self.rates[position],
            self.metrics.get(position, {}),
        )


class JobFeeds:
    """The feeds of the jobs browsers follow, started on demand and dropped when nobody follows."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._feeds: dict[str, JobFeed] = {}

    def _feed(self, job_id: str) -> JobFeed:
        """The job's feed, started if none is running (called on the event loop, which serializes it)."""
        feed = self._feeds.get(job_id)
        if feed is None or feed.failure is not None:
            feed = self._feeds[job_id] = JobFeed(job_id, asyncio.get_running_loop())
            threading.Thread(target=feed.read, args=(self.client,), name=f"watch-job-{job_id[:8]}", daemon=True).start()
        return feed

    def _drop_if_idle(self, job_id: str) -> None:
        feed = self._feeds.get(job_id)
        if feed is not None and not feed.followers and time.monotonic() - feed.idle_since >= LINGER_SECONDS:
            feed.close()
            del self._feeds[job_id]

    async def follow(self, job_id: str, from_step: int) -> AsyncIterator[str]:
        """The job's events from `from_step` as SSE messages: `data` messages of {"events": [...]}
        (its state first, then steps and changes of state), `end` once the job has ended and every
        event was sent, `failure` with a message if the watch broke; a comment now and then keeps
        the connection open while nothing happens."""
        feed = self._feed(job_id)
        woken = asyncio.Event()
        feed.followers.add(woken)
        position: int | None = None
        try:
            while True:
                woken.clear()
                if position is None:
                    start = feed.start(from_step)
                    if start is not None:
                        position, state = start
                        if state is not None:
                            yield f"data: {data.dumps({'events': [{'state': state}]})}\n\n"
                if position is not None:
                    events = feed.events(position, position + EVENTS_PER_MESSAGE)
                    if events:
                        position += len(events)
                        yield f"data: {data.dumps({'events': events})}\n\n"
                        continue
                with feed.lock:
                    ended, failure, caught_up = feed.ended, feed.failure, position == len(feed.steps)
                if ended and caught_up:
                    yield "event: end\ndata: {}\n\n"
                    return
                if failure is not None:
                    yield f"event: failure\ndata: {data.dumps({'error': failure})}\n\n"
                    return
                try:
                    await asyncio.wait_for(woken.wait(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                await asyncio.sleep(COALESCE_SECONDS)
        finally:
            feed.followers.discard(woken)
            if not feed.followers:
                feed.idle_since = time.monotonic()
                with contextlib.suppress(RuntimeError):  # no loop: the dashboard is stopping
                    asyncio.get_running_loop().call_later(LINGER_SECONDS, self._drop_if_idle, job_id)
