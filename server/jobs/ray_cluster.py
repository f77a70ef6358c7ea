"""Where a server's Ray cluster is (--ray-address) and how a process joins it; a private Ray head
for `--ray-address local` (and for the tests). Imports nothing of Ray: a server without the extra
says what to install before anything starts.

Ray's own processes take the machine's interface address unless told, even when asked for
127.0.0.1 (`ray start --node-ip-address 127.0.0.1` resolves it back to the interface). A head this
module starts and every driver that joins a cluster on a loopback address therefore run with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's switch for single-machine clusters (for `auto`, when the
address it leads to is on loopback), under which Ray's
servers bind to and advertise 127.0.0.1 only; usage statistics stay off and the dashboard is not
started.

Token authentication: Ray 2.60 turns it on for a cluster that `ray.init()` starts, and for one
that `ray start` starts where a token already exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token). A process joins such a cluster with RAY_AUTH_MODE=token and the cluster's token
in one of those three places; the server's drivers inherit the server's environment. The private
head of `local` makes its own token, in a file only its owner reads, and gives it to its drivers.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("chainrule.server.jobs.ray")
RAY_EXTRA = "pip install 'chainrule[ray]'"
LOOPBACK_ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""What keeps a Ray process on this machine to 127.0.0.1 (see the module's docstring)."""
LOCAL = "local"
AUTO = "auto"
HEAD_STOP_SECONDS = 20.0


class RayUnavailable(Exception):
    """--ray-address was given, and Ray cannot be used: the message says why and what to do."""


def require_ray() -> None:
    """Refuse --ray-address when Ray is not installed, naming the extra that brings it."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RayUnavailable(f"--ray-address needs Ray, which is not installed: {RAY_EXTRA}") from None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auto_address() -> str | None:
    """Where `auto` leads, as Ray finds it: RAY_ADDRESS, else the cluster `ray start` last started
    on this machine (recorded in Ray's temporary directory); None when neither says."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        return (Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def check_address(address: str) -> None:
    """Refuse what cannot be an address: `auto`, `local`, `host:port` or `ray://host:port`."""
    if address in (AUTO, LOCAL):
        return
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayUnavailable(
            f"--ray-address '{address}' is not auto, local, HOST:PORT of a Ray head or ray://HOST:PORT"
        )


@dataclass
class RayCluster:
    """The cluster a server runs job steps on, and how its drivers join it."""

    address: str
    """What --ray-address said; for `local`, the private head's address once started."""
    environment: dict[str, str] = field(default_factory=dict)
    """Added to the environment of the drivers."""
    head: LocalRayHead | None = None

    @classmethod
    def at(cls, address: str) -> RayCluster:
        """The cluster at `address`, checked; `local` makes a private head that `start` starts."""
        require_ray()
        check_address(address)
        if address == LOCAL:
            head = LocalRayHead(Path(tempfile.mkdtemp(prefix="chainrule-ray-")), owned_directory=True)
            return cls(head.address, {**LOOPBACK_ENVIRONMENT, **head.environment}, head)
        found = auto_address() if address == AUTO else address
        host = (found or "").removeprefix("ray://").rpartition(":")[0]
        environment = dict(LOOPBACK_ENVIRONMENT) if is_loopback(host) else {}
        return cls(address, environment)

    def start(self) -> None:
        if self.head is not None:
            self.head.start()

    def stop(self) -> None:
        if self.head is not None:
            self.head.stop()


def _stop_with_parent() -> None:
    """Linux: SIGTERM the head (which then stops its processes) when whoever started it dies, even
    by SIGKILL, so a private head never outlives its server."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalRayHead:
    """A Ray head on this machine, on 127.0.0.1 only, with token authentication and a directory of
    its own: `ray start --head --block`, whose process stops the head's processes when it gets
    SIGTERM (`ray stop` would stop every Ray on the machine)."""

    def __init__(
        self, directory: Path, num_cpus: int | None = None, port: int = 0, owned_directory: bool = False
    ) -> None:
        self.directory = directory
        self.num_cpus = num_cpus
        self.port = port or free_port()
        self.client_port = free_port()
        """Where Ray Client (ray://) reaches the head."""
        self.owned_directory = owned_directory
        token_file = directory / "auth_token"
        if not token_file.exists():
            token_file.write_text(secrets.token_hex(32))
            token_file.chmod(0o600)
        self.environment = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        """What a driver needs besides LOOPBACK_ENVIRONMENT to join this head."""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        """Start the head and wait until it answers on its port."""
        ray = Path(sys.executable).with_name("ray")
        command = [
            str(ray) if ray.exists() else shutil.which("ray") or "ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--ray-client-server-port={self.client_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.directory / 'ray'}",
        ]
        if self.num_cpus is not None:
            command.append(f"--num-cpus={self.num_cpus}")
        environment = {
            **os.environ,
            **LOOPBACK_ENVIRONMENT,
            **self.environment,
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            # The head's Ray Client server starts a server of its own for each ray:// client, by fork and
            # exec from a process where gRPC's threads run; with gRPC's fork handlers on (they serve a fork
            # without exec, which Ray's processes do not do) that child sometimes died at once, and the
            # client's join failed after 30-40 s (4 of 18 first joins of a new head here; none of 32 with them off).
            "GRPC_ENABLE_FORK_SUPPORT": "0",
        }
        environment.pop("RAY_ADDRESS", None)
        logs = (self.directory / "head.log").open("ab")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=logs,
            stderr=subprocess.STDOUT,
            env=environment,
            preexec_fn=_stop_with_parent,
        )
        logs.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.directory / "head.log").read_text(errors="replace")[-2000:]
                raise RayUnavailable(f"the private Ray head did not start: {tail}")
            time.sleep(0.2)
        log.info("Ray head started on %s (directory %s)", self.address, self.directory)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop the head and its processes (its actors go with it); `kill` gives them no time."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(HEAD_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if kill or process is not None:
            self._kill_leftovers()
        if self.owned_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """Ray's processes of this head that outlived it (a SIGKILLed `ray start` cannot stop them):
        found by the head's own directory on their command lines, never by name."""
        marker = str(self.directory / "ray")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in command:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
