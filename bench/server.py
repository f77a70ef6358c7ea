"""Server child processes on ephemeral loopback ports: `chainrule serve`, and the bench's raw gRPC server.

The bench has its own launcher rather than importing tests/, which is not part of what it
measures; the server is a child process so its peak RSS can be read from /proc (bench.rss).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc

ADDRESS_LINE = re.compile(r"serving on (\S+)")
REPO_ROOT = Path(__file__).resolve().parent.parent
"""Child processes run from here, so `python -m bench.<module>` finds the bench package from any cwd."""


class ChildServer:
    """A server child process that prints `... serving on HOST:PORT` once it has bound its port.

    Its stdout and stderr are drained on threads (a full pipe would block the server) and kept
    so a failed start can show why.
    """

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.process: subprocess.Popen[str] | None = None
        self.address = ""
        self.log: list[str] = []

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server was not started"
        return self.process.pid

    def start(self, timeout: float = 30.0) -> Self:
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        found = threading.Event()
        threading.Thread(target=self._read_stdout, args=(found,), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.process.stderr,), daemon=True).start()
        if not found.wait(timeout):
            self.stop()
            raise RuntimeError(f"{' '.join(self.command[1:])} did not start:\n" + "".join(self.log))
        # The address is printed before the server starts serving, so wait for the port to answer.
        with grpc.insecure_channel(self.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        return self

    def _read_stdout(self, found: threading.Event) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.log.append(line)
            match = ADDRESS_LINE.search(line)
            if match and not found.is_set():
                self.address = match.group(1)
                found.set()

    def _drain(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.log.append(line)

    def stop(self) -> None:
        """SIGKILL: the bench needs nothing the server would save on a graceful stop."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


class ChainruleServer(ChildServer):
    """`chainrule serve` with default options and its own database in a temporary directory."""

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="chainrule-bench-")
        database = Path(self._directory.name) / "bench.db"
        serve = ["serve", "--host", "127.0.0.1", "--port", "0", "--db", str(database)]
        super().__init__([sys.executable, "-m", "chainrule.server.cli", *serve])

    def restart(self) -> Self:
        """Kill the server and start a new one on the same database, as after a crash."""
        super().stop()
        self.log.clear()
        return self.start()

    def stop(self) -> None:
        super().stop()
        self._directory.cleanup()
