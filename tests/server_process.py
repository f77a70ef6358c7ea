"""A real `chainrule serve` process on an ephemeral loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc

from chainrule.v1 import graph_service_pb2_grpc
from tests import postgres

ADDRESS_LINE = re.compile(r"chainrule serving on (\S+)")


class ServerProcess:
    """`db` is the database file, or a PostgreSQL URL (tests/postgres.py gives each test its own)."""

    def __init__(
        self,
        db: Path | str,
        extra_args: Sequence[str] = (),
        *,
        tls_ca: Path | None = None,
        tls_client: tuple[Path, Path] | None = None,
        connect_host: str | None = None,
        global_args: Sequence[str] = (),
    ) -> None:
        self.global_args = list(global_args)
        self.db = db
        self.extra_args = list(extra_args)
        self.tls_ca = tls_ca
        self.tls_client = tls_client
        self.connect_host = connect_host
        self.process: subprocess.Popen[str] | None = None
        self.address = ""
        self.log: list[str] = []
        self._logged = threading.Condition()

    def start(self, timeout: float = 30.0) -> ServerProcess:
        command = [sys.executable, "-m", "chainrule.server.cli", *self.global_args, "serve", "--port", "0"]
        command += ["--db", str(self.db)]
        if str(self.db).startswith("postgresql://") and "--dataset-cache" not in self.extra_args:
            command += ["--dataset-cache", str(postgres.dataset_cache(str(self.db)))]
        self.process = subprocess.Popen(
            [*command, *self.extra_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        threading.Thread(target=self._drain, args=(self.process.stderr,), daemon=True).start()
        found = threading.Event()

        def read_address() -> None:
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                self._append(line)
                match = ADDRESS_LINE.search(line)
                if match and not found.is_set():
                    self.address = match.group(1)
                    if self.connect_host:
                        self.address = f"{self.connect_host}:{self.address.rsplit(':', 1)[1]}"
                    found.set()

        threading.Thread(target=read_address, daemon=True).start()
        if not found.wait(timeout):
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        grpc.channel_ready_future(self.channel()).result(timeout=timeout)
        return self

    def channel(self) -> grpc.Channel:
        if self.tls_ca is None:
            return grpc.insecure_channel(self.address)
        key, certificate = (
            (None, None)
            if self.tls_client is None
            else (self.tls_client[1].read_bytes(), self.tls_client[0].read_bytes())
        )
        credentials = grpc.ssl_channel_credentials(self.tls_ca.read_bytes(), key, certificate)
        return grpc.secure_channel(self.address, credentials)

    def _drain(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self._append(line)

    def _append(self, line: str) -> None:
        with self._logged:
            self.log.append(line)
            self._logged.notify_all()

    def wait_for_line(self, fragment: str, timeout: float = 60.0) -> str:
        """The first line of the server's output holding `fragment`, once it has been written; waiting
        ends as soon as it is (`timeout` only bounds a server that never writes it)."""
        with self._logged:
            found = self._logged.wait_for(lambda: next((line for line in self.log if fragment in line), None), timeout)
        if found is None:
            raise AssertionError(f"the server wrote no line with {fragment!r} in {timeout:g} s:\n" + "".join(self.log))
        return found

    def stub(self) -> graph_service_pb2_grpc.GraphServiceStub:
        return graph_service_pb2_grpc.GraphServiceStub(self.channel())

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)
