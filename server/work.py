"""Work a caller may give up on: a flag that stops it between two steps, and work that
concurrent callers share.

Compiling a graph or planning a pass over a million nodes takes seconds. Callers that need
the same compilation at once wait for one run of it (`SharedWork`) instead of each running
their own; each of them can give up waiting when its own call is cancelled or its deadline
passes, and once none is left waiting the work itself stops at its next check, so a client
that went away never leaves the server busy on its behalf.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from chainrule.server.errors import Cancelled

T = TypeVar("T")
WAIT_POLL_SECONDS = 0.02
"""How often a caller waiting for shared work looks at its own stop flag."""


class StopFlag:
    """Set from another thread (a cancelled RPC) to stop a running pass between two steps."""

    stopped = False


def stopped(doing: str) -> Cancelled:
    return Cancelled(f"cancelled while {doing}", reason="CANCELLED")


class SharedWork(Generic[T]):
    """`work` run once on a thread of its own, for every caller that joins before it ends.

    `work` gets a StopFlag of its own, raised when the last caller stops waiting, and should
    check it between steps. Register instances where callers find them, and drop them from
    there when `work` ends (in `work` itself), so a later caller starts afresh.
    """

    def __init__(self, work: Callable[[StopFlag], T], name: str) -> None:
        self.stop = StopFlag()
        self._lock = threading.Lock()
        self._waiters = 0
        self._done = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        self._started = False
        self._abandoned: BaseException | None = None

    def _run(self, work: Callable[[StopFlag], T]) -> None:
        try:
            self._result = work(self.stop)
        except BaseException as error:  # handed to every waiter, in its own thread
            self._error = error
        finally:
            self._done.set()

    def abandon(self, error: BaseException) -> None:
        """Stop the work and answer every waiter with `error` instead of its result (what it was for is gone)."""
        with self._lock:
            self._abandoned = error
            self.stop.stopped = True

    def join(self) -> bool:
        """Count one more caller; False when the work is already stopping (start another one)."""
        with self._lock:
            if self.stop.stopped:
                return False
            self._waiters += 1
            if not self._started:
                self._started = True
                self._thread.start()
            return True

    def wait(self, stop: StopFlag | None, doing: str) -> T:
        """The work's result (or its exception) for a caller that joined; raises Cancelled as soon
        as the caller's own `stop` is raised, and stops the work if no other caller waits."""
        try:
            while not (stop is not None and stop.stopped):
                if self._done.wait(WAIT_POLL_SECONDS):
                    break
            else:
                raise stopped(doing)
        finally:
            with self._lock:
                self._waiters -= 1
                if self._waiters == 0 and not self._done.is_set():
                    self.stop.stopped = True
        error = self._abandoned or self._error
        if error is not None:
            raise error
        return self._result  # type: ignore[return-value]

    @property
    def waiters(self) -> int:
        return self._waiters
