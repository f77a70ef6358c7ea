"""A real PostgreSQL server for the tests: `initdb` and `pg_ctl` into a temporary directory, listening
on a free port of 127.0.0.1 only (its Unix socket in that directory), stopped and removed at the end.

initdb refuses to run as root, and CI runs as root: then the cluster runs as an unprivileged user
(`chainrule-pg`, which tools/setup-dev.sh creates, else `nobody`) through runuser, owning its
directory. Connections go over TCP with a password (scram-sha-256), as a deployment's would; the
password holds characters a URL must percent-encode, so that hiding it is tested on a hard case.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import psycopg

USER = "chainrule"
"""The cluster's superuser, whom the tests connect as."""
RUN_AS = ("chainrule-pg", "nobody")
"""Who runs PostgreSQL when the tests run as root: the first of these that exists."""
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "200",
    # Durability against a crash of the machine is PostgreSQL's, not what these tests check; a test
    # that stops PostgreSQL stops it cleanly or kills it, and the OS keeps what it wrote either way.
    "fsync": "off",
    "full_page_writes": "off",
}


def binaries() -> Path:
    """PostgreSQL's server programs: where pg_config says, else the newest of Debian's versions."""
    try:
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(bindir) / "initdb").exists():
            return Path(bindir)
    except (OSError, subprocess.CalledProcessError):
        pass
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[-3]))
    if not found:
        raise RuntimeError(
            "PostgreSQL's initdb was not found: run tools/setup-dev.sh (it installs Debian's postgresql)"
        )
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster of the tests' own; `database()` gives each test a fresh database's URL."""

    def __init__(self) -> None:
        self.bindir = binaries()
        self.root = Path(tempfile.mkdtemp(prefix="chainrule-pg-"))
        self.data = self.root / "data"
        self.password = f"pw:{secrets.token_hex(6)}@/%?&"
        self.port = 0
        self._names = itertools.count()
        self.run_as: str | None = None
        if os.geteuid() == 0:
            self.run_as = next(name for name in RUN_AS if _user_exists(name))
            account = pwd.getpwnam(self.run_as)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if self.run_as is not None:
            os.chown(password_file, pwd.getpwnam(self.run_as).pw_uid, -1)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={password_file}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )
        password_file.unlink()

    def _run(self, program: str, *arguments: str) -> None:
        command = [str(self.bindir / program), *arguments]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if finished.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} failed ({finished.returncode}): {finished.stderr}{finished.stdout}\n{tail}")

    def start(self) -> PostgresServer:
        """Start (again, on the same port once it has one)."""
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            port = self.port or free_port()
            settings = {**SETTINGS, "port": str(port), "unix_socket_directories": str(self.root)}
            options = " ".join(f"-c {key}={value}" for key, value in settings.items())
            try:
                self._run(
                    "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-o", options, "start"
                )
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                continue  # another process took the port between the probe and the start
            self.port = port
            return self
        raise AssertionError("unreachable")

    def stop(self, mode: str = "fast") -> None:
        """`fast` ends every session and shuts down cleanly; `immediate` kills PostgreSQL, as a crash would."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def freeze(self) -> None:
        """SIGSTOP the postmaster, then its children: PostgreSQL stops answering while its sockets stay up,
        as when its host hangs. The postmaster first, so that it starts no child after the list is read."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGSTOP)
        for child in _children(postmaster):
            os.kill(child, signal.SIGSTOP)

    def thaw(self) -> None:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        for child in _children(postmaster):
            os.kill(child, signal.SIGCONT)
        os.kill(postmaster, signal.SIGCONT)

    def close(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            shutil.rmtree(dataset_cache_root(self.port), ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        password = urllib.parse.quote(self.password, safe="")
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.url(database), autocommit=True, connect_timeout=10)

    def database(self) -> str:
        """A new, empty database's URL."""
        name = f"test_{next(self._names)}"
        with self.connect() as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def _children(parent: int) -> list[int]:
    """The processes whose parent is `parent`, from /proc (the field after the name, which may hold spaces,
    is the state, then the parent's pid)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:  # it ended meanwhile
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(entry.name))
    return found


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def dataset_cache_root(port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"chainrule-pg-{port}-dataset-caches"


def dataset_cache(url: str) -> Path:
    """Where a test server on the PostgreSQL database `url` keeps its dataset cache: the same place for
    every server on that database (as SQLite's DB.cache is), removed with the cluster."""
    parsed = urllib.parse.urlsplit(url)
    return dataset_cache_root(parsed.port or 0) / hashlib.sha256(parsed.path.encode()).hexdigest()[:16]


def running_postgres() -> Iterator[PostgresServer]:
    """The body of the session's `postgres` fixture (tests/conftest.py)."""
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.close()
