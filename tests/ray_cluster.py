"""A real Ray cluster for the tests: one head (`ray start --head --block`, 2 CPUs) in a temporary
directory, on 127.0.0.1 only and a free port, with token authentication on, shared by the whole
session (Ray takes seconds to start) and stopped at its end. The servers the tests start join it
through the environment this sets (the token's file, loopback only), as a deployment's would.

A test that loses the head (`RayHeadFixture.lose`) starts a new one on the same address before it
ends, so later tests find a cluster there again.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from chainrule.server.jobs.ray_cluster import LOOPBACK_ENVIRONMENT, LocalRayHead

NUM_CPUS = 2


class RayHeadFixture:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.head = LocalRayHead(directory, num_cpus=NUM_CPUS)
        self.environment = {**LOOPBACK_ENVIRONMENT, **self.head.environment}

    @property
    def address(self) -> str:
        return self.head.address

    def client_address(self, timeout: float = 120.0) -> str:
        """Where Ray Client reaches the head: its client server, on 127.0.0.1 and a free port, which
        answers some seconds after the head does; waits until it answers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.head.client_port), timeout=1):
                    return f"ray://127.0.0.1:{self.head.client_port}"
            except OSError:
                assert time.monotonic() < deadline, "the Ray head's client server did not answer"
                time.sleep(0.2)

    def start(self) -> None:
        self.head.start()

    def lose(self) -> None:
        """The head and everything on it gone at once: SIGKILL, no chance to clean up."""
        self.head.stop(kill=True)

    def restart(self) -> None:
        """A new head on the same address (the lost one's port)."""
        self.head = LocalRayHead(self.directory, num_cpus=NUM_CPUS, port=self.head.port)
        self.head.start()

    def stop(self) -> None:
        self.head.stop()


def running_ray() -> Iterator[RayHeadFixture]:
    # A short directory: Ray's Unix sockets live under it, and their paths may not exceed 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="cr-ray-"))
    cluster = RayHeadFixture(directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def descendants(roots: list[int]) -> set[int]:
    """The processes `roots` started, theirs, and so on, with the roots themselves."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = set(roots), list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address of /proc/net/tcp{,6}: hex words in the machine's (little-endian) order."""
    raw = bytes.fromhex(text)
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))


def tcp_sockets(pids: set[int]) -> list[tuple[str, str, str]]:
    """(state, local address, remote address) of every TCP socket the processes hold: LISTEN or
    ESTABLISHED, addresses as text (an IPv4-mapped IPv6 address as its IPv4 address)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    states = {"0A": "LISTEN", "01": "ESTABLISHED"}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] in states:
                local, remote = (_address(field.split(":")[0]) for field in fields[1:3])
                shown = [str(getattr(a, "ipv4_mapped", None) or a) for a in (local, remote)]
                found.append((states[fields[3]], shown[0], shown[1]))
    return found
